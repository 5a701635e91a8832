"""The fla fixtures' cases and inputs (numpy only: shared by make_fla_golden.py, which runs fla on a
GPU, and tests/test_ops_fla_parity.py, which regenerates the same inputs instead of storing them).

fla needs query heads / kv heads to be a power of two >= 16. bfloat16 cases round these float32
inputs to bfloat16 (round to nearest even, in torch and in JAX alike).
"""

from __future__ import annotations

import zlib

import numpy as np

# batch, lengths of the packed documents (None: one sequence of t tokens), query heads, kv
# heads, head dim, block size, block count, dtype.
CASES = {
    "causal_f32": dict(b=1, docs=None, t=200, hq=16, h=1, d=16, bs=16, s=4, dtype="float32"),
    "causal_bf16": dict(b=1, docs=None, t=320, hq=32, h=2, d=16, bs=32, s=4, dtype="bfloat16"),
    "packed_f32": dict(b=1, docs=[37, 120, 13, 150], t=320, hq=16, h=1, d=16, bs=16, s=4, dtype="float32"),
    "packed_bf16": dict(b=1, docs=[37, 163, 13, 187], t=400, hq=16, h=1, d=16, bs=16, s=4, dtype="bfloat16"),
    "default_blocks_bf16": dict(b=1, docs=None, t=1100, hq=16, h=1, d=16, bs=64, s=16, dtype="bfloat16"),
}


def inputs(name: str) -> dict[str, np.ndarray]:
    """float32 q, k, v, g_cmp, g_slc (sigmoid of normals) and the output cotangent do, seeded by the name."""
    c = CASES[name]
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    normal = lambda *shape: rng.standard_normal(shape, dtype=np.float32)  # noqa: E731
    sigmoid = lambda x: (1 / (1 + np.exp(-x))).astype(np.float32)  # noqa: E731
    b, t = c["b"], c["t"]
    return dict(q=normal(b, t, c["hq"], c["d"]), k=normal(b, t, c["h"], c["d"]), v=normal(b, t, c["h"], c["d"]),
                g_cmp=sigmoid(normal(b, t, c["hq"])), g_slc=sigmoid(normal(b, t, c["hq"])),
                do=normal(b, t, c["hq"], c["d"]))

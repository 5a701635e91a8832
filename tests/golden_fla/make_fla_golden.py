"""Write the fla fixtures: outputs, picks and gradients of fla-core 0.6.0's `parallel_nsa`.

Needs a CUDA GPU, torch and fla-core 0.6.0 (Triton kernels; not dependencies of nsa-jax, nor
of CI). With the wheels of ../shared/wheels on the GPU machine:

    python3 -m pip install -q --no-index --no-deps --target /tmp/site fla_core-0.6.0-py3-none-any.whl
    PYTHONPATH=/tmp/site python3 tests/golden_fla/make_fla_golden.py

float32 runs with TRITON_F32_DEFAULT=ieee (set here), so fla's float32 matmuls are IEEE, not
TF32. The inputs and the output cotangent come from `cases.inputs` (numpy, seeded: the test
regenerates them); each case saves fla's output, its block indices (from its own compression
and top-k kernels, as `parallel_nsa` computes them) and the gradients of q, k, v and the gates
to tests/golden_fla/<case>.npz; bfloat16 arrays are stored as their uint16 bits. `tests/test_ops_fla_parity.py` checks `nsa_jax.ops.native_sparse_attention`
against them.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import fla  # noqa: E402
from fla.ops.nsa.compression import parallel_nsa_compression  # noqa: E402
from fla.ops.nsa.parallel import parallel_nsa, parallel_nsa_topk  # noqa: E402
from fla.ops.utils.pooling import mean_pooling  # noqa: E402

OUT = Path(__file__).parent
sys.path.insert(0, str(OUT))
from cases import CASES, inputs  # noqa: E402


def save(name: str, meta: dict, tensors: dict) -> None:
    arrays = {}
    for key, x in tensors.items():
        x = x.detach().cpu()
        arrays[key] = x.view(torch.int16).numpy().view(np.uint16) if x.dtype == torch.bfloat16 else x.numpy()
    np.savez_compressed(OUT / f"{name}.npz", meta=np.array(json.dumps(meta)), **arrays)


def run(name: str, c: dict) -> None:
    dtype = getattr(torch, c["dtype"])
    x = {key: torch.from_numpy(value).to("cuda").to(dtype) for key, value in inputs(name).items()}
    q, k, v, g_cmp, g_slc = (x[key].requires_grad_() for key in ("q", "k", "v", "g_cmp", "g_slc"))
    do = x["do"]
    cu = None
    if c["docs"] is not None:
        assert sum(c["docs"]) == c["t"] and c["b"] == 1
        cu = torch.tensor(np.cumsum([0] + c["docs"]), dtype=torch.int32, device="cuda")
    scale = c["d"] ** -0.5

    o = parallel_nsa(q, k, v, g_cmp, g_slc, None, block_counts=c["s"], block_size=c["bs"], scale=scale,
                     cu_seqlens=cu)
    o.backward(do)
    with torch.no_grad():  # the picks, as parallel_nsa computes them
        k_cmp, v_cmp = mean_pooling(k, c["bs"], cu), mean_pooling(v, c["bs"], cu)
        _, lse = parallel_nsa_compression(q=q, k=k_cmp, v=v_cmp, TK=c["t"], block_size=c["bs"], scale=scale,
                                          cu_seqlens=cu)
        indices = parallel_nsa_topk(q=q, k=k_cmp, lse=lse, TK=c["t"], block_counts=c["s"], block_size=c["bs"],
                                    scale=scale, cu_seqlens=cu)
    meta = dict(c, scale=scale, fla=fla.__version__, torch=torch.__version__, gpu=torch.cuda.get_device_name(),
                triton_f32_default=os.environ["TRITON_F32_DEFAULT"])
    save(name, meta, dict(o=o, block_indices=indices.to(torch.int32), dq=q.grad, dk=k.grad, dv=v.grad,
                          dg_cmp=g_cmp.grad, dg_slc=g_slc.grad))
    print(f"{name}: o {tuple(o.shape)} {c['dtype']}, picks {tuple(indices.shape)}", flush=True)


def main() -> None:
    names = sys.argv[1:] or list(CASES)
    for name in names:
        run(name, CASES[name])


if __name__ == "__main__":
    main()

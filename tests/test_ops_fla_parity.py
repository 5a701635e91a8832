"""Parity of `nsa_jax.ops.native_sparse_attention` with fla-core 0.6.0's `parallel_nsa`.

The fixtures in tests/golden_fla hold fla's inputs, output cotangent, output, block picks and
gradients (the inputs regenerated from tests/golden_fla/cases.py), written on a GPU by
tests/golden_fla/make_fla_golden.py (float32 with IEEE matmuls, and bfloat16). Two checks per fixture:

- the picks: ours (the reference selection, float32 on the fixture's inputs) and fla's are the
  same set of blocks for each query and kv head, except where two blocks' importances tie
  within the dtype's rounding (fla rounds q * scale to the input dtype before its products);
- the output and the gradients of q, k, v and both gates, with fla's picks passed as
  `block_indices`: within 1e-5 of the largest entry (float32) or 1e-2 norm-wise (bfloat16),
  on the reference backend, and (slow tier) on the Pallas kernels.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from golden_fla import cases as fla_cases
from kernel_testing import relative_error
from nsa_jax import fla_reference as fla
from nsa_jax import segments as seg
from nsa_jax.ops import native_sparse_attention

GOLDEN = Path(__file__).parent / "golden_fla"
EXPECTED = list(fla_cases.CASES)
TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-2}
# Picks may differ only between blocks whose importances (sums of g probabilities) lie within
# this fraction of the k-th best importance, and in at most this fraction of the rows.
TIE = {"float32": 1e-4, "bfloat16": 5e-2}
MAX_SWAPPED_ROWS = {"float32": 0.005, "bfloat16": 0.03}


def load(name: str) -> tuple[dict, dict]:
    """(meta, arrays): fla's results from the fixture, the inputs regenerated in the case's dtype."""
    data = np.load(GOLDEN / f"{name}.npz")
    meta = json.loads(str(data["meta"]))
    arrays = {key: jnp.asarray(x).astype(meta["dtype"]) for key, x in fla_cases.inputs(name).items()}
    for key in data.files:
        if key == "meta":
            continue
        x = data[key]
        arrays[key] = jnp.asarray(x.view(jnp.bfloat16) if x.dtype == np.uint16 else x)
    return meta, arrays


def segment_ids(meta: dict):
    if meta["docs"] is None:
        return None
    return jnp.asarray(np.repeat(np.arange(len(meta["docs"])), meta["docs"])[None])


def test_every_fixture_is_there():
    assert sorted(p.stem for p in GOLDEN.glob("*.npz")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", EXPECTED)
def test_picks_match_fla(name):
    meta, a = load(name)
    ids = segment_ids(meta)
    b, n = a["q"].shape[:2]
    segments = seg.from_ids(ids) if ids is not None else fla.single_document(b, n)
    q, k = a["q"].astype(jnp.float32), a["k"]
    ck = fla.compress(k, meta["bs"], fla.mean_pool, segments if ids is not None else None).astype(jnp.float32)
    ours = np.asarray(fla.select_blocks(q, ck, segments, block_size=meta["bs"], block_count=meta["s"], causal=True,
                                        scale=meta["scale"]))
    theirs = np.asarray(a["block_indices"])
    assert theirs.shape == ours.shape
    scores = np.asarray(fla.block_scores(q, ck, segments.start, segments.positions, segments.lengths,
                                         num_blocks=-(-n // meta["bs"]), block_size=meta["bs"], causal=True,
                                         scale=meta["scale"]))
    swapped = 0
    for row in zip(*np.nonzero(np.ones(ours.shape[:3], bool))):
        mine, fla_set = set(ours[row][ours[row] >= 0]), set(theirs[row][theirs[row] >= 0])
        if mine == fla_set:
            continue
        swapped += 1
        kth = min(scores[row][list(mine)])
        for block in mine ^ fla_set:
            assert abs(scores[row][block] - kth) <= TIE[meta["dtype"]] * abs(kth), (
                f"{name} {row}: ours {sorted(mine)} fla {sorted(fla_set)}; block {block} scores "
                f"{scores[row][block]:.6g}, the k-th best {kth:.6g}")
    rows = int(np.prod(ours.shape[:3]))
    assert swapped <= MAX_SWAPPED_ROWS[meta["dtype"]] * rows, f"{name}: {swapped} of {rows} rows pick other blocks"


def _check_against_fla(name: str, backend: str) -> None:
    meta, a = load(name)
    dtype = meta["dtype"]
    f32 = {key: a[key].astype(jnp.float32) for key in ("q", "k", "v", "g_cmp", "g_slc", "do")}

    def fn(q, k, v, g_cmp, g_slc):
        return native_sparse_attention(q, k, v, g_cmp=g_cmp, g_slc=g_slc, block_size=meta["bs"],
                                       block_count=meta["s"], segment_ids=segment_ids(meta),
                                       block_indices=a["block_indices"], scale=meta["scale"], backend=backend)

    with jax.default_matmul_precision("highest"):
        out, vjp = jax.vjp(jax.jit(fn), *(f32[key] for key in ("q", "k", "v", "g_cmp", "g_slc")))
        grads = vjp(f32["do"])
    errors = {"o": relative_error(out, a["o"].astype(jnp.float32), dtype)}
    for key, grad in zip(("dq", "dk", "dv", "dg_cmp", "dg_slc"), grads):
        errors[key] = relative_error(grad, a[key].astype(jnp.float32), dtype)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOLERANCE[dtype], f"{name} ({backend}): {worst} relative error {errors[worst]:.3g}: {errors}"


@pytest.mark.parametrize("name", EXPECTED)
def test_output_and_gradients_match_fla(name):
    _check_against_fla(name, "reference")


@pytest.mark.parametrize("name", [
    pytest.param("packed_f32", marks=() if jax.default_backend() == "gpu" else pytest.mark.slow),
    pytest.param("causal_bf16", marks=() if jax.default_backend() == "gpu" else pytest.mark.slow),
])
def test_pallas_output_and_gradients_match_fla(name):
    _check_against_fla(name, "pallas")

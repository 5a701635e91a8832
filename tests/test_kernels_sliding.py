"""Sliding-window attention (Pallas kernel; cuDNN on GPU for causal bf16) against the reference."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import pytest

from kernel_testing import BOTH, ON_GPU, check_vjp, grid, randn
from kernels.settings import Tiles
from kernels.sliding_window import sliding_window_attention
from nsa_jax import reference


class Case(NamedTuple):
    n: int
    heads: int
    kv_heads: int
    dim_head: int
    window: int
    causal: bool
    mask_padding: bool = False  # mask the package's non-causal zero padding


# g = 1, 2, 4, 16; the package's non-causal zero-padding quirk with windows that do and do not
# divide n; window 0 (the token alone); a window longer than the sequence.
CASES = {
    "one_query": Case(1, 2, 2, 32, 4, True),
    "g1_window5": Case(37, 4, 4, 32, 5, True),
    "g2_seed": Case(100, 8, 4, 64, 64, True),
    "g2_noncausal_quirk": Case(100, 8, 4, 64, 16, False),
    "g2_noncausal_masked": Case(100, 8, 4, 64, 16, False, mask_padding=True),
    "g4_window0": Case(150, 16, 4, 32, 0, True),
    "g16_noncausal_quirk_d128": Case(130, 16, 1, 128, 33, False),
    "g2_window_longer_than_n": Case(257, 4, 2, 64, 300, True),
    "g16_d128": Case(300, 16, 1, 128, 48, True),
}


def run(case: Case, dtype, impl: str, tiles: Tiles = Tiles()) -> None:
    keys = jax.random.split(jax.random.key(hash(case) % 2**31), 4)
    q = randn(keys[0], (2, case.n, case.heads, case.dim_head), dtype)
    k, v = (randn(key, (2, case.n, case.kv_heads, case.dim_head), dtype) for key in keys[1:3])
    kw = dict(window=case.window, causal=case.causal, mask_padding=case.mask_padding)
    check_vjp(f"sliding_{impl}", functools.partial(sliding_window_attention, impl=impl, tiles=tiles, **kw),
              functools.partial(reference.sliding_window_attention, **kw),
              (q, k, v), ("q", "k", "v"), dtype, keys[3], case=str(case))


@pytest.mark.parametrize("case,dtype", grid(CASES, {"g2_seed": BOTH, "g2_noncausal_quirk": BOTH}))
def test_sliding_window_pallas_kernel_matches_reference(case, dtype):
    run(case, dtype, "pallas")


@pytest.mark.parametrize("case,dtype", grid(CASES, {"g2_seed": BOTH, "g2_noncausal_quirk": (jnp.float32,)}))
def test_sliding_window_fused_backward_matches_reference(case, dtype):
    """Tiles(window_bwd="fused"): dq from the dk/dv kernel's per-key-tile slots."""
    run(case, dtype, "pallas", Tiles(window_bwd="fused"))


@pytest.mark.parametrize("window,causal", [(16, True), (40, True), (16, False)])
def test_sliding_window_fused_backward_small_key_tiles(window, causal):
    """Key tiles of 16 and query tiles of 8 tokens: a window spans up to 4 key tiles (slots), and the
    query tiles near the sequence's start or end see fewer (the slots their first key tile zeroes)."""
    tiles = Tiles(rows_dkv=16, block_k_dkv=16, window_bwd="fused")
    case = Case(90, 4, 2, 32, window, causal)
    run(case, jnp.float32, "pallas", tiles)
    q = jnp.ones((1, case.n, case.heads, case.dim_head))
    k = jnp.ones((1, case.n, case.kv_heads, case.dim_head))
    loss = lambda q, k: sliding_window_attention(q, k, k, window=window, causal=causal, tiles=tiles).sum()  # noqa: E731
    jaxpr = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(q, k))
    assert "nsa_window_dkdvq" in jaxpr and "nsa_window_dq" not in jaxpr  # the fused kernel, not the pair


@pytest.mark.skipif(not ON_GPU, reason="cuDNN runs on the GPU only")
@pytest.mark.parametrize("case", [c for c in CASES.values() if c.causal and c.window > 0], ids=str)
def test_sliding_window_kernel_cudnn_matches_reference(case):
    """cuDNN's local window, the default for long causal bf16 windows on GPU."""
    run(case, jnp.bfloat16, "cudnn")


@pytest.mark.parametrize("case,dtype", grid({n: CASES[n] for n in ("g2_seed", "g2_noncausal_quirk")}, {}))
def test_sliding_window_xla_matches_reference(case, dtype):
    """impl="xla": the reference's dense masked attention, its backward recomputing the logits."""
    run(case, dtype, "xla")

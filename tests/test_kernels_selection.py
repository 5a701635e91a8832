"""Block selection without per-head compressed logits against the reference: the same valid
(block, probability) picks, and the same gradients of the probabilities in q and ck, for
both top-k implementations."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_testing import DTYPES, assert_close, randn
from kernels import get_backend
from kernels.selection import select_blocks
from nsa_jax import reference

# (n, heads, kv_heads, dim_head, stride, selection block, k, causal, shared, interpolated, num_mem)
CASES = [
    (1, 4, 2, 32, 4, 4, 2, True, True, False, 1),
    (37, 4, 2, 32, 4, 4, 2, True, True, False, 1),
    (100, 16, 1, 64, 4, 8, 3, True, False, False, 2),
    (120, 4, 2, 32, 4, 6, 3, True, True, True, 1),
    (77, 4, 2, 32, 4, 2, 2, False, True, True, 1),
    (64, 4, 4, 32, 4, 8, 16, False, True, False, 1),
    (300, 32, 2, 128, 16, 64, 4, True, True, False, 1),
    (200, 8, 4, 64, 16, 16, 4, True, True, False, 1),
    (150, 8, 2, 64, 8, 8, 5, False, False, False, 1),
]


def valid_picks(values, indices) -> list[dict[int, float]]:
    values, indices = np.asarray(values, np.float64), np.asarray(indices)
    flat_v = values.reshape(int(np.prod(values.shape[:-1])), values.shape[-1])
    flat_i = indices.reshape(flat_v.shape)
    return [{int(i): float(p) for p, i in zip(pv, pi) if p > reference.SELECTION_THRESHOLD}
            for pv, pi in zip(flat_v, flat_i)]


@pytest.mark.parametrize("topk_impl", ["lax", "passes"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_select_blocks_kernel_matches_reference(case, dtype, topk_impl):
    n, h, kh, d, stride, sb, num_sel, causal, shared, interpolated, m = case
    keys = jax.random.split(jax.random.key(hash(case) % 2**31), 3)
    q = randn(keys[0], (2, n, h, d), dtype)
    ck = randn(keys[1], (2, m + n // stride, kh, d), dtype)
    kw = dict(num_mem=m, stride=stride, causal=causal, share_heads=shared, num_selected=num_sel,
              selection_block_size=sb, interpolated=interpolated)
    kernel = functools.partial(select_blocks, topk_impl=topk_impl)
    values, indices = jax.jit(functools.partial(kernel, **kw))(q, ck)
    with jax.default_matmul_precision("highest"):
        ref_values, ref_indices = jax.jit(functools.partial(reference.select_blocks, **kw))(
            q.astype(jnp.float32), ck.astype(jnp.float32))
    assert values.shape == ref_values.shape and indices.shape == ref_indices.shape
    assert values.dtype == jnp.float32 and indices.dtype == jnp.int32
    got, want = valid_picks(values, indices), valid_picks(ref_values, ref_indices)
    assert [sorted(p) for p in got] == [sorted(p) for p in want], "different valid blocks"
    if values.size == 0:
        return
    gp = np.array([p[i] for p in got for i in sorted(p)])
    wp = np.array([p[i] for p in want for i in sorted(p)])
    assert_close("selection", "probabilities", gp, wp, jnp.float32, case=str(case), topk=topk_impl)

    # Gradient of a random functional of the valid probabilities (what diff top-k uses).
    weights = randn(keys[2], values.shape) * reference.valid_selection(ref_values)

    def loss(fn, q, ck):
        return jnp.sum(fn(q, ck, **kw)[0] * weights)

    grads = jax.jit(jax.grad(lambda q, ck: loss(kernel, q, ck), argnums=(0, 1)))(q, ck)
    with jax.default_matmul_precision("highest"):
        ref_grads = jax.jit(jax.grad(lambda q, ck: loss(reference.select_blocks, q, ck), argnums=(0, 1)))(
            q.astype(jnp.float32), ck.astype(jnp.float32))
    for name, g, r in zip(("q", "ck"), grads, ref_grads):
        assert g.dtype == dtype
        # The kernel differentiates in float32 and rounds the result to the input dtype once.
        assert_close("selection", f"d{name}", g, r, jnp.float32 if dtype == jnp.float32 else dtype,
                     case=str(case), topk=topk_impl)


def test_pallas_backend_serves_the_kernels():
    backend = get_backend("pallas")
    assert backend.name == "pallas"
    assert backend.select_blocks is select_blocks
    assert backend.selected_attention.__module__ == "kernels.selected_attention"
    assert backend.compressed_attention.__module__ == "kernels.compressed_attention"
    assert backend.sliding_window_attention.__module__ == "kernels.sliding_window"

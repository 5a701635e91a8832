"""Selected (fine) attention Pallas kernels against the reference: forward, d(q, k, v, gates)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest

from kernel_testing import DTYPES, check_vjp, randn
from kernels.selected_attention import selected_attention
from nsa_jax import reference

# (n, heads, kv_heads, dim_head, selection block, k, causal, shared selection, gates):
# g = 1, 2, 4, 16 (16: the matrix-unit path); per-head selection; block sizes that are not
# powers of two or below 16; no selectable block (k = 0); partial last block.
CASES = [
    (1, 4, 2, 32, 16, 4, True, True, True),
    (37, 2, 2, 32, 4, 2, True, True, True),
    (37, 2, 2, 32, 4, 2, False, True, True),
    (100, 8, 4, 64, 16, 4, True, True, True),
    (100, 8, 4, 64, 16, 4, False, True, False),
    (130, 16, 4, 32, 6, 3, True, False, True),
    (77, 16, 4, 128, 8, 3, False, False, True),
    (300, 32, 2, 64, 64, 3, True, True, True),
    (200, 16, 1, 128, 32, 4, False, True, True),
    (50, 4, 2, 32, 8, 0, True, True, False),
    (50, 4, 2, 32, 8, 0, False, True, False),
]


def random_selection(key, shape, num_blocks: int, p_valid: float):
    """Distinct random blocks per query (any block: past, own, future, partial last), random
    validity (some query groups with no valid block at all) and gates around 1."""
    k_idx, k_valid, k_gate = jax.random.split(key, 3)
    *lead, num_sel = shape
    order = jnp.argsort(jax.random.uniform(k_idx, (*lead, num_blocks)), axis=-1)
    indices = order[..., :num_sel].astype(jnp.int32)
    valid = jax.random.uniform(k_valid, shape) < p_valid
    gates = 1.0 + 0.5 * jax.random.normal(k_gate, shape)
    return indices, valid, gates


# (impl, dkv_impl): per-query kernels with either dk/dv path, and the query-tiled kernels.
VARIANTS = [("query", "inverted"), ("query", "scatter"), ("tiled", "auto")]


def _check(case, dtype, indices, valid, gates, q, k, v, key, variant=("query", "auto"), tile_rows=32):
    n, h, kh, d, sb, num_sel, causal, shared, use_gates = case
    impl, dkv_impl = variant
    kw = dict(block_size=sb, causal=causal)
    kernel_kw = dict(kw, impl=impl, dkv_impl=dkv_impl, tile_rows=tile_rows)
    if use_gates:
        args, names = (q, k, v, gates), ("q", "k", "v", "gates")
        fn = lambda q, k, v, g: selected_attention(q, k, v, indices, valid, g, **kernel_kw)
        ref = lambda q, k, v, g: reference.selected_attention(q, k, v, indices, valid, g, **kw)
    else:
        args, names = (q, k, v), ("q", "k", "v")
        fn = lambda q, k, v: selected_attention(q, k, v, indices, valid, None, **kernel_kw)
        ref = lambda q, k, v: reference.selected_attention(q, k, v, indices, valid, None, **kw)
    check_vjp("selected" if impl == "query" else "selected tiled", fn, ref, args, names, dtype, key, case=str(case),
              dkv_impl=dkv_impl, tile_rows=tile_rows)


@pytest.mark.parametrize("variant", VARIANTS, ids="-".join)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_selected_attention_kernel_matches_reference(case, dtype, variant):
    n, h, kh, d, sb, num_sel, causal, shared, use_gates = case
    keys = jax.random.split(jax.random.key(hash(case) % 2**31), 5)
    q = randn(keys[0], (2, n, h, d), dtype)
    k, v = (randn(key, (2, n, kh, d), dtype) for key in keys[1:3])
    num_blocks = -(-n // sb)
    num_sel = min(num_sel, num_blocks)
    sh = kh if shared else h
    indices, valid, gates = random_selection(keys[3], (2, n, sh, num_sel), num_blocks, 0.6 if not causal else 0.8)
    _check(case, dtype, indices, valid, gates, q, k, v, keys[4], variant)


@pytest.mark.parametrize("tile_rows", [16, 128])
@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[5]], ids=str)
def test_selected_attention_tiled_tile_sizes(case, tile_rows):
    """Tiles smaller and larger than a selection block (one or many own blocks per tile)."""
    n, h, kh, d, sb, num_sel, causal, shared, use_gates = case
    keys = jax.random.split(jax.random.key(hash(case) % 2**31 + 2), 5)
    q = randn(keys[0], (2, n, h, d))
    k, v = (randn(key, (2, n, kh, d)) for key in keys[1:3])
    num_blocks = -(-n // sb)
    sh = kh if shared else h
    indices, valid, gates = random_selection(keys[3], (2, n, sh, num_sel), num_blocks, 0.7)
    _check(case, jnp.float32, indices, valid, gates, q, k, v, keys[4], ("tiled", "auto"), tile_rows)


@pytest.mark.parametrize("dkv", ["splits", "atomic"])
@pytest.mark.parametrize("case", [CASES[1], CASES[5]], ids=str)
def test_selected_attention_tiled_dkv_variants(case, dkv, monkeypatch):
    """The tiled dk/dv kernel with each block's tile list split over several programs, and the
    atomic-add alternative (kernels.selected_tiled.ATOMIC_DKV)."""
    import kernels.selected_attention
    import kernels.selected_tiled

    if dkv == "splits":
        monkeypatch.setattr(kernels.selected_attention, "TILES_PER_DKV_SPLIT", 1)
    else:
        monkeypatch.setattr(kernels.selected_tiled, "ATOMIC_DKV", True)
    n, h, kh, d, sb, num_sel, causal, shared, use_gates = case
    keys = jax.random.split(jax.random.key(hash(case) % 2**31 + 3), 5)
    q = randn(keys[0], (2, n, h, d))
    k, v = (randn(key, (2, n, kh, d)) for key in keys[1:3])
    sh = kh if shared else h
    indices, valid, gates = random_selection(keys[3], (2, n, sh, num_sel), -(-n // sb), 0.7)
    _check(case, jnp.float32, indices, valid, gates, q, k, v, keys[4], ("tiled", "auto"), 16)


# Selections as the module makes them (top-k of the compressed scores; causal: past blocks
# only), with diff-top-k gates.
PIPELINE_CASES = [
    (120, 8, 4, 64, 16, 4, True, True, True),
    (200, 16, 1, 128, 32, 4, True, True, True),
    (90, 8, 2, 32, 8, 3, False, False, True),
]


@pytest.mark.parametrize("impl", ["query", "tiled"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("case", PIPELINE_CASES, ids=str)
def test_selected_attention_kernel_with_module_selection(case, dtype, impl):
    n, h, kh, d, sb, num_sel, causal, shared, _ = case
    keys = jax.random.split(jax.random.key(hash(case) % 2**31), 6)
    q = randn(keys[0], (2, n, h, d), dtype)
    k, v = (randn(key, (2, n, kh, d), dtype) for key in keys[1:3])
    stride = sb // 2
    ck = randn(keys[3], (2, 1 + n // stride, kh, d), jnp.float32)
    values, indices = reference.select_blocks(
        q.astype(jnp.float32), ck, num_mem=1, stride=stride, causal=causal, share_heads=shared,
        num_selected=num_sel, selection_block_size=sb)
    valid = reference.valid_selection(values)
    _check(case, dtype, indices, valid, values, q, k, v, keys[5], (impl, "auto"))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("case", [CASES[3], CASES[6]], ids=str)
def test_selected_attention_kernel_split_dkdv(case, dtype):
    """dk/dv with each key block's query list split over several programs (partial sums)."""
    n, h, kh, d, sb, num_sel, causal, shared, use_gates = case
    keys = jax.random.split(jax.random.key(hash(case) % 2**31 + 1), 5)
    q = randn(keys[0], (2, n, h, d), dtype)
    k, v = (randn(key, (2, n, kh, d), dtype) for key in keys[1:3])
    num_blocks = -(-n // sb)
    sh = kh if shared else h
    indices, valid, gates = random_selection(keys[3], (2, n, sh, num_sel), num_blocks, 0.7)
    kw = dict(block_size=sb, causal=causal)
    split = functools.partial(selected_attention, dkv_entries_per_program=1)
    check_vjp("selected", lambda q, k, v, g: split(q, k, v, indices, valid, g, **kw),
              lambda q, k, v, g: reference.selected_attention(q, k, v, indices, valid, g, **kw),
              (q, k, v, gates), ("q", "k", "v", "gates"), dtype, keys[4], case=str(case) + "split")


@pytest.mark.parametrize("causal,option", [(True, 0), (False, 5)])
def test_sparse_attention_pallas_backend_matches_reference(causal, option):
    """The whole module on both backends: output and every parameter gradient (float32)."""
    import numpy as np
    from flax import nnx

    from test_sparse_attention import OPTIONS, make

    kv_heads, (cb, cs, sb), num_sel, share, diff, interp = OPTIONS[option]
    kw = dict(kv_heads=kv_heads, causal=causal, compress_block_size=cb, compress_block_sliding_stride=cs,
              selection_block_size=sb, num_selected_blocks=num_sel, query_heads_share_selected_kv=share,
              use_diff_topk=diff, interpolated_importance_score=interp)
    x = jax.random.normal(jax.random.key(option), (2, 45, 32))
    results = []
    for use_pallas in (True, False):
        attn = make(option, use_pallas_nsa=use_pallas, **kw)
        graphdef, state = nnx.split(attn)
        loss = lambda s, x: jnp.sum(nnx.merge(graphdef, s)(x) ** 2)
        with jax.default_matmul_precision("highest"):
            results.append(jax.jit(jax.value_and_grad(loss))(state, x))
    (loss_k, grads_k), (loss_r, grads_r) = results
    np.testing.assert_allclose(float(loss_k), float(loss_r), rtol=1e-5)
    for gk, gr in zip(jax.tree.leaves(grads_k), jax.tree.leaves(grads_r)):
        scale = float(jnp.max(jnp.abs(gr)))
        # float32 through projections, compress networks and all four branches: ~1e-5 of max.
        assert float(jnp.max(jnp.abs(gk - gr))) <= 5e-5 * scale + 1e-7


def test_set_selected_defaults(monkeypatch):
    import kernels
    import kernels.selected_attention
    import kernels.selected_tiled

    for module, name in ((kernels.selected_attention, "IMPL"), (kernels.selected_attention, "TILE_ROWS"),
                         (kernels.selected_tiled, "ATOMIC_DKV")):
        monkeypatch.setattr(module, name, getattr(module, name))  # restored after the test
    kernels.set_selected_defaults("query", "atomic", 16)
    assert (kernels.selected_attention.IMPL, kernels.selected_tiled.ATOMIC_DKV,
            kernels.selected_attention.TILE_ROWS) == ("query", True, 16)
    with pytest.raises(ValueError, match="impl must be"):
        kernels.set_selected_defaults("fast")
    with pytest.raises(ValueError, match="tiled_dkv must be"):
        kernels.set_selected_defaults(tiled_dkv="scatter")

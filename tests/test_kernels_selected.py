"""Selected (fine) attention Pallas kernels against the reference: forward, d(q, k, v, gates).

Both kernel families (`impl`): "query" (one program per query; the default for selection
groups of >= 16 rows) and "tiled" (tiles of queries; the default for smaller groups).
Every test asserts the layout it means to reach, so a changed default cannot silently skip a path.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_testing import BOTH, F32_ONLY, check_vjp, grid, loops_outside_kernels, randn
from kernels import _selected_common
from kernels._selected_common import sort_by_block
from kernels.selected_attention import layout, selected_attention
from kernels.selected_query import QueryConfig, _split_bounds
from kernels.selected_tiled import tile_layout
from kernels.settings import KernelSettings, SelectedSettings, SelectionSettings, Tiles
from nsa_jax import reference


class Case(NamedTuple):
    n: int
    heads: int
    kv_heads: int
    dim_head: int
    block: int  # selection block size
    num_selected: int
    causal: bool
    shared: bool = True  # the query heads of a kv head share the selection
    gates: bool = True  # diff-top-k gates on the selected blocks

    @property
    def group_rows(self) -> int:  # rows of a selection group
        return self.heads // self.kv_heads if self.shared else 1


# g = heads / kv_heads = 1, 2, 4, 16 (16 rows: the matrix-unit path); per-head selection; block
# sizes that are not powers of two or below 16; no selectable block (k = 0); partial last block.
CASES = {
    "one_query": Case(1, 4, 2, 32, 16, 4, True),
    "g1_block4": Case(37, 2, 2, 32, 4, 2, True),
    "g1_block4_noncausal": Case(37, 2, 2, 32, 4, 2, False),
    "g2_seed": Case(100, 8, 4, 64, 16, 4, True),
    "g2_noncausal_nogates": Case(100, 8, 4, 64, 16, 4, False, gates=False),
    "per_head_block6": Case(130, 16, 4, 32, 6, 3, True, shared=False),
    "per_head_noncausal_d128": Case(77, 16, 4, 128, 8, 3, False, shared=False),
    "g16_block64": Case(300, 32, 2, 64, 64, 3, True),
    "g16_noncausal_d128": Case(200, 16, 1, 128, 32, 4, False),
    "k0": Case(50, 4, 2, 32, 8, 0, True, gates=False),
    "k0_noncausal": Case(50, 4, 2, 32, 8, 0, False, gates=False),
}
QUICK = {  # the seed's path (tiled in both dtypes); the query family runs quick in the tests below
    "query": {},  # and in tests/test_kernels_packed.py (the rest moved to keep the quick tier under 5 minutes)
    "tiled": {"g2_seed": BOTH},
}


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


def inputs(case: Case, dtype, seed: int, p_valid: float):
    keys = jax.random.split(jax.random.key(seed), 5)
    q = randn(keys[0], (2, case.n, case.heads, case.dim_head), dtype)
    k, v = (randn(key, (2, case.n, case.kv_heads, case.dim_head), dtype) for key in keys[1:3])
    num_blocks = -(-case.n // case.block)
    sh = case.kv_heads if case.shared else case.heads
    indices, valid, gates = random_selection(keys[3], (2, case.n, sh, min(case.num_selected, num_blocks)),
                                             num_blocks, p_valid)
    return q, k, v, indices, valid, gates, keys[4]  # gates float32, as selection makes them


def check(case: Case, dtype, q, k, v, indices, valid, gates, key, settings: SelectedSettings, label: str) -> None:
    kw = dict(block_size=case.block, causal=case.causal)
    if case.gates:
        args, names = (q, k, v, gates), ("q", "k", "v", "gates")
        fn = lambda q, k, v, g: selected_attention(q, k, v, indices, valid, g, settings=settings, **kw)
        ref = lambda q, k, v, g: reference.selected_attention(q, k, v, indices, valid, g, **kw)
    else:
        args, names = (q, k, v), ("q", "k", "v")
        fn = lambda q, k, v: selected_attention(q, k, v, indices, valid, None, settings=settings, **kw)
        ref = lambda q, k, v: reference.selected_attention(q, k, v, indices, valid, None, **kw)
    check_vjp(label, fn, ref, args, names, dtype, key, case=str(case), settings=str(settings))


def impl_grid(named: dict, quick: dict) -> list:
    """(case, dtype, impl) params for both kernel families."""
    return [pytest.param(*p.values, impl, id=f"{impl}-{p.id}", marks=p.marks)
            for impl in ("query", "tiled") for p in grid(named, quick[impl])]


@pytest.mark.parametrize("case,dtype,impl", impl_grid(CASES, QUICK))
def test_selected_attention_kernel_matches_reference(case, dtype, impl):
    settings = SelectedSettings(impl=impl)
    q, k, v, indices, valid, gates, key = inputs(case, dtype, hash(case) % 2**31, 0.6 if not case.causal else 0.8)
    assert layout(q.shape, k.shape, indices.shape, block_size=case.block, settings=settings).impl == impl
    check(case, dtype, q, k, v, indices, valid, gates, key, settings, f"selected {impl}")


def test_default_layouts_are_the_measured_choices():
    """Tiled below 16 rows per selection group, one program per query from 16 rows on."""
    default = SelectedSettings()
    for name, case in CASES.items():
        sh = case.kv_heads if case.shared else case.heads
        lay = layout((2, case.n, case.heads, case.dim_head), (2, case.n, case.kv_heads, case.dim_head),
                     (2, case.n, sh, case.num_selected), block_size=case.block, settings=default)
        assert lay.impl == ("query" if case.group_rows >= 16 else "tiled"), name


@pytest.mark.parametrize("by_range", [True, False])
@pytest.mark.parametrize("case,dtype", grid({n: CASES[n] for n in ("g16_block64", "g16_noncausal_d128")}))
def test_query_kernel_split_dkdv_with_16_row_groups(case, dtype, by_range):
    """The per-query path as the paper's configuration runs it (16-row groups, matrix-unit tiles)
    with each key block's query list split over several programs (by query range or by equal
    counts): float32 partial sums, split ranges, the own-block term in split 0 (causal case)."""
    settings = SelectedSettings(impl="auto", dkv_entries_per_program=1, dkv_range_split_blocks=1 if by_range else 10**6)
    q, k, v, indices, valid, gates, key = inputs(case, dtype, hash(case) % 2**31 + 1, 0.7)
    lay = layout(q.shape, k.shape, indices.shape, block_size=case.block, settings=settings)
    assert (lay.impl, lay.rows, lay.dkv_splits) == ("query", 16, settings.max_dkv_splits), lay
    check(case, dtype, q, k, v, indices, valid, gates, key, settings, "selected query split")


@pytest.mark.parametrize("case,dtype", grid({n: CASES[n] for n in ("g16_block64", "g16_noncausal_d128")},
                                             {}, dtypes=F32_ONLY))
def test_query_dq_recomputed_without_stored_dlogits(case, dtype):
    """`store_dlogits=False`: dq recomputes each block's logits from K and V (the path packed
    documents always take) instead of reading the dk/dv kernel's stored ds."""
    settings = SelectedSettings(impl="query", store_dlogits=False)
    q, k, v, indices, valid, gates, key = inputs(case, dtype, hash(case) % 2**31 + 2, 0.7)
    check(case, dtype, q, k, v, indices, valid, gates, key, settings, "selected query recomputed dq")


@pytest.mark.parametrize("flat,counted", [(True, False), (False, False), (False, True)])
def test_sort_by_block_is_a_stable_sort_per_row(flat, counted, monkeypatch):
    """The inverted index of the dk/dv kernels (all rows in one flat sort keyed by row and block, or
    each row on its own; the block offsets counted by comparisons or scattered from run starts)
    against numpy's stable argsort per row, with the unused key nb and blocks nobody chose."""
    monkeypatch.setattr(_selected_common, "FLAT_SORT_MIN_ENTRIES", 0 if flat else 1 << 30)
    monkeypatch.setattr(_selected_common, "COMPARE_ALL_MAX", 1 << 30 if counted else 0)
    rng = np.random.default_rng(5)
    keys = []
    for rows, e, nb in ((1, 10, 3), (4, 1000, 17), (3, 4096, 64)):
        key = rng.integers(0, nb + 1, (rows, e)).astype(np.int32)
        key[:, : e // 4] = nb // 2  # long runs of one block: stability matters
        keys.append((key, nb))
    # a row that chooses nothing (all entries the unused id 6), and one with unchosen blocks between
    keys.append((np.array([[6, 6, 6, 6, 6, 6, 6, 6], [3, 0, 6, 3, 0, 6, 6, 1]], np.int32), 6))
    for key, nb in keys:
        order, offsets = sort_by_block(jnp.asarray(key), nb)
        want = np.argsort(key, axis=-1, kind="stable")
        np.testing.assert_array_equal(np.asarray(order), want)
        sorted_key = np.take_along_axis(key, want, axis=-1)
        np.testing.assert_array_equal(np.asarray(offsets), [np.searchsorted(r, np.arange(nb + 1)) for r in sorted_key])


@pytest.mark.parametrize("causal,packed", [(True, False), (False, False), (True, True)])
def test_dkdv_split_bounds_are_query_ranges(causal, packed):
    """The per-query dk/dv kernel's split bounds by query range: split s of block j starts at the
    block's first entry whose query reaches the s-th of dkv_splits equal ranges of [first query that
    can pick j, nq) (numpy's searchsorted per block); the packed own-block program gets an empty
    range. By equal counts (below `dkv_range_split_blocks`): the s-th of dkv_splits equal parts."""
    nq, kp, nb, sb, splits, rows = 1000, 4, 16, 64, 5, 3
    cfg = QueryConfig(sb=sb, sbp=sb, nb=nb, nq=nq, num_sel=kp, kp=kp, rows=16, groups_per_kv=1, dkv_splits=splits,
                      causal=causal, scale=1.0, num_warps=2, gate_grad=False, num_stages=2, interpret=True,
                      packed=packed)
    programs = splits + packed
    key = np.random.default_rng(6).integers(0, nb + 1, (rows, nq * kp)).astype(np.int32)
    order, offsets = (np.asarray(x) for x in sort_by_block(jnp.asarray(key), nb))
    qid = order // kp
    bounds = np.asarray(_split_bounds(cfg, jnp.asarray(qid, jnp.int32), jnp.asarray(offsets), programs))
    assert bounds.shape == (rows, nb, programs + 1)
    for r in range(rows):
        for j in range(nb):
            lo = j * sb if causal and not packed else 0
            starts = [0] + [lo + -(-s * (nq - lo) // splits) for s in range(1, splits)] + [nq] * (programs + 1 - splits)
            queries = qid[r, offsets[r, j]:offsets[r, j + 1]]
            assert np.all(np.diff(queries) >= 0)  # ascending within a block, so a binary search applies
            np.testing.assert_array_equal(bounds[r, j], offsets[r, j] + np.searchsorted(queries, starts))
    counts = np.asarray(_split_bounds(dataclasses.replace(cfg, split_by_range=False), jnp.asarray(qid, jnp.int32),
                                      jnp.asarray(offsets), programs))
    per = -(-(offsets[:, 1:] - offsets[:, :-1]) // splits)
    want = np.minimum(offsets[:, :-1, None] + np.minimum(np.arange(programs + 1), splits) * per[..., None],
                      offsets[:, 1:, None])
    np.testing.assert_array_equal(counts, want)


@pytest.mark.slow  # the quick tier runs the unpacked query kernels in test_query_dkdv_chunk_sizes
@pytest.mark.parametrize("store_dlogits", [True, False])
def test_query_kernel_without_gates(store_dlogits):
    """No diff-top-k gates (gates=None, as `nsa_jax.ops` and use_diff_topk=False call it): the dq
    kernels skip the dgate sums; q, k, v gradients unchanged, on both dq paths."""
    case = CASES["g16_block64"]._replace(gates=False)
    settings = SelectedSettings(impl="query", store_dlogits=store_dlogits)
    q, k, v, indices, valid, gates, key = inputs(case, jnp.float32, 77 + store_dlogits, 0.7)
    check(case, jnp.float32, q, k, v, indices, valid, gates, key, settings, "selected query without gates")


@pytest.mark.parametrize("chunk", [pytest.param(1, marks=pytest.mark.slow), 2, pytest.param(8, marks=pytest.mark.slow)])
def test_query_dkdv_chunk_sizes(chunk):
    """The dk/dv kernel's gathered chunks: one query per step, chunks that end mid-list (the
    lists and own-block ranges are not multiples of the chunk), one chunk longer than most lists."""
    case = CASES["g16_noncausal_d128" if chunk == 2 else "g16_block64"]
    settings = SelectedSettings(impl="query", dkv_chunk=chunk, dkv_entries_per_program=3)
    q, k, v, indices, valid, gates, key = inputs(case, jnp.float32, 1000 + chunk, 0.7)
    check(case, jnp.float32, q, k, v, indices, valid, gates, key, settings, f"selected query chunk {chunk}")


TILED_CASES = {n: CASES[n] for n in ("g1_block4", "g1_block4_noncausal", "per_head_block6")}


@pytest.mark.parametrize("tile_rows", [64, 128])
@pytest.mark.parametrize("case,dtype", grid(TILED_CASES, dtypes=[jnp.float32]))
def test_tiled_kernel_tile_sizes(case, dtype, tile_rows):
    """Tiles larger than the default 16 rows (many own blocks per tile), dk/dv over the tiles too."""
    settings = SelectedSettings(impl="tiled", tile_rows=tile_rows, tiled_dkv="tiles")
    q, k, v, indices, valid, gates, key = inputs(case, dtype, hash(case) % 2**31 + 2, 0.7)
    check(case, dtype, q, k, v, indices, valid, gates, key, settings, "selected tiled")


@pytest.mark.parametrize("case,dtype", grid({n: TILED_CASES[n] for n in ("g1_block4", "per_head_block6")}))
def test_tiled_kernel_split_dkdv(case, dtype):
    """The tiled dk/dv kernel with each block's tile list split over several programs."""
    settings = SelectedSettings(impl="tiled", tile_rows=16, tiles_per_dkv_split=1, tiled_dkv="tiles")
    assert tile_layout(case.n, case.group_rows, settings)[2] > 1
    q, k, v, indices, valid, gates, key = inputs(case, dtype, hash(case) % 2**31 + 3, 0.7)
    check(case, dtype, q, k, v, indices, valid, gates, key, settings, "selected tiled split")


@pytest.mark.parametrize("case,dtype", grid({n: CASES[n] for n in ("g2_seed", "g2_noncausal_nogates", "g1_block4",
                                                                    "per_head_block6", "k0")}, {"g2_seed": F32_ONLY}))
def test_tiled_kernels_with_dkdv_by_tiles(case, dtype):
    """The tiled family's own dk/dv kernel (tiled_dkv="tiles": what packed sequences take; the
    grid above runs the default, dk/dv from the per-query family's kernel)."""
    settings = SelectedSettings(impl="tiled", tiled_dkv="tiles")
    q, k, v, indices, valid, gates, key = inputs(case, dtype, hash(case) % 2**31 + 5, 0.7)
    check(case, dtype, q, k, v, indices, valid, gates, key, settings, "selected tiled, dk/dv by tiles")


@pytest.mark.parametrize("case,dtype", grid({n: CASES[n] for n in ("g2_seed", "g2_noncausal_nogates", "g1_block4",
                                                                    "per_head_block6", "k0")}, {"g2_seed": F32_ONLY}))
def test_tiled_kernels_with_dq_by_tiles(case, dtype):
    """dk/dv from the per-query family's kernel, dq from the tiled dq kernel (tiled_dq="tiles";
    the grid above runs the default, dq from the dlogits that dk/dv kernel stores)."""
    settings = SelectedSettings(impl="tiled", tiled_dq="tiles")
    q, k, v, indices, valid, gates, key = inputs(case, dtype, hash(case) % 2**31 + 6, 0.7)
    check(case, dtype, q, k, v, indices, valid, gates, key, settings, "selected tiled, dq by tiles")


@pytest.mark.slow
@pytest.mark.parametrize("chunk", [1, 64])
def test_tiled_dkdv_by_query_chunks(chunk):
    """tiled_dkv="queries" with fewer queries a step than the matrix unit's rows (raised to 16
    rows) and with more than most blocks' lists hold."""
    case = CASES["g2_seed"]
    settings = SelectedSettings(impl="tiled", tiled_dkv_chunk=chunk)
    q, k, v, indices, valid, gates, key = inputs(case, jnp.float32, 2000 + chunk, 0.7)
    check(case, jnp.float32, q, k, v, indices, valid, gates, key, settings, f"selected tiled, query chunk {chunk}")


# Selections as the module makes them (top-k of the compressed scores; causal: past blocks
# only), with diff-top-k gates.
PIPELINE_CASES = {
    "seed_like": Case(120, 8, 4, 64, 16, 4, True),
    "g16": Case(200, 16, 1, 128, 32, 4, True),
    "per_head_noncausal": Case(90, 8, 2, 32, 8, 3, False, shared=False),
}


@pytest.mark.parametrize("case,dtype,impl", impl_grid(PIPELINE_CASES, {"query": {}, "tiled": {}}))
def test_selected_attention_kernel_with_module_selection(case, dtype, impl):
    keys = jax.random.split(jax.random.key(hash(case) % 2**31), 6)
    q = randn(keys[0], (2, case.n, case.heads, case.dim_head), dtype)
    k, v = (randn(key, (2, case.n, case.kv_heads, case.dim_head), dtype) for key in keys[1:3])
    stride = case.block // 2
    ck = randn(keys[3], (2, 1 + case.n // stride, case.kv_heads, case.dim_head), jnp.float32)
    values, indices = reference.select_blocks(
        q.astype(jnp.float32), ck, num_mem=1, stride=stride, causal=case.causal, share_heads=case.shared,
        num_selected=case.num_selected, selection_block_size=case.block)
    valid = reference.valid_selection(values)
    check(case, dtype, q, k, v, indices, valid, values, keys[5], SelectedSettings(impl=impl),
          f"selected {impl}")


@pytest.mark.parametrize("causal,option", [(True, 0), pytest.param(False, 5, marks=pytest.mark.slow)])
def test_sparse_attention_pallas_backend_matches_reference(causal, option):
    """The whole module on both backends: output and every parameter gradient (float32)."""
    from flax import nnx

    from test_sparse_attention import OPTIONS, make

    kw = dict(causal=causal, **OPTIONS[option].kwargs())
    x = jax.random.normal(jax.random.key(option), (2, 45, 32))
    results = []
    for use_pallas in (True, False):
        attn = make(option, use_pallas_nsa=use_pallas, **kw)
        assert attn.backend.name == ("pallas" if use_pallas else "reference")
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


@pytest.mark.parametrize("make,message", [
    (lambda: SelectedSettings(impl="fast"), "impl must be one of auto, query, tiled, xla"),
    (lambda: SelectedSettings(tile_rows=0), "tile_rows must be >= 1"),
    (lambda: SelectedSettings(dkv_chunk=3), "dkv_chunk must be a power of two"),
    (lambda: SelectionSettings(rows=48), "rows must be a power of two"),
    (lambda: KernelSettings(sliding_impl="flash"), "sliding_impl must be one of auto, pallas, cudnn, xla"),
    (lambda: KernelSettings(compressed_impl="dense"), "compressed_impl must be one of auto, pallas, mosaic, cudnn, xla"),
    (lambda: SelectionSettings(impl="kernel"), "impl must be one of pallas, xla"),
    (lambda: SelectedSettings(dq_num_stages=0), "dq_num_stages must be >= 1"),
    (lambda: SelectedSettings(dq_num_warps=0), "dq_num_warps must be >= 1"),
    (lambda: SelectedSettings(tiled_dkv_num_warps=0), "tiled_dkv_num_warps must be >= 1"),
    (lambda: SelectedSettings(tiled_dkv="atomic"), "tiled_dkv must be tiles or queries"),
    (lambda: SelectedSettings(tiled_dkv_chunk=12), "tiled_dkv_chunk must be a power of two"),
    (lambda: SelectedSettings(tiled_dq="fused"), "tiled_dq must be tiles or stored"),
])
def test_kernel_settings_reject_unknown_values(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_kernel_settings_are_static_and_hashable():
    """Settings are jit-static: equal settings hash equal, so they reuse one compiled program."""
    a, b = KernelSettings(selected=SelectedSettings(tile_rows=32)), KernelSettings(
        selected=SelectedSettings(tile_rows=32))
    assert a == b and hash(a) == hash(b) and a != KernelSettings()
    with pytest.raises(AttributeError):
        a.sliding_impl = "cudnn"  # frozen
    assert Tiles().dkv_target_programs == 16 * 132


@pytest.mark.parametrize("case,dtype", grid({n: CASES[n] for n in ("g2_seed", "g1_block4_noncausal")}, {}))
def test_selected_attention_xla_matches_reference(case, dtype):
    """impl="xla": the reference's dense masked attention, its backward recomputing the logits."""
    q, k, v, indices, valid, gates, key = inputs(case, dtype, hash(case) % 2**31, 0.6 if not case.causal else 0.8)
    check(case, dtype, q, k, v, indices, valid, gates, key, SelectedSettings(impl="xla"), "selected xla")


SHARD_CASES = {  # (case, shards): the tiled family (the seed's 2 heads per kv head), the query family (16)
    "tiled": (Case(128, 8, 4, 64, 16, 4, True), 2),
    "query": (Case(256, 32, 2, 64, 32, 3, True), 4),
}


@pytest.mark.slow  # the quick tier runs the tiled path in tests/test_context.py's train step
@pytest.mark.parametrize("impl", ["tiled", "query"])
def test_sequence_shard_attends_as_its_rows_of_the_whole(impl):
    """Context parallelism (`kernels.shard_attention.selected_attention_shard`): each shard's
    queries, with its own keys and the whole sequence's, give the reference's output for
    queries at their positions, and the same gradients in q, the whole sequence's k and v, and
    the gates. Picks as causal selection makes them: only blocks before the query's own are
    valid."""
    from kernels.shard_attention import selected_attention_shard

    case, shards = SHARD_CASES[impl]
    settings = SelectedSettings(impl=impl)
    q, k, v, indices, valid, gates, key = inputs(case, jnp.float32, 11, 0.8)
    blocks = jnp.arange(case.n)[None, :, None, None] // case.block
    valid = valid & (indices < blocks)
    n = case.n // shards
    for shard in (0, shards - 1):
        rows = slice(shard * n, (shard + 1) * n)
        idx, ok = indices[:, rows], valid[:, rows]

        def fn(q, k, v, g):
            return selected_attention_shard(q, k[:, rows], v[:, rows], k, v, idx, ok, g, block_size=case.block,
                                            scale=case.dim_head**-0.5, settings=settings)

        def ref(q, k, v, g):
            return reference.selected_attention(q, k, v, idx, ok, g, block_size=case.block, causal=True,
                                                q_positions=shard * n + jnp.arange(n))

        check_vjp(f"selected {impl} shard", fn, ref, (q[:, rows], k, v, gates[:, rows]), ("q", "k", "v", "gates"),
                  jnp.float32, key, case=str(case), shard=shard)


@pytest.mark.parametrize("config", ["seed", "fla"])
def test_no_while_loop_outside_the_kernels(config):
    """The core's forward and backward run no XLA while loop (each costs a few kernels per step and
    may wait on the host): the dk/dv range splits' binary search, forced on here (in the seed's
    step it ran 17 steps x 4 kernels per layer at T = 16384), is unrolled. Traced only."""
    from bench.core import CONFIGS, branch_fns

    cfg = CONFIGS[config]
    settings = KernelSettings(selected=SelectedSettings(dkv_range_split_blocks=1, dkv_entries_per_program=1,
                                                        tiled_dkv_entries_per_program=1))
    n, h, kh, d, cs = 1024, cfg["heads"], cfg["kv_heads"], cfg["dim_head"], cfg["stride"]
    shapes = [(1, n, h, d), (1, n, kh, d), (1, n, kh, d), (1, 1 + n // cs, kh, d), (1, 1 + n // cs, kh, d)]
    inputs = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in shapes]
    core = branch_fns(cfg, settings)["core"]
    grad = jax.grad(lambda *a: jnp.sum(core(*a).astype(jnp.float32)), argnums=(0, 1, 2, 3, 4))
    jaxpr = jax.make_jaxpr(grad)(*inputs).jaxpr
    assert not loops_outside_kernels(jaxpr)
    calls = str(jaxpr).count("pallas_call")
    assert calls >= 4, f"expected the Pallas kernels in the traced core, found {calls} pallas_call"

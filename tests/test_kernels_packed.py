"""The Pallas kernels with packed documents (segments) against the reference with the same
segments (which tests/test_segments.py checks against each document alone): outputs and every
gradient, causal and non-causal, in documents shorter than a block, one block and many."""

from __future__ import annotations

import zlib
from typing import NamedTuple

import jax
import numpy as np
import pytest

from kernel_testing import F32_ONLY, assert_close, check_vjp, grid, randn
from kernels.compressed_attention import compressed_attention
from kernels.settings import Tiles
from kernels.sliding_window import sliding_window_attention
from nsa_jax import reference
from nsa_jax import segments as seg

LENGTHS = {"short": (3, 5, 2, 7, 6), "one_block": (16, 16, 16), "many": (3, 16, 41, 7, 60)}


class Case(NamedTuple):
    lengths: str
    heads: int
    kv_heads: int
    dim_head: int
    causal: bool
    stride: int = 4  # compressed
    num_mem: int = 1  # compressed
    window: int = 5  # sliding
    mask_padding: bool = False  # sliding


def seed_of(case: tuple) -> int:
    """A seed fixed by the case's fields. (`hash` of a tuple with strings changes from process
    to process, which made these inputs, and a bf16 error near its tolerance, differ per run.)"""
    return zlib.crc32(repr(case).encode())


def packed(case: Case) -> seg.Segments:
    """Two rows: the documents in order, and reversed (other offsets)."""
    lengths = LENGTHS[case.lengths]
    rows = [np.concatenate([np.full(length, i) for i, length in enumerate(order)])
            for order in (lengths, lengths[::-1])]
    return seg.from_ids(np.stack(rows))


COMPRESSED = {
    "g2_causal_many": Case("many", 4, 2, 32, True),
    "g2_noncausal_short": Case("short", 4, 2, 32, False),
    "g1_causal_one_block_mem2": Case("one_block", 2, 2, 32, True, stride=8, num_mem=2),
    "g16_causal_many_d128": Case("many", 16, 1, 128, True, stride=16),
}
SLIDING = {
    "g2_causal_many": Case("many", 4, 2, 32, True),
    "g2_noncausal_quirk_short": Case("short", 4, 2, 32, False),
    "g2_noncausal_quirk_many_window8": Case("many", 4, 2, 32, False, window=8),
    "g4_noncausal_masked_many": Case("many", 8, 2, 64, False, mask_padding=True),
    "g1_causal_window0_one_block": Case("one_block", 2, 2, 32, True, window=0),
}


@pytest.mark.parametrize("case,dtype", grid(COMPRESSED, {"g2_causal_many": F32_ONLY}))
def test_compressed_attention_packed_matches_reference(case, dtype):
    segments = packed(case)
    b, n = segments.start.shape
    keys = jax.random.split(jax.random.key(seed_of(case)), 4)
    nk = case.num_mem + n // case.stride
    q = randn(keys[0], (b, n, case.heads, case.dim_head), dtype)
    ck, cv = (randn(key, (b, nk, case.kv_heads, case.dim_head), dtype) for key in keys[1:3])
    kw = dict(num_mem=case.num_mem, stride=case.stride, causal=case.causal)
    check_vjp("compressed_packed", lambda q, ck, cv: compressed_attention(q, ck, cv, segments, **kw),
              lambda q, ck, cv: reference.compressed_attention(q, ck, cv, segments=segments, **kw),
              (q, ck, cv), ("q", "ck", "cv"), dtype, keys[3], case=str(case))


# impl "xla" (dense masked, recomputed in the backward): the slow tier. "fused": the Pallas kernel
# with Tiles(window_bwd="fused").
@pytest.mark.parametrize("case,dtype,impl", [
    pytest.param(*p.values, impl, id=f"{impl}-{p.id}", marks=p.marks)
    for impl, quick in (("pallas", {"g2_noncausal_quirk_short": F32_ONLY}), ("xla", {}),
                        ("fused", {"g2_causal_many": F32_ONLY}))
    for p in grid(SLIDING, quick)])
def test_sliding_window_packed_matches_reference(case, dtype, impl):
    segments = packed(case)
    b, n = segments.start.shape
    keys = jax.random.split(jax.random.key(seed_of(case)), 4)
    q = randn(keys[0], (b, n, case.heads, case.dim_head), dtype)
    k, v = (randn(key, (b, n, case.kv_heads, case.dim_head), dtype) for key in keys[1:3])
    kw = dict(window=case.window, causal=case.causal, mask_padding=case.mask_padding)
    how = dict(impl="pallas", tiles=Tiles(window_bwd="fused")) if impl == "fused" else dict(impl=impl)
    check_vjp(f"sliding_packed_{impl}", lambda q, k, v: sliding_window_attention(q, k, v, segments, **how, **kw),
              lambda q, k, v: reference.sliding_window_attention(q, k, v, segments=segments, **kw),
              (q, k, v), ("q", "k", "v"), dtype, keys[3], case=str(case))


class SelectionCase(NamedTuple):
    lengths: str
    heads: int
    kv_heads: int
    dim_head: int
    stride: int
    block: int
    num_selected: int
    causal: bool
    shared: bool
    interpolated: bool = False


SELECTION = {
    "seed_like_many": SelectionCase("many", 8, 4, 64, 4, 4, 3, True, True),
    "block8_per_head_short": SelectionCase("short", 4, 2, 32, 4, 8, 2, True, False),
    "noncausal_block8_many": SelectionCase("many", 4, 2, 32, 4, 8, 2, False, True),
    "interpolated6_one_block": SelectionCase("one_block", 4, 2, 32, 4, 6, 2, True, True, True),
    "interpolated2_noncausal_per_head_many": SelectionCase("many", 4, 2, 32, 4, 2, 3, False, False, True),
}


def reference_block_probabilities(q, ck, segments, kw) -> np.ndarray:
    """The reference's probability of every block slot, [b * n * sh, block slots] (float64)."""
    import jax.numpy as jnp

    with jax.default_matmul_precision("highest"):
        scores = reference.importance_scores(q.astype(np.float32), ck.astype(np.float32), num_mem=kw["num_mem"],
                                             stride=kw["stride"], causal=kw["causal"],
                                             share_heads=kw["share_heads"], segments=segments)
        blocks = reference.block_importance(scores, selection_block_size=kw["selection_block_size"],
                                            stride=kw["stride"], interpolated=kw["interpolated"], segments=segments)
        padded = jnp.concatenate([jnp.full((*blocks.shape[:-1], 1), reference.IMPORTANCE_PAD_LOGIT), blocks], -1)
        probs = jax.nn.softmax(padded, axis=-1)[..., 1:]
    return np.asarray(probs, np.float64).reshape(-1, probs.shape[-1])


@pytest.mark.parametrize("case,dtype", grid(SELECTION, {"seed_like_many": F32_ONLY, "noncausal_block8_many": F32_ONLY}))
def test_select_blocks_packed_matches_reference(case, dtype):
    from test_kernels_selection import rows_without_valid_pick, valid_picks

    from kernels.selection import select_blocks

    lengths = LENGTHS[case.lengths]
    segments = packed(Case(case.lengths, 1, 1, 1, True))
    b, n = segments.start.shape
    keys = jax.random.split(jax.random.key(seed_of(case)), 3)
    q = randn(keys[0], (b, n, case.heads, case.dim_head), dtype)
    ck = randn(keys[1], (b, 1 + n // case.stride, case.kv_heads, case.dim_head), dtype)
    kw = dict(num_mem=1, stride=case.stride, causal=case.causal, share_heads=case.shared,
              num_selected=case.num_selected, selection_block_size=case.block, interpolated=case.interpolated)
    values, indices = jax.jit(lambda q, ck: select_blocks(q, ck, segments, **kw))(q, ck)
    with jax.default_matmul_precision("highest"):
        ref = lambda q, ck: reference.select_blocks(q, ck, segments=segments, **kw)  # noqa: E731
        ref_values, ref_indices = jax.jit(ref)(q.astype(np.float32), ck.astype(np.float32))
    assert values.shape == ref_values.shape
    np.testing.assert_array_equal(indices == reference.NO_PICK, ref_indices == reference.NO_PICK)
    got, want = valid_picks(values, indices), valid_picks(ref_values, ref_indices)
    differ = [r for r, (a, w) in enumerate(zip(got, want)) if sorted(a) != sorted(w)]
    if differ:  # allowed only between blocks whose logits tie to float rounding (`kernels.selection`)
        probs = reference_block_probabilities(q, ck, segments, kw)  # [rows, block slots]
        first = np.repeat(np.asarray(segments.start // case.block).reshape(-1), values.shape[2])
        for r in differ:
            mine = sorted(probs[r, [i + first[r] for i in got[r]]])
            theirs = sorted(probs[r, [i + first[r] for i in want[r]]])
            np.testing.assert_allclose(mine, theirs, rtol=1e-5, err_msg=f"different valid blocks ({lengths}), row {r}")
    assert len(differ) <= max(1, len(got) // 100), f"{len(differ)} rows pick other blocks ({lengths})"
    got = [p for r, p in enumerate(got) if r not in differ]  # the rest pick the same blocks
    want = [p for r, p in enumerate(want) if r not in differ]
    if not case.causal:
        assert rows_without_valid_pick(values, indices) == rows_without_valid_pick(ref_values, ref_indices)
    if not any(want):  # documents too short for a block: every slot is NO_PICK (checked above)
        assert np.all(np.asarray(ref_indices) == reference.NO_PICK)
        return
    gp = np.array([p[i] for p in got for i in sorted(p)])
    wp = np.array([p[i] for p in want for i in sorted(p)])
    assert_close("selection_packed", "probabilities", gp, wp, np.float32, case=str(case))
    weights = randn(keys[2], values.shape) * reference.valid_selection(ref_values)
    loss = lambda fn, q, ck: (fn(q, ck)[0] * weights).sum()  # noqa: E731
    grads = jax.jit(jax.grad(lambda q, ck: loss(lambda a, c: select_blocks(a, c, segments, **kw), q, ck),
                             argnums=(0, 1)))(q, ck)
    with jax.default_matmul_precision("highest"):
        ref_grads = jax.jit(jax.grad(lambda q, ck: loss(ref, q, ck), argnums=(0, 1)))(
            q.astype(np.float32), ck.astype(np.float32))
    for name, g, r in zip(("q", "ck"), grads, ref_grads):
        assert_close("selection_packed", f"d{name}", g, r, np.float32 if dtype == np.float32 else dtype,
                     case=str(case))


class SelectedCase(NamedTuple):
    lengths: str
    heads: int
    kv_heads: int
    dim_head: int
    block: int
    num_selected: int
    causal: bool
    shared: bool = True

    @property
    def group_rows(self) -> int:
        return self.heads // self.kv_heads if self.shared else 1


SELECTED = {  # block 8: "short" documents have no full block (every pick NO_PICK), "one_block" two
    "g2_causal_many": SelectedCase("many", 4, 2, 32, 8, 2, True),
    "g2_noncausal_short": SelectedCase("short", 4, 2, 32, 8, 2, False),
    "g2_noncausal_many": SelectedCase("many", 4, 2, 32, 8, 2, False),
    "per_head_block4_causal_one_block": SelectedCase("one_block", 4, 2, 32, 4, 3, True, shared=False),
    "per_head_block4_noncausal_many": SelectedCase("many", 4, 2, 32, 4, 3, False, shared=False),
    "g16_causal_many_d64": SelectedCase("many", 16, 1, 64, 16, 2, True),
    "g16_noncausal_one_block": SelectedCase("one_block", 16, 1, 64, 16, 1, False),
}
SELECTED_QUICK = {"tiled": {"g2_causal_many": F32_ONLY, "g2_noncausal_short": F32_ONLY},
                  "query": {"g16_causal_many_d64": F32_ONLY}}


def packed_selection(key, segments: seg.Segments, case: SelectedCase, p_valid: float):
    """Distinct random blocks of each query's own document (local indices), NO_PICK past the
    document's full blocks, random validity (some rows with none valid) and gates around 1."""
    import jax.numpy as jnp

    b, n = segments.start.shape
    sh = case.kv_heads if case.shared else case.heads
    most = max(n // case.block, case.num_selected)
    k_order, k_valid, k_gate = jax.random.split(key, 3)
    blocks = (segments.lengths // case.block)[:, :, None, None]  # [b, n, 1, 1] full blocks of the document
    r = jnp.where(jnp.arange(most) < blocks, jax.random.uniform(k_order, (b, n, sh, most)), 2.0)
    kept = jnp.arange(case.num_selected) < blocks
    indices = jnp.where(kept, jnp.argsort(r, axis=-1)[..., : case.num_selected], reference.NO_PICK)
    valid = (jax.random.uniform(k_valid, indices.shape) < p_valid) & kept
    gates = jnp.where(kept, 1.0 + 0.5 * jax.random.normal(k_gate, indices.shape), 0.0)
    return indices.astype(jnp.int32), valid, gates


def selected_grid() -> list:
    return [pytest.param(*p.values, impl, id=f"{impl}-{p.id}", marks=p.marks)
            for impl in ("query", "tiled") for p in grid(SELECTED, SELECTED_QUICK[impl])]


@pytest.mark.parametrize("case,dtype,impl", selected_grid())
def test_selected_attention_packed_matches_reference(case, dtype, impl):
    from kernels.selected_attention import layout, selected_attention
    from kernels.settings import SelectedSettings

    segments = packed(Case(case.lengths, 1, 1, 1, True))
    b, n = segments.start.shape
    keys = jax.random.split(jax.random.key(seed_of(case)), 5)
    q = randn(keys[0], (b, n, case.heads, case.dim_head), dtype)
    k, v = (randn(key, (b, n, case.kv_heads, case.dim_head), dtype) for key in keys[1:3])
    indices, valid, gates = packed_selection(keys[3], segments, case, 0.8 if case.causal else 0.6)
    # Split dk/dv query lists too (the paper's heavily selected early blocks).
    settings = SelectedSettings(impl=impl, dkv_entries_per_program=1, tiles_per_dkv_split=1)
    lay = layout(q.shape, k.shape, indices.shape, block_size=case.block, settings=settings)
    assert lay.impl == impl and (impl == "tiled" or lay.dkv_splits > 1), lay
    if impl == "tiled" and case.lengths == "many":  # the split tile lists (the quick tier's only check of them)
        from kernels.selected_tiled import tile_layout

        assert tile_layout(n, lay.rows, settings)[2] > 1
    kw = dict(block_size=case.block, causal=case.causal)
    check_vjp(f"selected_packed_{impl}",
              lambda q, k, v, g: selected_attention(q, k, v, indices, valid, g, segments, settings=settings, **kw),
              lambda q, k, v, g: reference.selected_attention(q, k, v, indices, valid, g, segments=segments, **kw),
              (q, k, v, gates), ("q", "k", "v", "gates"), dtype, keys[4], case=str(case))


@pytest.mark.parametrize("case,dtype", grid(SELECTED, {}))
def test_selected_attention_packed_xla_matches_reference(case, dtype):
    """impl="xla" (dense masked, recomputed in the backward) with packed documents."""
    from kernels.selected_attention import selected_attention
    from kernels.settings import SelectedSettings

    segments = packed(Case(case.lengths, 1, 1, 1, True))
    b, n = segments.start.shape
    keys = jax.random.split(jax.random.key(seed_of(case) + 1), 5)
    q = randn(keys[0], (b, n, case.heads, case.dim_head), dtype)
    k, v = (randn(key, (b, n, case.kv_heads, case.dim_head), dtype) for key in keys[1:3])
    indices, valid, gates = packed_selection(keys[3], segments, case, 0.8 if case.causal else 0.6)
    kw = dict(block_size=case.block, causal=case.causal)
    settings = SelectedSettings(impl="xla")
    check_vjp("selected_packed_xla",
              lambda q, k, v, g: selected_attention(q, k, v, indices, valid, g, segments, settings=settings, **kw),
              lambda q, k, v, g: reference.selected_attention(q, k, v, indices, valid, g, segments=segments, **kw),
              (q, k, v, gates), ("q", "k", "v", "gates"), dtype, keys[4], case=str(case))

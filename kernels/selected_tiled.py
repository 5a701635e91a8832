"""Selected attention over tiles of queries: the small-group variant of `selected_attention`.

With few query heads per kv head (the seed model's g = 2), one program per query leaves the
tensor cores idle (2-row tiles) and loads every selected K/V block once per query. Here one
program takes BQ consecutive queries of one selection group (BQ * g rows) and walks the
union of the blocks they selected (deduplicated and sorted in XLA, counted by the kernel):
each block's K/V is loaded once per tile, the [rows, keys] logits come from one matmul, and
rows that did not select the block are masked. The own (diagonal) blocks of the tile follow.
Forward and dq kernels share this walk. dk/dv: a third kernel, one program per (key block,
split, batch, group), walks the transpose of the candidate lists (the tiles that walked the
block, sorted in XLA, heavily selected blocks split over programs) and then the tiles holding
the block's own queries: no atomics, deterministic. Those kernels serve packed sequences;
unpacked, the backward comes by default from `kernels.selected_query`'s kernels instead: dk/dv
over the queries that picked each block rather than the tiles that walked it, storing the
dlogits from which dq then reads K alone (`SelectedSettings.tiled_dkv`, `tiled_dq`).

Same contract and numerics as `nsa_jax.reference.selected_attention`, provided the valid
indices of a query are distinct (selections made by top-k are). The default for selection
groups of fewer than 16 rows (`SelectedSettings.impl`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels._common import (
    F32, LOG2E, MASK_VALUE, MIN_DOT, add_phantom_keys, compiler_params, interpret_mode, iota, mm,
    online_softmax_step, pad_axis, round_up, softmax_delta, softmax_finish, softmax_init, tokens_to_rows,
)
from kernels._selected_common import (
    Packed, SelectedConfig, own_block_range, own_keys, slot_tiles_to_keys, sort_by_block,
)
from kernels.selected_query import QueryConfig, query_dkdv, query_dq_from_stored
from kernels.settings import SelectedSettings


@dataclasses.dataclass(frozen=True)
class TiledConfig(SelectedConfig):
    bq: int  # queries per tile
    dkv_splits: int = 1  # programs sharing one key block's tile list in the dk/dv kernel
    dkv_num_warps: int = 2  # the dk/dv kernel's (num_warps: the forward's and dq's)
    by_query: QueryConfig | None = None  # dk/dv by the per-query family's kernel (unpacked only)

    @property
    def tile_rows(self) -> int:
        return self.bq * self.rows

    @property
    def max_blocks(self) -> int:  # candidate list length per tile
        return self.bq * self.kp


def _flat(cfg: TiledConfig, x):
    """[bq, rows, ...] (the caller's layout of a tile) -> [R, ...] (the tile's rows)."""
    return x.reshape(cfg.tile_rows, *x.shape[2:])


def _unflat(cfg: TiledConfig, x):
    """[R, ...] -> [bq, rows, ...]."""
    return x.reshape(cfg.bq, cfg.rows, *x.shape[1:])


def _bounds(cfg: TiledConfig, bounds_refs, queries=slice(None)):
    """Packed: the document bounds (start, end) of each row of a tile (its `queries` of the
    per-query refs); else None."""
    return None if bounds_refs is None else tuple(tokens_to_rows(x[queries], cfg.rows) for x in bounds_refs)


def _row_state(cfg: TiledConfig, idx_ref, valid_ref, tile=None, queries=slice(None)):
    """Per row of a tile (this program's, or `tile` with its `queries` of the refs, which hold
    one entry per query): its query, its selection [R, kp], validity and the zero-row flag."""
    tile = pl.program_id(0) if tile is None else tile
    t = tile * cfg.bq + lax.div(iota(cfg.tile_rows), cfg.rows)  # [R] query of each row
    idx = tokens_to_rows(idx_ref[queries, :], cfg.rows)  # [R, kp]
    valid = (tokens_to_rows(valid_ref[queries, :], cfg.rows) > 0) & (iota(cfg.kp) < cfg.num_sel)[None, :]
    zero_row = jnp.logical_not(jnp.max(jnp.where(valid, 1, 0), axis=1) > 0)  # [R]
    return t, idx, valid, zero_row


def _member(cfg: TiledConfig, blk, t, idx, valid, zero_row, gate):
    """Rows that attend block blk among their selected blocks, and their gate for it."""
    slot_ok = (iota(cfg.kp) < cfg.num_sel)[None, :]
    hit = (idx == blk) & slot_ok
    chosen = hit & valid
    if cfg.zero_rows_possible:  # a row with no valid block attends all its selected blocks
        chosen = chosen | (hit & zero_row[:, None])
    member = (jnp.max(jnp.where(chosen, 1, 0), axis=1) > 0) & (t < cfg.nq)  # [R]
    row_gate = jnp.sum(jnp.where(chosen, gate, 0.0), axis=1)  # [R]
    return member, row_gate, chosen


def _own_rows(cfg: TiledConfig, t, bounds):
    """The rows' queries and document bounds as `own_keys` takes them ([R, 1]), and which rows
    are real queries [R, 1]."""
    bounds = None if bounds is None else (bounds[0][:, None], bounds[1][:, None])
    return t[:, None], bounds, (t < cfg.nq)[:, None]


def _own_mask(cfg: TiledConfig, o, t, idx, valid, bounds):
    """[R, sbp] keys of the aligned key block o (tokens o * sb + ...) that each row attends as its own."""
    tr, br, real = _own_rows(cfg, t, bounds)
    mask, _ = own_keys(cfg, tr, o * cfg.sb + iota(cfg.sbp)[None, :], br, idx, valid)
    return mask & real & (iota(cfg.sbp) < cfg.sb)[None, :]


def _own_range(cfg: TiledConfig, tile, t=None, bounds=None):
    """First and last aligned key block holding own-block keys of the queries of `tile` (its
    rows' queries t and document bounds when packed: an own block starts anywhere)."""
    if cfg.packed:
        lo, hi, _ = own_block_range(cfg, t, bounds)  # [R]
        if cfg.causal:
            hi = jnp.minimum(hi, t + 1)
        real = t < cfg.nq
        first = jnp.min(jnp.where(real, lo, cfg.nb * cfg.sb))
        last = jnp.max(jnp.where(real, hi, 1)) - 1
        return lax.div(first, cfg.sb), jnp.minimum(lax.div(last, cfg.sb), cfg.nb - 1)
    first = lax.div(tile * cfg.bq, cfg.sb)
    last = jnp.minimum(lax.div(jnp.minimum(tile * cfg.bq + cfg.bq, cfg.nq) - 1, cfg.sb), cfg.nb - 1)
    return first, last


def _block_start(cfg: TiledConfig, blk, slot_ref):
    """First key token of selected block (slot) blk."""
    return slot_ref[blk] if cfg.packed else blk * cfg.sb


def _split_refs(cfg: TiledConfig, refs, outputs: int):
    """(packed bounds (start, end) refs, slot table ref, own queries ref (dk/dv) or Nones; output refs)."""
    *packed, = refs[:len(refs) - outputs]
    out = refs[len(refs) - outputs:]
    if not cfg.packed:
        return None, None, None, out
    return (packed[0], packed[1]), packed[2], (packed[3] if len(packed) > 3 else None), out


def _fwd_kernel(q_ref, k_ref, v_ref, idx_ref, valid_ref, gate_ref, cand_ref, *refs, cfg: TiledConfig):
    bounds_refs, slot_ref, _, (o_ref, lse_ref) = _split_refs(cfg, refs, 2)
    q = _flat(cfg, q_ref[...])  # [R, d]
    c = cfg.scale * LOG2E
    t, idx, valid, zero_row = _row_state(cfg, idx_ref, valid_ref)
    bounds = _bounds(cfg, bounds_refs)
    gate = tokens_to_rows(gate_ref[...], cfg.rows)
    in_block = (iota(cfg.sbp) < cfg.sb)[None, :]

    def body(i, carry):
        blk = cand_ref[i]
        member, row_gate, _ = _member(cfg, blk, t, idx, valid, zero_row, gate)
        start = _block_start(cfg, blk, slot_ref)
        kb = k_ref[pl.ds(start, cfg.sbp), :]
        vb = v_ref[pl.ds(start, cfg.sbp), :]
        s = mm(q, kb, trans_b=True) * (row_gate * c)[:, None]  # [R, sbp]
        if cfg.zero_rows_possible:
            s = jnp.where(zero_row[:, None], 0.0, s)
        return online_softmax_step(carry, jnp.where(in_block & member[:, None], s, MASK_VALUE), vb)

    carry = lax.fori_loop(0, _walked(cfg, cand_ref), body, softmax_init(*q.shape))
    if cfg.own_block:
        first, last = _own_range(cfg, pl.program_id(0), t, bounds)

        def own(o, carry):
            kb = k_ref[pl.ds(o * cfg.sb, cfg.sbp), :]
            vb = v_ref[pl.ds(o * cfg.sb, cfg.sbp), :]
            s = mm(q, kb, trans_b=True) * c
            return online_softmax_step(carry, jnp.where(_own_mask(cfg, o, t, idx, valid, bounds), s, MASK_VALUE), vb)

        carry = lax.fori_loop(first, last + 1, own, carry)
        if cfg.phantom_keys:
            tr, br, real = _own_rows(cfg, t, bounds)
            _, phantom = own_keys(cfg, tr, tr, br, idx, valid)
            carry = add_phantom_keys(carry, jnp.where(real, phantom, 0)[:, 0].astype(F32))
    o, lse = softmax_finish(carry)
    o_ref[...] = _unflat(cfg, o).astype(o_ref.dtype)
    lse_ref[...] = _unflat(cfg, lse)


def _dq_kernel(q_ref, k_ref, v_ref, idx_ref, valid_ref, gate_ref, cand_ref, do_ref, lse_ref, delta_ref,
               *refs, cfg: TiledConfig):
    """dq and the dgates of the tile's queries [bq, kp] (a query's rows summed)."""
    bounds_refs, slot_ref, _, (dq_ref, dgate_ref) = _split_refs(cfg, refs, 2)
    q = _flat(cfg, q_ref[...])
    do = _flat(cfg, do_ref[...])
    lse = _flat(cfg, lse_ref[...])[:, None]
    delta = _flat(cfg, delta_ref[...])[:, None]
    c = cfg.scale * LOG2E
    t, idx, valid, zero_row = _row_state(cfg, idx_ref, valid_ref)
    bounds = _bounds(cfg, bounds_refs)
    gate = tokens_to_rows(gate_ref[...], cfg.rows)
    in_block = (iota(cfg.sbp) < cfg.sb)[None, :]

    def dlogits(vb, s, mask):
        p = jnp.where(mask, jnp.exp2(s - lse), 0.0)
        return p * (mm(do, vb, trans_b=True) - delta)

    def body(i, carry):
        dq, dgate = carry
        blk = cand_ref[i]
        member, row_gate, chosen = _member(cfg, blk, t, idx, valid, zero_row, gate)
        start = _block_start(cfg, blk, slot_ref)
        kb = k_ref[pl.ds(start, cfg.sbp), :]
        vb = v_ref[pl.ds(start, cfg.sbp), :]
        qk = mm(q, kb, trans_b=True) * c  # [R, sbp], without the gate
        s = qk * row_gate[:, None]
        if cfg.zero_rows_possible:
            s = jnp.where(zero_row[:, None], 0.0, s)
        ds = dlogits(vb, s, in_block & member[:, None])
        if cfg.zero_rows_possible:
            ds = jnp.where(zero_row[:, None], 0.0, ds)
        dq = dq + mm((ds * row_gate[:, None]).astype(kb.dtype), kb)
        if cfg.gate_grad:
            dgate = dgate + jnp.where(chosen, (jnp.sum(ds * qk, axis=1) * (1.0 / LOG2E))[:, None], 0.0)
        return dq, dgate

    rows, d = q.shape
    zeros = (jnp.zeros((rows, d), F32), jnp.zeros((rows, cfg.kp), F32))
    dq, dgate = lax.fori_loop(0, _walked(cfg, cand_ref), body, zeros)
    if cfg.own_block:
        first, last = _own_range(cfg, pl.program_id(0), t, bounds)

        def own(o, dq):
            kb = k_ref[pl.ds(o * cfg.sb, cfg.sbp), :]
            vb = v_ref[pl.ds(o * cfg.sb, cfg.sbp), :]
            s = mm(q, kb, trans_b=True) * c
            return dq + mm(dlogits(vb, s, _own_mask(cfg, o, t, idx, valid, bounds)).astype(kb.dtype), kb)

        dq = lax.fori_loop(first, last + 1, own, dq)
    dq_ref[...] = _unflat(cfg, dq * cfg.scale).astype(dq_ref.dtype)
    dgate_ref[...] = _unflat(cfg, dgate).sum(axis=1)  # a query's rows summed


def _dkv_kernel(q_ref, k_ref, v_ref, idx_ref, valid_ref, gate_ref, do_ref, lse_ref, delta_ref, tile_ref, off_ref,
                *refs, cfg: TiledConfig, part: str):
    """dk, dv [sbp, d] of key block j for one selection group: the tiles that walked j (from the
    inverted index; split `split` of cfg.dkv_splits parts of that list), then (split 0) the tiles
    whose queries have keys of j in their own block. No atomics. part "all": both; packed, two
    calls: "selected" (block slot j, from the slot table) and "own" (the aligned tokens
    j * sb + ...). Measured on an H200 (seed config, 64k): two calls beat one call with an own
    program per block (8.6 vs 9.2 ms fwd+bwd), whose kernel holds both loops."""
    bounds_refs, slot_ref, own_ref, (dk_ref, dv_ref) = _split_refs(cfg, refs, 2)
    j, split = pl.program_id(0), pl.program_id(1)
    c = cfg.scale * LOG2E
    first_key = slot_ref[j] if part == "selected" else j * cfg.sb
    kb = k_ref[pl.ds(first_key, cfg.sbp), :]
    vb = v_ref[pl.ds(first_key, cfg.sbp), :]
    in_block = (iota(cfg.sbp) < cfg.sb)[None, :]

    def tile_terms(tile):
        queries = pl.ds(tile * cfg.bq, cfg.bq)
        q, do = _flat(cfg, q_ref[queries]), _flat(cfg, do_ref[queries])
        state = _row_state(cfg, idx_ref, valid_ref, tile, queries)
        qk = mm(q, kb, trans_b=True) * c  # [R, sbp]
        dp = mm(do, vb, trans_b=True) - _flat(cfg, delta_ref[queries])[:, None]
        gate = tokens_to_rows(gate_ref[queries, :], cfg.rows)
        return q, do, _flat(cfg, lse_ref[queries])[:, None], gate, state, qk, dp

    def accumulate(carry, q, do, p, ds):
        dk, dv = carry
        return dk + mm(ds.astype(q.dtype), q, trans_a=True), dv + mm(p.astype(do.dtype), do, trans_a=True)

    def walked(e, carry):
        q, do, lse, gate, (t, idx, valid, zero_row), qk, dp = tile_terms(tile_ref[e])
        member, row_gate, _ = _member(cfg, j, t, idx, valid, zero_row, gate)
        s = qk * row_gate[:, None]
        if cfg.zero_rows_possible:
            s = jnp.where(zero_row[:, None], 0.0, s)
        p = jnp.where(in_block & member[:, None], jnp.exp2(s - lse), 0.0)
        ds = p * dp
        if cfg.zero_rows_possible:
            ds = jnp.where(zero_row[:, None], 0.0, ds)
        return accumulate(carry, q, do, p, ds * row_gate[:, None])

    d = q_ref.shape[-1]
    carry = (jnp.zeros((cfg.sbp, d), F32), jnp.zeros((cfg.sbp, d), F32))
    if part != "own":
        start, stop = off_ref[j], off_ref[j + 1]
        if cfg.dkv_splits > 1:  # heavily selected blocks (early ones, under causal selection) get split
            chunk = lax.div(stop - start + cfg.dkv_splits - 1, cfg.dkv_splits)
            start, stop = start + split * chunk, jnp.minimum(start + split * chunk + chunk, stop)
        carry = lax.fori_loop(start, stop, walked, carry)
    if cfg.own_block and part != "selected":  # tiles holding queries with keys of block j in their own block
        tiles = q_ref.shape[0] // cfg.bq

        def own(tile, carry):
            q, do, lse, _, (t, idx, valid, _), qk, dp = tile_terms(tile)
            queries = pl.ds(tile * cfg.bq, cfg.bq)
            bounds = _bounds(cfg, bounds_refs, queries)
            p = jnp.where(_own_mask(cfg, j, t, idx, valid, bounds), jnp.exp2(qk - lse), 0.0)
            return accumulate(carry, q, do, p, p * dp)

        # Queries with keys of block j in their own block: its tokens; packed, the range from XLA.
        t_first, t_last = (own_ref[j, 0], own_ref[j, 1] - 1) if cfg.packed else (j * cfg.sb, j * cfg.sb + cfg.sb - 1)
        first = lax.div(t_first, cfg.bq)
        last = jnp.minimum(lax.div(t_last, cfg.bq), tiles - 1)
        carry = lax.fori_loop(first, jnp.where(split == 0, last + 1, first), own, carry)
    dk, dv = carry
    dk_ref[...] = dk * cfg.scale
    dv_ref[...] = dv


def inverted_tiles(cfg: TiledConfig, cand):
    """The transpose of the candidate lists: per (batch, group), the tiles that walk each block.

    cand [b, groups, tiles, mb] -> (tile ids [b, groups, tiles * mb] sorted by block,
    offsets [b, groups, nb + 1]); unused entries (nb) sort last.
    """
    b, groups, tiles, mb = cand.shape
    key = cand.reshape(b * groups, tiles * mb)
    order, offsets = sort_by_block(key, cfg.nb)
    return (order // mb).astype(jnp.int32).reshape(b, groups, tiles * mb), offsets.reshape(b, groups, cfg.nb + 1)


def candidates(cfg: TiledConfig, idx, valid):
    """Per (batch, group, tile): the distinct blocks its queries attend, ascending, then `nb`.

    idx, valid [b, groups, nq_pad, kp] -> cand [b, groups, tiles, bq * kp]. An entry that repeats
    an earlier one of its tile becomes nb (one fusion comparing the tile's bq * kp entries
    pairwise), then one sort puts the distinct blocks first; the kernels count them themselves.
    """
    b, groups, nq_pad, kp = idx.shape
    used = (valid > 0) & (jnp.arange(kp) < cfg.num_sel)
    if cfg.zero_rows_possible:
        used = used | (~jnp.any(used, axis=-1, keepdims=True) & (jnp.arange(kp) < cfg.num_sel))
    used = used & (idx >= 0) & (idx < cfg.nb) & (jnp.arange(nq_pad) < cfg.nq)[:, None]
    mb = cfg.max_blocks
    key = jnp.where(used, idx, cfg.nb).astype(jnp.int32).reshape(b, groups, nq_pad // cfg.bq, mb)
    earlier = jnp.arange(mb)[None, :] < jnp.arange(mb)[:, None]  # [entry, other]: other comes first
    repeat = (key[..., :, None] == key[..., None, :]) & earlier
    key = jnp.max(jnp.where(repeat, cfg.nb, key[..., :, None]), axis=-1)  # one reduction, no select after it
    return jnp.sort(key, axis=-1)


def _walked(cfg: TiledConfig, cand_ref):
    """How many distinct blocks this program's tile walks (its candidate list's entries < nb)."""
    return jnp.sum(jnp.where(cand_ref[...] < cfg.nb, 1, 0))


def _specs(cfg: TiledConfig, d: int, nk_alloc: int):
    rows, kp, mb = cfg.rows, cfg.kp, cfg.max_blocks
    upk = cfg.groups_per_kv
    return dict(
        # a tile's queries in the caller's layouts [b, nq_pad, sh, ...]
        row_d=pl.BlockSpec((None, cfg.bq, None, rows, d), lambda i, bi, s: (bi, i, s, 0, 0)),
        row=pl.BlockSpec((None, cfg.bq, None, rows), lambda i, bi, s: (bi, i, s, 0)),
        query=pl.BlockSpec((None, cfg.bq), lambda i, bi, s: (bi, i)),  # [b, nq_pad]
        query_kp=pl.BlockSpec((None, cfg.bq, None, kp), lambda i, bi, s: (bi, i, s, 0)),
        kv=pl.BlockSpec((None, nk_alloc, None, d), lambda i, bi, s: (bi, 0, s // upk, 0)),
        cand=pl.BlockSpec((None, None, None, mb), lambda i, bi, s: (bi, s, i, 0)),
    )


def _forward(cfg: TiledConfig, q, k, v, idx, valid, gate, cand, packed: tuple):
    """q [b, nq_pad, groups, rows, d]; idx/valid/gate [b, nq_pad, groups, kp]; packed: () or
    (document starts, ends [b, nq_pad], slot table [b, nb]): the caller's layouts, no transposes."""
    b, nq_pad, groups, _, d = q.shape
    sp = _specs(cfg, d, k.shape[1])
    packed_specs = [sp["query"], sp["query"], pl.BlockSpec((None, cfg.nb), lambda i, bi, s: (bi, 0))] if packed else []
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg),
        grid=(nq_pad // cfg.bq, b, groups),
        in_specs=[sp["row_d"], sp["kv"], sp["kv"], sp["query_kp"], sp["query_kp"], sp["query_kp"], sp["cand"]]
        + packed_specs,
        out_specs=[sp["row_d"], sp["row"]],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(q.shape[:-1], F32)],
        compiler_params=compiler_params(cfg.num_warps, cfg.num_stages),
        interpret=cfg.interpret,
        name="nsa_selected_tiled_fwd",
    )(q, k, v, idx, valid, gate, cand, *packed)


def _tiled_dq(cfg: TiledConfig, q, k, v, idx, valid, gate, cand, packed: tuple, lse, do, delta):
    """dq and dgate by the tiled dq kernel (recomputes each walked block's logits for the tile's rows)."""
    b, nq_pad, groups, _, d = q.shape
    sp = _specs(cfg, d, k.shape[1])
    packed_specs = [sp["query"], sp["query"], pl.BlockSpec((None, cfg.nb), lambda i, bi, s: (bi, 0))] if packed else []
    return pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg),
        grid=(nq_pad // cfg.bq, b, groups),
        in_specs=[sp["row_d"], sp["kv"], sp["kv"], sp["query_kp"], sp["query_kp"], sp["query_kp"], sp["cand"],
                  sp["row_d"], sp["row"], sp["row"]] + packed_specs,
        out_specs=[sp["row_d"], sp["query_kp"]],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(idx.shape, F32)],
        compiler_params=compiler_params(cfg.num_warps, cfg.num_stages),
        interpret=cfg.interpret,
        name="nsa_selected_tiled_dq",
    )(q, k, v, idx, valid, gate, cand, do, lse, delta, *packed)


def _backward(cfg: TiledConfig, q, k, v, idx, valid, gate, cand, packed: tuple, key_source, o, lse, do):
    """packed: () or (document starts, ends, slot table, own queries [b, nb, 2])."""
    packed, own_queries = packed[:3], packed[3:]
    b, nq_pad, groups, rows, d = q.shape
    nk_alloc, kh = k.shape[1], k.shape[2]
    delta = softmax_delta(o, do)
    if cfg.by_query is not None and not packed:  # dk/dv (and with stored dlogits dq) from the per-query family
        dq, dk, dv, dgate = _backward_by_query(cfg, q, k, v, idx, valid, gate, lse, do, delta)
        if dq is None:
            dq, dgate = _tiled_dq(cfg, q, k, v, idx, valid, gate, cand, packed, lse, do, delta)
        return dq, dk, dv, dgate
    dq, dgate = _tiled_dq(cfg, q, k, v, idx, valid, gate, cand, packed, lse, do, delta)

    tile_ids, offsets = inverted_tiles(cfg, cand)

    def full(*tail):  # a group's whole sequence: [nq_pad, *tail] of [b, nq_pad, groups, *tail]
        return pl.BlockSpec((None, nq_pad, None, *tail), lambda j, p, bi, s: (bi, 0, s) + (0,) * len(tail))

    upk = cfg.groups_per_kv
    kv = pl.BlockSpec((None, nk_alloc, None, d), lambda j, p, bi, s: (bi, 0, s // upk, 0))
    per_group = lambda n: pl.BlockSpec((None, None, n), lambda j, p, bi, s: (bi, s, 0))  # noqa: E731
    sequence = pl.BlockSpec((None, nq_pad), lambda j, p, bi, s: (bi, 0))
    packed_full = [sequence, sequence, pl.BlockSpec((None, cfg.nb), lambda j, p, bi, s: (bi, 0)),
                   pl.BlockSpec((None, cfg.nb, 2), lambda j, p, bi, s: (bi, 0, 0))] if packed else []

    def dkv(part: str, splits: int):  # -> dk, dv [splits, b, groups, nb, sbp, d] float32
        out = pl.BlockSpec((None, None, None, None, cfg.sbp, d), lambda j, p, bi, s: (p, bi, s, j, 0, 0))
        return pl.pallas_call(
            functools.partial(_dkv_kernel, cfg=cfg, part=part),
            grid=(cfg.nb, splits, b, groups),
            in_specs=[full(rows, d), kv, kv, full(cfg.kp), full(cfg.kp), full(cfg.kp), full(rows, d), full(rows),
                      full(rows), per_group(tile_ids.shape[-1]), per_group(cfg.nb + 1)] + packed_full,
            out_specs=[out, out],
            out_shape=[jax.ShapeDtypeStruct((splits, b, groups, cfg.nb, cfg.sbp, d), F32)] * 2,
            compiler_params=compiler_params(cfg.dkv_num_warps, cfg.num_stages),
            interpret=cfg.interpret,
            name=f"nsa_selected_tiled_dkdv_{part}",
        )(q, k, v, idx, valid, gate, do, lse, delta, tile_ids, offsets, *packed, *own_queries)

    def per_kv_head(x):  # [splits, b, groups, nb, sbp, d] -> [b, nb, sbp, kh, d]: splits, groups of a kv head summed
        return x.sum(axis=0).reshape(b, kh, upk, cfg.nb, cfg.sbp, d).sum(axis=2).transpose(0, 2, 3, 1, 4)

    def blocks_to_keys(x):  # [b, nb, sbp, kh, d] -> [b, nk_alloc, kh, d] (zeros past nb * sb)
        x = x[:, :, : cfg.sb].reshape(b, cfg.nb * cfg.sb, kh, d)
        return pad_axis(x, 1, nk_alloc)

    if not packed:
        dk, dv = (blocks_to_keys(per_kv_head(x)).astype(k.dtype) for x in dkv("all", cfg.dkv_splits))
    else:  # selected blocks are document slots (gathered back to their keys); own blocks aligned
        dk, dv = ((slot_tiles_to_keys(per_kv_head(s_), key_source) + blocks_to_keys(per_kv_head(o_))).astype(k.dtype)
                  for s_, o_ in zip(dkv("selected", cfg.dkv_splits), dkv("own", 1)))
    return dq, dk, dv, dgate


def _backward_by_query(cfg: TiledConfig, q, k, v, idx, valid, gate, lse, do, delta):
    """dk, dv through `kernels.selected_query`'s kernel, and with its stored dlogits
    (`cfg.by_query.stored_ds`) dq and dgate through that family's dq kernel (else None, None):
    the same [b, nq, groups, ...] layout, padding queries dropped (and dq, dgate padded back)."""
    nq_pad = q.shape[1]
    per_query = lambda x: x[:, :cfg.nq]  # noqa: E731
    qq, sel = per_query(q), (per_query(idx), per_query(valid), per_query(gate))
    dk, dv, order, stored = query_dkdv(cfg.by_query, qq, k, v, *sel, None, per_query(lse), per_query(do),
                                       per_query(delta))
    if not cfg.by_query.stored_ds:
        return None, dk, dv, None
    dq, dgate = query_dq_from_stored(cfg.by_query, qq, k, *sel, order, *stored)
    dq = pad_axis(dq, 1, nq_pad)  # [b, nq_pad, groups, rows, d]
    return dq, dk, dv, pad_axis(dgate, 1, nq_pad)  # dgate [b, nq_pad, groups, kp]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def tiled_selected(cfg: TiledConfig, q, k, v, idx, valid, gate, cand, packed: tuple, key_source):
    """q [b, nq_pad, groups, rows, d]; k, v [b, nk_alloc, kh, d]; idx/valid/gate [b, nq_pad,
    groups, kp]; cand from `candidates`; packed () or (document starts, ends [b, nq_pad], slot
    table, own queries) with key_source (`Packed`; else None) -> o like q. The caller's layouts:
    the kernels read a tile's [bq, rows] and flatten it to rows in registers."""
    return _forward(cfg, q, k, v, idx, valid, gate, cand, packed[:3])[0]


def _tiled_fwd(cfg, q, k, v, idx, valid, gate, cand, packed, key_source):
    o, lse = _forward(cfg, q, k, v, idx, valid, gate, cand, packed[:3])
    return o, (q, k, v, idx, valid, gate, cand, packed, key_source, o, lse)


def _tiled_bwd(cfg, res, do):
    q, k, v, idx, valid, gate, cand, packed, key_source, o, lse = res
    dq, dk, dv, dgate = _backward(cfg, q, k, v, idx, valid, gate, cand, packed, key_source, o, lse, do)
    return dq, dk, dv, None, None, dgate, None, None, None


tiled_selected.defvjp(_tiled_fwd, _tiled_bwd)


def tile_layout(nq: int, rows: int, settings: SelectedSettings) -> tuple[int, int, int]:
    """(queries per tile, queries padded to whole tiles, dk/dv programs per key block)."""
    bq = max(1, settings.tile_rows // rows)
    nq_pad = round_up(nq, bq)
    dkv_splits = max(1, min(settings.max_dkv_splits, (nq_pad // bq) // settings.tiles_per_dkv_split))
    return bq, nq_pad, dkv_splits


def tiled_selected_attention(qg, k, v, idx, val, gate, packed: Packed | None = None, *, sb: int, sbp: int, nb: int,
                             num_sel: int, kp: int, upk: int, causal: bool, scale: float,
                             settings: SelectedSettings, gate_grad: bool = True) -> jax.Array:
    """The per-query layout of `kernels.selected_attention` through the tiled kernels and back.

    qg [b, nq, groups, rows, d]; k, v [b, nk_alloc, kh, d] (every [blk * sb, + sbp) load in
    bounds, packed: every [token, + sbp); sbp >= MIN_DOT); idx / val / gate [b, nq, groups, kp]
    (packed: block slots) -> o like qg. gate_grad=False: the gate's cotangent is zeros (not computed).
    """
    b, nq, groups, rows, d = qg.shape
    assert sbp >= MIN_DOT and k.shape[1] >= nb * sb + sbp - sb, (sbp, k.shape, nb, sb)
    bq, nq_pad, dkv_splits = tile_layout(nq, rows, settings)
    split_bytes = 2 * 4 * b * groups * nb * sbp * d  # one split's float32 dk and dv partials
    dkv_splits = max(1, min(dkv_splits, settings.dkv_partial_bytes // split_bytes))
    cfg = TiledConfig(sb=sb, sbp=sbp, nb=nb, nq=nq, num_sel=num_sel, kp=kp, rows=rows, bq=bq,
                      groups_per_kv=upk, causal=causal, scale=scale, num_warps=settings.num_warps,
                      num_stages=settings.num_stages, interpret=interpret_mode(), packed=packed is not None,
                      gate_grad=gate_grad, dkv_splits=dkv_splits, dkv_num_warps=settings.tiled_dkv_num_warps)
    if settings.tiled_dkv == "queries" and packed is None:
        query_settings = dataclasses.replace(settings, dkv_entries_per_program=settings.tiled_dkv_entries_per_program)
        by_query = QueryConfig.from_settings(query_settings, packed=False, sb=sb, sbp=sbp, nb=nb, nq=nq,
                                             num_sel=num_sel, kp=kp, rows=rows, groups_per_kv=upk, causal=causal,
                                             scale=scale, gate_grad=gate_grad)
        # dk/dv (and with tiled_dq="stored" dq from its stored dlogits); chunks of at least the matrix unit's 16 rows
        cfg = dataclasses.replace(cfg, by_query=dataclasses.replace(
            by_query, stored_ds=settings.tiled_dq == "stored", dkv_chunk=max(settings.tiled_dkv_chunk, MIN_DOT // rows)))
    # the kernels read these layouts as they are: queries padded to whole tiles (a no-op when they fill them)
    qg, idx, val, gate = (pad_axis(x, 1, nq_pad) for x in (qg, idx, val, gate))
    cand = candidates(cfg, idx.transpose(0, 2, 1, 3), val.transpose(0, 2, 1, 3))
    extra, key_source = (), None
    if packed is not None:  # document bounds per query [b, nq_pad] and the slot table
        extra = (pad_axis(packed.start, 1, nq_pad), pad_axis(packed.end, 1, nq_pad), packed.slot_start,
                 packed.own_queries)
        key_source = packed.key_source
    o = tiled_selected(cfg, qg, k, v, idx, val, gate, cand, extra, key_source)
    return o[:, :nq]

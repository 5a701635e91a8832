"""Selected attention over tiles of queries: the small-group variant of `selected_attention`.

With few query heads per kv head (the seed model's g = 2), one program per query leaves the
tensor cores idle (2-row tiles) and loads every selected K/V block once per query. Here one
program takes BQ consecutive queries of one selection group (BQ * g rows) and walks the
union of the blocks they selected (computed in XLA: sorted, deduplicated, with its count):
each block's K/V is loaded once per tile, the [rows, keys] logits come from one matmul, and
rows that did not select the block are masked. The own (diagonal) blocks of the tile follow.
Forward and dq kernels share this walk; the dq kernel also emits each (tile, block) dk/dv
contribution, which XLA scatter-adds (float32).

Same contract and numerics as `nsa_jax.reference.selected_attention`, provided the valid
indices of a query are distinct (selections made by top-k are). Not yet the default: chosen
with `selected_attention(..., impl="tiled")` until measured on a GPU.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels._common import F32, LOG2E, MASK_VALUE, cdiv, compiler_params, iota, mm, next_pow2, \
    online_softmax_step
from kernels.selected_attention import SelectedConfig, sum_block_contributions


@dataclasses.dataclass(frozen=True)
class TiledConfig(SelectedConfig):
    bq: int  # queries per tile

    @property
    def tile_rows(self) -> int:
        return self.bq * self.rows

    @property
    def max_blocks(self) -> int:  # candidate list length per tile
        return self.bq * self.kp

    @property
    def own_blocks(self) -> int:  # own blocks a tile can span, padded to a power of two
        return next_pow2(cdiv(self.bq - 1, self.sb) + 1)


def _row_state(cfg: TiledConfig, idx_ref, valid_ref):
    """Per row of the tile: its query, its selection [R, kp], validity and the zero-row flag."""
    tile = pl.program_id(0)
    t = tile * cfg.bq + lax.div(iota(cfg.tile_rows), cfg.rows)  # [R] query of each row
    idx = idx_ref[...]  # [R, kp]
    valid = (valid_ref[...] > 0) & (iota(cfg.kp) < cfg.num_sel)[None, :]
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


def _own_mask(cfg: TiledConfig, o, t, idx, valid):
    """[R, sbp] keys of own block o that each row attends as its own block."""
    cols = iota(cfg.sbp)[None, :]
    mask = (lax.div(t, cfg.sb) == o)[:, None] & (cols < cfg.sb) & (t < cfg.nq)[:, None]
    if cfg.causal:
        mask = mask & (o * cfg.sb + cols <= t[:, None])
    if cfg.num_sel > 0:  # a validly selected own block is attended in full (with its gate)
        selected = jnp.max(jnp.where((idx == o) & valid, 1, 0), axis=1) > 0
        mask = mask & jnp.logical_not(selected)[:, None]
    return mask


def _own_range(cfg: TiledConfig, tile):
    """First and last own block of the queries of `tile` (a program id, or an array of them)."""
    first = lax.div(tile * cfg.bq, cfg.sb)
    last = jnp.minimum(lax.div(jnp.minimum(tile * cfg.bq + cfg.bq, cfg.nq) - 1, cfg.sb), cfg.nb - 1)
    return first, last


def _fwd_kernel(q_ref, k_ref, v_ref, idx_ref, valid_ref, gate_ref, cand_ref, meta_ref, o_ref, lse_ref,
                *, cfg: TiledConfig):
    q = q_ref[...]  # [R, d]
    c = cfg.scale * LOG2E
    t, idx, valid, zero_row = _row_state(cfg, idx_ref, valid_ref)
    gate = gate_ref[...]
    in_block = (iota(cfg.sbp) < cfg.sb)[None, :]

    def body(i, carry):
        blk = cand_ref[i]
        member, row_gate, _ = _member(cfg, blk, t, idx, valid, zero_row, gate)
        kb = k_ref[pl.ds(blk * cfg.sb, cfg.sbp), :]
        vb = v_ref[pl.ds(blk * cfg.sb, cfg.sbp), :]
        s = mm(q, kb, trans_b=True) * (row_gate * c)[:, None]  # [R, sbp]
        if cfg.zero_rows_possible:
            s = jnp.where(zero_row[:, None], 0.0, s)
        return online_softmax_step(carry, jnp.where(in_block & member[:, None], s, MASK_VALUE), vb)

    rows, d = q.shape
    carry = (jnp.zeros((rows, d), F32), jnp.full((rows,), -jnp.inf, F32), jnp.zeros((rows,), F32))
    carry = lax.fori_loop(0, meta_ref[0], body, carry)
    if cfg.own_block:
        first, last = _own_range(cfg, pl.program_id(0))

        def own(o, carry):
            kb = k_ref[pl.ds(o * cfg.sb, cfg.sbp), :]
            vb = v_ref[pl.ds(o * cfg.sb, cfg.sbp), :]
            s = mm(q, kb, trans_b=True) * c
            return online_softmax_step(carry, jnp.where(_own_mask(cfg, o, t, idx, valid), s, MASK_VALUE), vb)

        carry = lax.fori_loop(first, last + 1, own, carry)
    acc, m_i, l_i = carry
    l_safe = jnp.where(l_i > 0, l_i, 1.0)
    o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m_i + jnp.log2(l_safe)


def _dq_kernel(q_ref, k_ref, v_ref, idx_ref, valid_ref, gate_ref, cand_ref, meta_ref, do_ref, lse_ref, delta_ref,
               dq_ref, dgate_ref, dkc_ref, dvc_ref, *own_refs, cfg: TiledConfig):
    """dq, per-row dgates [R, kp], and the tile's dk/dv contribution for each walked block."""
    q = q_ref[...]
    do = do_ref[...]
    lse = lse_ref[...][:, None]
    delta = delta_ref[...][:, None]
    c = cfg.scale * LOG2E
    t, idx, valid, zero_row = _row_state(cfg, idx_ref, valid_ref)
    gate = gate_ref[...]
    in_block = (iota(cfg.sbp) < cfg.sb)[None, :]

    def grads(kb, vb, s, mask):
        p = jnp.where(mask, jnp.exp2(s - lse), 0.0)
        return p, p * (mm(do, vb, trans_b=True) - delta)

    def body(i, carry):
        dq, dgate = carry
        blk = cand_ref[i]
        member, row_gate, chosen = _member(cfg, blk, t, idx, valid, zero_row, gate)
        kb = k_ref[pl.ds(blk * cfg.sb, cfg.sbp), :]
        vb = v_ref[pl.ds(blk * cfg.sb, cfg.sbp), :]
        qk = mm(q, kb, trans_b=True) * c  # [R, sbp], without the gate
        s = qk * row_gate[:, None]
        if cfg.zero_rows_possible:
            s = jnp.where(zero_row[:, None], 0.0, s)
        p, ds = grads(kb, vb, s, in_block & member[:, None])
        if cfg.zero_rows_possible:
            ds = jnp.where(zero_row[:, None], 0.0, ds)
        ds_gated = ds * row_gate[:, None]
        dq = dq + mm(ds_gated.astype(kb.dtype), kb)
        dgate = dgate + jnp.where(chosen, (jnp.sum(ds * qk, axis=1) * (1.0 / LOG2E))[:, None], 0.0)
        dkc_ref[i] = mm(ds_gated.astype(q.dtype), q, trans_a=True) * cfg.scale
        dvc_ref[i] = mm(p.astype(do.dtype), do, trans_a=True)
        return dq, dgate

    rows, d = q.shape
    dq, dgate = lax.fori_loop(0, meta_ref[0], body, (jnp.zeros((rows, d), F32), jnp.zeros((rows, cfg.kp), F32)))
    if cfg.own_block:
        dko_ref, dvo_ref = own_refs
        first, last = _own_range(cfg, pl.program_id(0))

        def own(o, dq):
            kb = k_ref[pl.ds(o * cfg.sb, cfg.sbp), :]
            vb = v_ref[pl.ds(o * cfg.sb, cfg.sbp), :]
            s = mm(q, kb, trans_b=True) * c
            p, ds = grads(kb, vb, s, _own_mask(cfg, o, t, idx, valid))
            dko_ref[o - first] = mm(ds.astype(q.dtype), q, trans_a=True) * cfg.scale
            dvo_ref[o - first] = mm(p.astype(do.dtype), do, trans_a=True)
            return dq + mm(ds.astype(kb.dtype), kb)

        dq = lax.fori_loop(first, last + 1, own, dq)
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)
    dgate_ref[...] = dgate


def candidates(cfg: TiledConfig, idx, valid):
    """Per (batch, group, tile): the distinct blocks its queries attend, first, and their count.

    idx, valid [b, groups, nq_pad, kp] -> cand [b, groups, tiles, bq * kp] (unused entries 0),
    meta [b, groups, tiles, 2] (count, 0).
    """
    b, groups, nq_pad, kp = idx.shape
    used = (valid > 0) & (jnp.arange(kp) < cfg.num_sel)
    if cfg.zero_rows_possible:
        used = used | (~jnp.any(used, axis=-1, keepdims=True) & (jnp.arange(kp) < cfg.num_sel))
    used = used & (idx >= 0) & (idx < cfg.nb) & (jnp.arange(nq_pad) < cfg.nq)[:, None]
    tiles = nq_pad // cfg.bq
    key = jnp.where(used, idx, cfg.nb).reshape(b, groups, tiles, cfg.max_blocks)
    key = jnp.sort(key, axis=-1)
    dup = jnp.concatenate([jnp.zeros_like(key[..., :1], bool), key[..., 1:] == key[..., :-1]], axis=-1)
    key = jnp.sort(jnp.where(dup, cfg.nb, key), axis=-1)  # distinct blocks first, then nb
    count = jnp.sum(key < cfg.nb, axis=-1).astype(jnp.int32)
    cand = jnp.where(key < cfg.nb, key, 0).astype(jnp.int32)
    meta = jnp.stack([count, jnp.zeros_like(count)], axis=-1)
    return cand, meta


def _specs(cfg: TiledConfig, d: int, nk_alloc: int):
    r, kp, mb = cfg.tile_rows, cfg.kp, cfg.max_blocks
    upk = cfg.groups_per_kv
    return dict(
        row_d=pl.BlockSpec((None, None, r, d), lambda i, bi, s: (bi, s, i, 0)),
        row=pl.BlockSpec((None, None, r), lambda i, bi, s: (bi, s, i)),
        row_kp=pl.BlockSpec((None, None, r, kp), lambda i, bi, s: (bi, s, i, 0)),
        kv=pl.BlockSpec((None, nk_alloc, None, d), lambda i, bi, s: (bi, 0, s // upk, 0)),
        cand=pl.BlockSpec((None, None, None, mb), lambda i, bi, s: (bi, s, i, 0)),
        meta=pl.BlockSpec((None, None, None, 2), lambda i, bi, s: (bi, s, i, 0)),
        contrib=pl.BlockSpec((None, None, None, mb, cfg.sbp, d), lambda i, bi, s: (bi, s, i, 0, 0, 0)),
        own=pl.BlockSpec((None, None, None, cfg.own_blocks, cfg.sbp, d), lambda i, bi, s: (bi, s, i, 0, 0, 0)),
    )


def _forward(cfg: TiledConfig, q, k, v, idx, valid, gate, cand, meta):
    """q [b, groups, nq_pad * rows, d]; idx/valid/gate per row [b, groups, nq_pad * rows, kp]."""
    b, groups, nr, d = q.shape
    sp = _specs(cfg, d, k.shape[1])
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg),
        grid=(nr // cfg.tile_rows, b, groups),
        in_specs=[sp["row_d"], sp["kv"], sp["kv"], sp["row_kp"], sp["row_kp"], sp["row_kp"], sp["cand"], sp["meta"]],
        out_specs=[sp["row_d"], sp["row"]],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, groups, nr), F32)],
        compiler_params=compiler_params(cfg.num_warps, cfg.num_stages),
        interpret=cfg.interpret,
        name="nsa_selected_tiled_fwd",
    )(q, k, v, idx, valid, gate, cand, meta)


def _backward(cfg: TiledConfig, q, k, v, idx, valid, gate, cand, meta, o, lse, do):
    b, groups, nr, d = q.shape
    tiles = nr // cfg.tile_rows
    sp = _specs(cfg, d, k.shape[1])
    delta = jnp.sum(o.astype(F32) * do.astype(F32), axis=-1)
    contrib = jax.ShapeDtypeStruct((b, groups, tiles, cfg.max_blocks, cfg.sbp, d), F32)
    own = jax.ShapeDtypeStruct((b, groups, tiles, cfg.own_blocks, cfg.sbp, d), F32)
    out_specs = [sp["row_d"], sp["row_kp"], sp["contrib"], sp["contrib"]] + ([sp["own"]] * 2 if cfg.own_block else [])
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(idx.shape, F32), contrib, contrib]
    out_shape += [own, own] if cfg.own_block else []
    dq, dgate, dkc, dvc, *owns = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg),
        grid=(tiles, b, groups),
        in_specs=[sp["row_d"], sp["kv"], sp["kv"], sp["row_kp"], sp["row_kp"], sp["row_kp"], sp["cand"], sp["meta"],
                  sp["row_d"], sp["row"], sp["row"]],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=compiler_params(cfg.num_warps, cfg.num_stages),
        interpret=cfg.interpret,
        name="nsa_selected_tiled_dq",
    )(q, k, v, idx, valid, gate, cand, meta, do, lse, delta)
    khid = (jnp.arange(groups) // cfg.groups_per_kv)[None, :, None, None]
    bid = jnp.arange(b)[:, None, None, None]
    walked = jnp.arange(cfg.max_blocks) < meta[..., :1]  # [b, groups, tiles, mb]
    first, last = _own_range(cfg, jnp.arange(tiles))
    own_blk = first[:, None] + jnp.arange(cfg.own_blocks)[None, :]  # [tiles, own_blocks]
    own_ok = (own_blk <= last[:, None])[None, None, :, :, None, None]
    grads = []
    for part, own_part in zip((dkc, dvc), owns or (None, None)):
        pieces = [(bid, cand, khid, jnp.where(walked[..., None, None], part, 0.0))]
        if cfg.own_block:
            pieces.append((bid, jnp.clip(own_blk, 0, cfg.nb - 1)[None, None], khid, jnp.where(own_ok, own_part, 0.0)))
        grads.append(sum_block_contributions(pieces, b=b, nb=cfg.nb, kh=k.shape[2], sb=cfg.sb, nk_alloc=k.shape[1],
                                             dtype=k.dtype))
    return dq, grads[0], grads[1], dgate


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def tiled_selected(cfg: TiledConfig, q, k, v, idx, valid, gate, cand, meta):
    """q [b, groups, nq_pad * rows, d]; k, v [b, nk_alloc, kh, d]; idx/valid/gate per row
    [b, groups, nq_pad * rows, kp]; cand, meta from `candidates` -> o like q."""
    return _forward(cfg, q, k, v, idx, valid, gate, cand, meta)[0]


def _tiled_fwd(cfg, q, k, v, idx, valid, gate, cand, meta):
    o, lse = _forward(cfg, q, k, v, idx, valid, gate, cand, meta)
    return o, (q, k, v, idx, valid, gate, cand, meta, o, lse)


def _tiled_bwd(cfg, res, do):
    q, k, v, idx, valid, gate, cand, meta, o, lse = res
    dq, dk, dv, dgate = _backward(cfg, q, k, v, idx, valid, gate, cand, meta, o, lse, do)
    return dq, dk, dv, None, None, dgate, None, None


tiled_selected.defvjp(_tiled_fwd, _tiled_bwd)

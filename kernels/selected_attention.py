"""Selected (fine) attention as Pallas kernels: forward, dq + dgates, dk/dv.

Each query attends to the keys of its valid selected blocks (their logits multiplied by
the diff-top-k gate) plus, when causal, its own block up to itself (non-causal with no
selectable block, k' = 0: its whole own block, zero padding included), exactly as
`nsa_jax.reference.selected_attention`.

Forward and dq kernels: one program per (query, batch, selection group); a selection
group is the g query heads of a kv head when they share the selection (indices with kv
heads on axis 2), so the tile rows are those g heads and each selected K/V block is loaded
once for all of them; with per-head selection a group is one head. The program loops over
its k' selected blocks (dynamic `pl.ds(idx * sb, ...)` loads, invalid ones masked) and then
its own block, with an online softmax in float32 (base 2; the log-sum-exp is saved).

dk/dv kernel: the transpose of the selection is an inverted index built in XLA (sort the
(query, slot) pairs of each batch and group by block; offsets by binary search), so one
program per (key block, split, batch, kv head) keeps its dk/dv tile in registers and visits
only the queries that selected the block (plus the queries of the block itself for the
own-block term). Heavily selected blocks (early blocks, under causal selection) have their
query list split over `dkv_splits` programs whose float32 partial sums XLA adds. No
atomics, deterministic; cost O(n * k' * sb), like the forward.

Reference quirk reproduced: non-causal, k' > 0, a query group with no valid block attends
uniformly to the tokens of all its selected blocks (logits forced to 0, no gradient to q,
k or the gates).

Tiles smaller than Triton's 16 (fewer than 16 rows, i.e. g < 16 or per-head selection)
use a broadcast multiply-reduce instead of the matrix unit. Falls back to the reference for
cached decoding (`q_positions` given).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels._common import (
    F32, LOG2E, MASK_VALUE, MIN_DOT, cdiv, compiler_params, interpret_mode, iota, mm, next_pow2,
    online_softmax_step, pad_axis,
)
from nsa_jax import reference

# Largest float32 dk + dv contribution buffer the "scatter" dk/dv path may allocate per call.
DKV_SCATTER_MAX_BYTES = 1 << 30
# Default `impl` of `selected_attention`: "auto" takes the query-tiled kernels when a selection
# group has fewer rows than the matrix unit's 16 (the seed model's g = 2: train step on an H100,
# B=4 T=512 and B=1 T=16384 faster, T=4096 equal), else one program per query (groups of >= 16
# rows already fill the matrix unit, and tiles of them would walk far more blocks).
IMPL = "auto"
TILE_ROWS = 64  # rows per tile of the tiled kernels (queries per tile = TILE_ROWS // group rows)
TILES_PER_DKV_SPLIT = 16  # tiled dk/dv kernel: one split of a block's tile list per this many tiles (<= 8)


@dataclasses.dataclass(frozen=True)
class SelectedConfig:
    """What both selected-attention kernel families need to know (static)."""

    sb: int  # selection block size
    sbp: int  # keys loaded per block: a power of two >= sb (>= 16 on the matrix-unit path)
    nb: int  # key blocks
    nq: int  # queries
    num_sel: int  # k'
    kp: int  # k' padded to a power of two (>= 1)
    rows: int  # rows of a selection group (g heads when shared, else 1), power of two
    groups_per_kv: int  # selection groups per kv head (1 when shared, else g)
    causal: bool
    scale: float
    num_warps: int
    num_stages: int
    interpret: bool

    @property
    def zero_rows_possible(self) -> bool:
        """Non-causal with k' > 0: a group with no valid block gets the uniform fallback."""
        return not self.causal and self.num_sel > 0

    @property
    def own_block(self) -> bool:
        return self.causal or self.num_sel == 0


@dataclasses.dataclass(frozen=True)
class _Config(SelectedConfig):
    dkv_splits: int  # programs sharing one key block's query list in the dk/dv kernel
    dkv_scatter: bool  # dk/dv from per-(query, block) contributions of the dq kernel + scatter-add


def _usable(cfg: _Config, blk, ok, zero_row):
    use = ok | zero_row if cfg.zero_rows_possible else ok
    return use & (blk >= 0) & (blk < cfg.nb)


def _own_mask(cfg: _Config, t, idx_vec, valid_vec):
    """[sbp] keys of the own block that query t attends as its own block."""
    own = lax.div(t, cfg.sb)
    cols = iota(cfg.sbp)
    mask = cols < cfg.sb
    if cfg.causal:
        mask = mask & (own * cfg.sb + cols <= t)
    if cfg.num_sel > 0:  # a validly selected own block is already attended in full (with its gate)
        own_selected = jnp.max(jnp.where((idx_vec == own) & valid_vec, 1, 0)) > 0
        mask = mask & jnp.logical_not(own_selected)
    return own, mask


def _fwd_kernel(q_ref, k_ref, v_ref, idx_ref, valid_ref, gate_ref, o_ref, lse_ref, *, cfg: _Config):
    t = pl.program_id(0)
    q = q_ref[...]  # [G, d]
    c = cfg.scale * LOG2E
    in_block = (iota(cfg.sbp) < cfg.sb)[None, :]
    idx_vec = idx_ref[...]  # [kp]
    valid_vec = valid_ref[...] > 0
    zero_row = jnp.logical_not(jnp.max(jnp.where(valid_vec, 1, 0)) > 0)

    def body(i, carry):
        blk = idx_ref[i]
        use = _usable(cfg, blk, valid_ref[i] > 0, zero_row)
        start = jnp.clip(blk, 0, cfg.nb - 1) * cfg.sb
        kb = k_ref[pl.ds(start, cfg.sbp), :]  # [sbp, d]
        vb = v_ref[pl.ds(start, cfg.sbp), :]
        s = mm(q, kb, trans_b=True) * (gate_ref[i] * c)  # [G, sbp]
        if cfg.zero_rows_possible:
            s = jnp.where(zero_row, 0.0, s)
        s = jnp.where(in_block & use, s, MASK_VALUE)
        return online_softmax_step(carry, s, vb)

    rows, d = q.shape
    carry = (jnp.zeros((rows, d), F32), jnp.full((rows,), -jnp.inf, F32), jnp.zeros((rows,), F32))
    carry = lax.fori_loop(0, cfg.num_sel, body, carry)
    if cfg.own_block:
        own, mask = _own_mask(cfg, t, idx_vec, valid_vec)
        kb = k_ref[pl.ds(own * cfg.sb, cfg.sbp), :]
        vb = v_ref[pl.ds(own * cfg.sb, cfg.sbp), :]
        s = mm(q, kb, trans_b=True) * c
        carry = online_softmax_step(carry, jnp.where(mask[None, :], s, MASK_VALUE), vb)
    acc, m_i, l_i = carry
    seen = l_i > 0
    l_safe = jnp.where(seen, l_i, 1.0)
    o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m_i + jnp.log2(l_safe), jnp.inf)


def _dq_kernel(q_ref, k_ref, v_ref, idx_ref, valid_ref, gate_ref, do_ref, lse_ref, delta_ref, dq_ref, dgate_ref,
               *contrib_refs, cfg: _Config):
    """dq and dgates of one query group; with `cfg.dkv_scatter` also each selected (and own)
    block's dk, dv contribution [sbp, d] (contrib_refs: dk_sel, dv_sel [kp, sbp, d], then
    dk_own, dv_own [sbp, d] when the own block is attended)."""
    t = pl.program_id(0)
    q = q_ref[...]  # [G, d]
    do = do_ref[...]
    lse = lse_ref[...][:, None]  # [G, 1]
    delta = delta_ref[...][:, None]
    c = cfg.scale * LOG2E
    in_block = (iota(cfg.sbp) < cfg.sb)[None, :]
    idx_vec = idx_ref[...]
    valid_vec = valid_ref[...] > 0
    zero_row = jnp.logical_not(jnp.max(jnp.where(valid_vec, 1, 0)) > 0)
    slots = iota(cfg.kp)

    def grads(vb, s, mask):
        """(probabilities, dL/dlogits natural) [G, sbp] for base-2 logits s."""
        p = jnp.where(mask, jnp.exp2(s - lse), 0.0)
        dp = mm(do, vb, trans_b=True)
        return p, p * (dp - delta)

    def contributions(p, ds_gated):
        """This query group's dk (before the scale) and dv for one key block: [sbp, d] each."""
        return (mm(ds_gated.astype(q.dtype), q, trans_a=True),
                mm(p.astype(do.dtype), do, trans_a=True))

    def body(i, carry):
        dq, dgate = carry
        blk = idx_ref[i]
        gate = gate_ref[i]
        use = _usable(cfg, blk, valid_ref[i] > 0, zero_row)
        start = jnp.clip(blk, 0, cfg.nb - 1) * cfg.sb
        kb = k_ref[pl.ds(start, cfg.sbp), :]
        vb = v_ref[pl.ds(start, cfg.sbp), :]
        qk = mm(q, kb, trans_b=True) * c  # [G, sbp], without the gate
        s = qk * gate
        if cfg.zero_rows_possible:
            s = jnp.where(zero_row, 0.0, s)
        p, ds = grads(vb, s, in_block & use)
        if cfg.zero_rows_possible:
            ds = jnp.where(zero_row, 0.0, ds)
        dq = dq + mm((ds * gate).astype(kb.dtype), kb)
        dgate = jnp.where(slots == i, jnp.sum(ds * qk) * (1.0 / LOG2E), dgate)
        if cfg.dkv_scatter:
            dk_c, dv_c = contributions(p, ds * gate)
            contrib_refs[0][i] = dk_c * cfg.scale
            contrib_refs[1][i] = dv_c
        return dq, dgate

    rows, d = q.shape
    dq, dgate = lax.fori_loop(0, cfg.num_sel, body, (jnp.zeros((rows, d), F32), jnp.zeros((cfg.kp,), F32)))
    if cfg.own_block:
        own, mask = _own_mask(cfg, t, idx_vec, valid_vec)
        kb = k_ref[pl.ds(own * cfg.sb, cfg.sbp), :]
        vb = v_ref[pl.ds(own * cfg.sb, cfg.sbp), :]
        s = mm(q, kb, trans_b=True) * c
        p, ds = grads(vb, s, mask[None, :])
        dq = dq + mm(ds.astype(kb.dtype), kb)
        if cfg.dkv_scatter:
            dk_c, dv_c = contributions(p, ds)
            contrib_refs[2][...] = dk_c * cfg.scale
            contrib_refs[3][...] = dv_c
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)
    dgate_ref[...] = dgate


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, idx_ref, valid_ref, qid_ref, sgate_ref, off_ref,
                 dk_ref, dv_ref, *, cfg: _Config):
    j = pl.program_id(0)
    split = pl.program_id(1)
    rows = cfg.rows
    d = q_ref.shape[-1]
    kb = k_ref[pl.ds(j * cfg.sb, cfg.sbp), :]  # [sbp, d]
    vb = v_ref[pl.ds(j * cfg.sb, cfg.sbp), :]
    c = cfg.scale * LOG2E
    in_block = (iota(cfg.sbp) < cfg.sb)[:, None]  # [sbp, 1]

    def accumulate(carry, t, u, gate, mask, zero_row):
        """Add query t's (group u) contribution to this block's dk, dv. Transposed scores
        [sbp, G] (keys in the matmul M dimension): no tile transposes in registers."""
        dk, dv = carry
        q = q_ref[t, pl.ds(u * rows, rows), :]  # [G, d]
        do = do_ref[t, pl.ds(u * rows, rows), :]
        lse = lse_ref[t, pl.ds(u * rows, rows)][None, :]  # [1, G]
        delta = delta_ref[t, pl.ds(u * rows, rows)][None, :]
        s_t = mm(kb, q, trans_b=True) * (gate * c)  # [sbp, G]
        if zero_row is not None:
            s_t = jnp.where(zero_row, 0.0, s_t)
        p_t = jnp.where(mask, jnp.exp2(s_t - lse), 0.0)
        dv = dv + mm(p_t.astype(do.dtype), do)  # [sbp, d]
        ds_t = p_t * (mm(vb, do, trans_b=True) - delta)
        if zero_row is not None:
            ds_t = jnp.where(zero_row, 0.0, ds_t)
        dk = dk + mm((ds_t * gate).astype(q.dtype), q)
        return dk, dv

    def per_group(u, carry):
        def selected(e, carry):
            t = qid_ref[u, e]
            zero_row = None
            if cfg.zero_rows_possible:
                zero_row = jnp.logical_not(jnp.max(jnp.where(valid_ref[t, u, :] > 0, 1, 0)) > 0)
            return accumulate(carry, t, u, sgate_ref[u, e], in_block, zero_row)

        start, end = off_ref[u, j], off_ref[u, j + 1]
        per_split = lax.div(end - start + cfg.dkv_splits - 1, cfg.dkv_splits)
        first = start + split * per_split
        carry = lax.fori_loop(first, jnp.minimum(end, first + per_split), selected, carry)
        if cfg.own_block:  # the block's own queries, in the first split
            def own(t, carry):
                _, mask = _own_mask(cfg, t, idx_ref[t, u, :], valid_ref[t, u, :] > 0)
                return accumulate(carry, t, u, 1.0, mask[:, None], None)

            own_end = jnp.where(split == 0, jnp.minimum(j * cfg.sb + cfg.sb, cfg.nq), 0)
            carry = lax.fori_loop(j * cfg.sb, own_end, own, carry)
        return carry

    zeros = jnp.zeros((cfg.sbp, d), F32)
    dk, dv = lax.fori_loop(0, cfg.groups_per_kv, per_group, (zeros, zeros))
    dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _group_specs(cfg: _Config, d: int):
    """BlockSpecs of the per-(query, batch, group) kernels; grid (nq, b, groups)."""
    q_spec = pl.BlockSpec((None, None, None, cfg.rows, d), lambda t, bi, s: (bi, t, s, 0, 0))
    row_spec = pl.BlockSpec((None, None, None, cfg.rows), lambda t, bi, s: (bi, t, s, 0))
    sel_spec = pl.BlockSpec((None, None, None, cfg.kp), lambda t, bi, s: (bi, t, s, 0))
    return q_spec, row_spec, sel_spec


def _kv_spec(nk_alloc: int, d: int, groups_per_kv: int):
    return pl.BlockSpec((None, nk_alloc, None, d), lambda t, bi, s: (bi, 0, s // groups_per_kv, 0))


def _forward(cfg: _Config, q, k, v, idx, valid, gate):
    """q [b, nq, groups, G, d]; k, v [b, nk_alloc, kh, d]; idx/valid/gate [b, nq, groups, kp]."""
    b, nq, groups, rows, d = q.shape
    q_spec, row_spec, sel_spec = _group_specs(cfg, d)
    kv_spec = _kv_spec(k.shape[1], d, cfg.groups_per_kv)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg),
        grid=(nq, b, groups),
        in_specs=[q_spec, kv_spec, kv_spec, sel_spec, sel_spec, sel_spec],
        out_specs=[q_spec, row_spec],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, nq, groups, rows), F32)],
        compiler_params=compiler_params(cfg.num_warps, cfg.num_stages),
        interpret=cfg.interpret,
        name="nsa_selected_fwd",
    )(q, k, v, idx, valid, gate)


def _inverted_index(cfg: _Config, idx, valid):
    """Per (batch, group): query ids and slots sorted by selected block, and block offsets.

    idx, valid [b, nq, groups, kp] -> (order [b, groups, nq * kp] entry ids sorted by block,
    offsets [b, groups, nb + 1]); entries that are not attended sort last (key nb).
    """
    b, nq, groups, kp = idx.shape
    used = valid > 0
    if cfg.zero_rows_possible:
        used = used | ~jnp.any(used, axis=-1, keepdims=True)
    used = used & (jnp.arange(kp) < cfg.num_sel) & (idx >= 0) & (idx < cfg.nb)
    key = jnp.where(used, idx, cfg.nb).transpose(0, 2, 1, 3).reshape(b * groups, nq * kp)
    order, offsets = sort_by_block(key, cfg.nb)
    return order.reshape(b, groups, nq * kp), offsets.reshape(b, groups, cfg.nb + 1)


def sort_by_block(key, nb: int):
    """key [rows, e] block ids (nb: unused entry) -> (order [rows, e]: entry ids sorted by block,
    stable; offsets [rows, nb + 1] int32: block j's entries are order[offsets[j]:offsets[j + 1]])."""
    order = jnp.argsort(key, axis=-1, stable=True)
    sorted_key = jnp.take_along_axis(key, order, axis=-1)
    offsets = jax.vmap(lambda row: jnp.searchsorted(row, jnp.arange(nb + 1), side="left"))(sorted_key)
    return order, offsets.astype(jnp.int32)


def sum_block_contributions(pieces, *, b: int, nb: int, kh: int, sb: int, nk_alloc: int, dtype) -> jax.Array:
    """Scatter-add (float32) per-block dk or dv contributions [..., sbp, d] into [b, nk_alloc, kh, d].

    pieces: (batch ids, block ids, kv head ids, values) with broadcastable index arrays.
    """
    *_, sbp, d = pieces[0][3].shape
    acc = jnp.zeros((b, nb, kh, sbp, d), F32)
    for bid, blk, khid, values in pieces:
        acc = acc.at[bid, blk, khid].add(values)
    x = acc[:, :, :, :sb].transpose(0, 1, 3, 2, 4).reshape(b, nb * sb, kh, d)
    return pad_axis(x, 1, nk_alloc).astype(dtype)


def _scatter_contributions(cfg: _Config, contrib, idx, kh: int, nk_alloc: int, dtype):
    """Sum the dq kernel's per-(query group, block) contributions into dk, dv [b, nk_alloc, kh, d]:
    the first k' slots at their block indices (unused slots hold zeros: their probabilities are
    masked) and the own-block terms at t // sb."""
    b, nq, groups = idx.shape[:3]
    khid = (jnp.arange(groups) // cfg.groups_per_kv)[None, None, :]  # kv head of each group
    bid = jnp.arange(b)[:, None, None]
    blk = jnp.clip(idx[..., : cfg.num_sel], 0, cfg.nb - 1)  # [b, nq, groups, k']
    own = (jnp.arange(nq) // cfg.sb)[None, :, None]
    outs = []
    for w in range(2):
        pieces = []
        if cfg.num_sel > 0:
            pieces.append((bid[..., None], blk, khid[..., None], contrib[w][:, :, :, : cfg.num_sel]))
        if cfg.own_block:
            pieces.append((bid, own, khid, contrib[2 + w]))
        outs.append(sum_block_contributions(pieces, b=b, nb=cfg.nb, kh=kh, sb=cfg.sb, nk_alloc=nk_alloc, dtype=dtype))
    return outs


def _backward(cfg: _Config, q, k, v, idx, valid, gate, o, lse, do):
    b, nq, groups, rows, d = q.shape
    kh = k.shape[2]
    upk = cfg.groups_per_kv
    params = compiler_params(cfg.num_warps, cfg.num_stages)
    delta = jnp.sum(o.astype(F32) * do.astype(F32), axis=-1)  # [b, nq, groups, G]

    q_spec, row_spec, sel_spec = _group_specs(cfg, d)
    kv_spec = _kv_spec(k.shape[1], d, upk)
    out_specs = [q_spec, sel_spec]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(idx.shape, F32)]
    if cfg.dkv_scatter:  # per (query group, slot) dk and dv contributions, then the own block's
        sel_c = pl.BlockSpec((None, None, None, cfg.kp, cfg.sbp, d), lambda t, bi, s: (bi, t, s, 0, 0, 0))
        own_c = pl.BlockSpec((None, None, None, cfg.sbp, d), lambda t, bi, s: (bi, t, s, 0, 0))
        out_specs += [sel_c, sel_c] + ([own_c, own_c] if cfg.own_block else [])
        out_shape += [jax.ShapeDtypeStruct((b, nq, groups, cfg.kp, cfg.sbp, d), F32)] * 2
        out_shape += [jax.ShapeDtypeStruct((b, nq, groups, cfg.sbp, d), F32)] * 2 if cfg.own_block else []
    dq, dgate, *contrib = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg),
        grid=(nq, b, groups),
        in_specs=[q_spec, kv_spec, kv_spec, sel_spec, sel_spec, sel_spec, q_spec, row_spec, row_spec],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=params,
        interpret=cfg.interpret,
        name="nsa_selected_dq",
    )(q, k, v, idx, valid, gate, do, lse, delta)
    if cfg.dkv_scatter:
        dk, dv = _scatter_contributions(cfg, contrib, idx, kh, k.shape[1], k.dtype)
        return dq, dk, dv, dgate

    order, offsets = _inverted_index(cfg, idx, valid)
    gate_flat = gate.transpose(0, 2, 1, 3).reshape(b, groups, nq * cfg.kp)
    sorted_gate = jnp.take_along_axis(gate_flat, order, axis=-1)
    qid = (order // cfg.kp).astype(jnp.int32)
    e = nq * cfg.kp
    gr = upk * rows  # query rows per kv head
    q_full = pl.BlockSpec((None, nq, None, gr, d), lambda j, sp, bi, h: (bi, 0, h, 0, 0))
    row_full = pl.BlockSpec((None, nq, None, gr), lambda j, sp, bi, h: (bi, 0, h, 0))
    sel_full = pl.BlockSpec((None, nq, None, upk, cfg.kp), lambda j, sp, bi, h: (bi, 0, h, 0, 0))
    ent_spec = pl.BlockSpec((None, None, upk, e), lambda j, sp, bi, h: (bi, h, 0, 0))
    off_spec = pl.BlockSpec((None, None, upk, cfg.nb + 1), lambda j, sp, bi, h: (bi, h, 0, 0))
    kv_full = pl.BlockSpec((None, k.shape[1], None, d), lambda j, sp, bi, h: (bi, 0, h, 0))
    out_spec = pl.BlockSpec((None, None, None, cfg.sbp, None, d), lambda j, sp, bi, h: (sp, bi, j, 0, h, 0))
    out_dtype = F32 if cfg.dkv_splits > 1 else k.dtype  # partial sums stay in f32
    as_kv = lambda x: x.reshape(b, nq, kh, gr, *x.shape[4:])  # [b, nq, groups, G, ..] -> per kv head
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, cfg=cfg),
        grid=(cfg.nb, cfg.dkv_splits, b, kh),
        in_specs=[q_full, kv_full, kv_full, q_full, row_full, row_full, sel_full, sel_full, ent_spec, ent_spec,
                  off_spec],
        out_specs=[out_spec, out_spec],
        out_shape=[jax.ShapeDtypeStruct((cfg.dkv_splits, b, cfg.nb, cfg.sbp, kh, d), out_dtype)] * 2,
        compiler_params=params,
        interpret=cfg.interpret,
        name="nsa_selected_dkdv",
    )(as_kv(q), k, v, as_kv(do), as_kv(lse), as_kv(delta),
      idx.reshape(b, nq, kh, upk, cfg.kp), valid.reshape(b, nq, kh, upk, cfg.kp),
      qid.reshape(b, kh, upk, e), sorted_gate.reshape(b, kh, upk, e), offsets.reshape(b, kh, upk, cfg.nb + 1))

    def to_keys(x):  # [splits, b, nb, sbp, kh, d] -> [b, nk_alloc, kh, d] (zeros past nb * sb)
        x = x.sum(axis=0).astype(k.dtype) if cfg.dkv_splits > 1 else x[0]
        x = x[:, :, : cfg.sb].reshape(b, cfg.nb * cfg.sb, kh, d)
        return pad_axis(x, 1, k.shape[1])

    return dq, to_keys(dk), to_keys(dv), dgate


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _selected(cfg: _Config, q, k, v, idx, valid, gate):
    return _forward(cfg, q, k, v, idx, valid, gate)[0]


def _selected_fwd(cfg: _Config, q, k, v, idx, valid, gate):
    o, lse = _forward(cfg, q, k, v, idx, valid, gate)
    return o, (q, k, v, idx, valid, gate, o, lse)


def _selected_bwd(cfg: _Config, res, do):
    q, k, v, idx, valid, gate, o, lse = res
    dq, dk, dv, dgate = _backward(cfg, q, k, v, idx, valid, gate, o, lse, do)
    return dq, dk, dv, None, None, dgate


_selected.defvjp(_selected_fwd, _selected_bwd)


def selected_attention(
    q: jax.Array,  # [b, nq, h, d], rotated
    k: jax.Array,  # [b, nk, kh, d], rotated
    v: jax.Array,  # [b, nk, kh, d]
    indices: jax.Array,  # [b, nq, sh, k'] selected block indices (sh = kh or h)
    valid: jax.Array,  # [b, nq, sh, k'] bool
    gates: jax.Array | None,  # [b, nq, sh, k'] multiplies the selected keys, or None
    *,
    block_size: int,
    causal: bool,
    scale: float | None = None,
    q_positions: jax.Array | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    dkv_entries_per_program: int = 256,
    dkv_impl: str = "auto",
    impl: str | None = None,
    tile_rows: int | None = None,
) -> jax.Array:  # [b, nq, h, d]
    """Same contract as `nsa_jax.reference.selected_attention`.

    dkv_impl: how dk/dv are computed. "inverted": the dk/dv kernel over an inverted index
    (one program per key block; matrix-unit tiles when a selection group has >= 16 rows);
    "scatter": the dq kernel also emits each (query group, block) contribution and XLA
    scatter-adds them (float32 atomics: summation order, and so the last bits, may vary
    between runs); "auto": scatter when the groups are too small for the matrix unit (the
    inverted kernel then walks its query list one query at a time) and the contributions
    fit in DKV_SCATTER_MAX_BYTES.

    impl: "query" (one program per query, above), "tiled" (`kernels.selected_tiled`: one
    program per tile of queries, about `tile_rows` (default TILE_ROWS) rows, walking the union
    of their blocks; dk/dv by a per-block kernel over the transposed tile lists; needs distinct
    valid indices per query, as top-k gives), "auto"
    (tiled when a selection group has fewer than 16 rows), or None: the module default `IMPL`.
    """
    if q_positions is not None:
        return reference.selected_attention(q, k, v, indices, valid, gates,
                                            block_size=block_size, causal=causal, scale=scale, q_positions=q_positions)
    b, nq, h, d = q.shape
    nk, kh = k.shape[1], k.shape[2]
    g = h // kh
    sh, num_sel = indices.shape[2], indices.shape[3]
    shared = sh == kh
    rows = next_pow2(g) if shared else 1
    upk = 1 if shared else g
    scale = d**-0.5 if scale is None else scale
    dtype = jnp.result_type(q, k, v)
    d_pad = max(MIN_DOT, next_pow2(d))
    sbp = next_pow2(block_size)
    if rows >= MIN_DOT:
        sbp = max(sbp, MIN_DOT)
    nb = cdiv(nk, block_size)
    kp = next_pow2(max(num_sel, 1))
    # Split a key block's query list when blocks are selected by many queries on average
    # (early blocks get several times the mean under causal selection).
    dkv_splits = max(1, min(8, (nq * num_sel * upk) // (nb * dkv_entries_per_program)))
    contrib_bytes = 2 * 4 * b * nq * sh * (kp + 1) * sbp * d_pad
    if dkv_impl == "auto":
        dkv_impl = "scatter" if rows < MIN_DOT and contrib_bytes <= DKV_SCATTER_MAX_BYTES else "inverted"
    if dkv_impl not in ("scatter", "inverted"):
        raise ValueError(f"dkv_impl must be 'auto', 'scatter' or 'inverted', got {dkv_impl!r}")
    cfg = _Config(sb=block_size, sbp=sbp, nb=nb, nq=nq, num_sel=num_sel, kp=kp, rows=rows, groups_per_kv=upk,
                  dkv_splits=dkv_splits, dkv_scatter=dkv_impl == "scatter",
                  causal=causal, scale=float(scale), num_warps=num_warps, num_stages=num_stages,
                  interpret=interpret_mode())

    # [b, nq, h, d] -> [b, nq, groups, rows, d_pad]; shared groups padded to a power of two.
    qg = q.astype(dtype).reshape(b, nq, kh, g, d)
    qg = pad_axis(pad_axis(qg, 4, d_pad), 3, rows * upk).reshape(b, nq, sh, rows, d_pad)
    nk_alloc = nb * block_size + (sbp - block_size)  # every [blk * sb, + sbp) load in bounds
    kp_, vp_ = (pad_axis(pad_axis(x.astype(dtype), 3, d_pad), 1, nk_alloc) for x in (k, v))
    if num_sel == 0:
        idx = jnp.zeros((b, nq, sh, kp), jnp.int32)
        val = jnp.zeros((b, nq, sh, kp), jnp.int32)
        gate = jnp.ones((b, nq, sh, kp), F32)
    else:
        idx = pad_axis(indices.astype(jnp.int32), 3, kp)
        val = pad_axis(valid.astype(jnp.int32), 3, kp)
        gate = jnp.ones(indices.shape, F32) if gates is None else gates.astype(F32)
        gate = jnp.concatenate([gate, jnp.ones((b, nq, sh, kp - num_sel), F32)], axis=-1)
    impl = IMPL if impl is None else impl
    if impl == "auto":
        impl = "tiled" if rows < MIN_DOT else "query"
    if impl == "tiled":
        o = _tiled(qg, kp_, vp_, idx, val, gate, sb=block_size, nb=nb, num_sel=num_sel, kp=kp, upk=upk,
                   causal=causal, scale=float(scale), tile_rows=tile_rows or TILE_ROWS, num_warps=num_warps,
                   num_stages=num_stages)
    elif impl == "query":
        o = _selected(cfg, qg, kp_, vp_, idx, val, gate)  # [b, nq, sh, rows, d_pad]
    else:
        raise ValueError(f"impl must be 'auto', 'query' or 'tiled', got {impl!r}")
    o = o.reshape(b, nq, kh, upk * rows, d_pad)[:, :, :, :g, :d]
    return o.reshape(b, nq, h, d).astype(q.dtype)


def _tiled(qg, k, v, idx, val, gate, *, sb, nb, num_sel, kp, upk, causal, scale, tile_rows, num_warps, num_stages):
    """The per-query layout [b, nq, groups, rows, d] through `selected_tiled` and back."""
    from kernels.selected_tiled import ATOMIC_DKV, TiledConfig, candidates, tiled_selected

    b, nq, groups, rows, d = qg.shape
    bq = max(1, tile_rows // rows)
    nq_pad = -(-nq // bq) * bq
    sbp = max(MIN_DOT, next_pow2(sb))
    k, v = (pad_axis(x, 1, nb * sb + sbp - sb) for x in (k, v))
    cfg = TiledConfig(sb=sb, sbp=sbp, nb=nb, nq=nq, num_sel=num_sel, kp=kp, rows=rows, bq=bq,
                      groups_per_kv=upk, causal=causal, scale=scale, num_warps=num_warps,
                      num_stages=num_stages, interpret=interpret_mode(), atomic_dkv=ATOMIC_DKV,
                      dkv_splits=max(1, min(8, nq_pad // bq // TILES_PER_DKV_SPLIT)))
    q_t = pad_axis(qg.transpose(0, 2, 1, 3, 4), 2, nq_pad).reshape(b, groups, nq_pad * rows, d)

    per_query = lambda x: pad_axis(x.transpose(0, 2, 1, 3), 2, nq_pad)  # noqa: E731  [b, groups, nq_pad, kp]
    per_row = lambda x: jnp.repeat(per_query(x), rows, axis=2)  # noqa: E731  [b, groups, nq_pad * rows, kp]
    cand, meta = candidates(cfg, per_query(idx), per_query(val))
    o = tiled_selected(cfg, q_t, k, v, per_row(idx), per_row(val), per_row(gate), cand, meta)
    return o.reshape(b, groups, nq_pad, rows, d)[:, :, :nq].transpose(0, 2, 1, 3, 4)

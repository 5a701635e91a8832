"""Selected attention, one program per query: the kernels for selection groups of >= 16 rows.

Forward and dq kernels: one program per (query, batch, selection group); a selection group
is the g query heads of a kv head when they share the selection (the paper's 16), so the
tile rows are those g heads and each selected K/V block is loaded once for all of them;
with per-head selection a group is one head. The program loops over its k' selected
blocks (dynamic `pl.ds(idx * sb, ...)` loads, invalid ones masked) and then its own block,
with an online softmax in float32 (base 2; the log-sum-exp is saved).

dk/dv kernel: the transpose of the selection is an inverted index built in XLA (the
(query, slot) pairs of each batch and group sorted by block, offsets by binary search), so
one program per (key block, split, batch, kv head) keeps its dk/dv tile in registers and
visits only the queries that selected the block (plus the block's own queries for the
own-block term), `dkv_chunk` of them per step: their rows of q and dO are gathered into one
[chunk * G, d] tile, so each step is a few large matmuls instead of chunk small ones (4
queries x 16 heads: 1.8x faster than one query per step at T = 64k, H200). Heavily selected
blocks (early blocks, under causal selection) have their query list split over `dkv_splits`
programs whose float32 partial sums XLA adds. From `dkv_range_split_blocks` key blocks on the
splits are query ranges, not equal counts: split s of every block takes the s-th of
`dkv_splits` equal ranges of the queries that can pick it, so the programs that run together
(neighbouring blocks, one split) gather q and dO rows from one range of queries, which L2 then
holds (fla config, T = 64k, H200: dk/dv 13.71 -> 13.23 ms against equal counts; at T = 8k equal
counts win, 1.89 against 2.14). No atomics, deterministic; cost O(n * k' * sb), like the
forward.

dq (`cfg.stored_ds`, the default unpacked): the dk/dv kernel runs first and also stores the
ds tile [sb, G] of every (query, selected block) pair at the pair's position in the sorted
lists (entry outermost: the dq kernel reads each tile as one contiguous 2 KB piece; the dk/dv
kernel scatters a step's tile) and the own block's tile per query; the dq kernel then reads K
and those tiles, one matmul per block, instead of K and V with three, and takes dgate from the
same product (H200, fla config, T = 64k, dq + dk/dv: 30.2 ms recomputing, 29.1 storing ds *
gate and dgate parts, 26.7 storing ds alone keys outermost, 25.6 entry outermost). Otherwise
(packed documents, whose own blocks straddle two aligned key blocks, or `store_dlogits=False`)
a dq kernel per query recomputes the logits and also gives dgate.

Reference quirk reproduced: non-causal, k' > 0, a query group with no valid block attends
uniformly to the tokens of all its selected blocks (logits forced to 0, no gradient to q,
k or the gates). Tiles smaller than the matrix unit's 16 rows (g < 16, or per-head
selection) use a broadcast multiply-reduce: correct, but `kernels.selected_tiled` is the
fast path there.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels._common import (
    F32, LOG2E, MASK_VALUE, add_phantom_keys, compiler_params, interpret_mode, iota, mm, online_softmax_step,
    pad_axis, softmax_delta, softmax_finish, softmax_init,
)
from kernels._selected_common import (
    Packed, SelectedConfig, own_attended, own_block_range, own_keys, slot_tiles_to_keys, sort_by_block,
)
from kernels.settings import SelectedSettings, query_dkv_splits


@dataclasses.dataclass(frozen=True)
class QueryConfig(SelectedConfig):
    dkv_splits: int  # programs sharing one key block's query list in the dk/dv kernel
    dkv_chunk: int = 1  # dk/dv: entries of a block's query list gathered per step (a power of two)
    dkv_num_warps: int = 4  # dk/dv kernel's warps
    dkv_num_stages: int = 2  # dk/dv kernel's pipeline stages
    stored_ds: bool = False  # dq from the dk/dv kernel's stored dlogits (never with packed documents)
    dq_num_stages: int = 2  # that dq kernel's pipeline stages
    dq_num_warps: int = 1  # that dq kernel's warps
    split_by_range: bool = True  # dk/dv splits: query ranges (else equal counts of a block's list)

    @classmethod
    def from_settings(cls, settings: SelectedSettings, *, packed: bool, **shape) -> QueryConfig:
        """The configuration of a call with this static shape (`SelectedConfig`'s fields sb .. scale
        and gate_grad) under `settings`."""
        return cls(**shape, packed=packed, num_warps=settings.query_num_warps, num_stages=settings.query_num_stages,
                   interpret=interpret_mode(),
                   dkv_splits=query_dkv_splits(settings, shape["nq"], shape["num_sel"], shape["groups_per_kv"],
                                               shape["nb"]),
                   dkv_chunk=settings.dkv_chunk, dkv_num_warps=settings.dkv_num_warps,
                   dkv_num_stages=settings.dkv_num_stages, stored_ds=settings.store_dlogits and not packed,
                   dq_num_stages=settings.dq_num_stages, dq_num_warps=settings.dq_num_warps,
                   split_by_range=shape["nb"] >= settings.dkv_range_split_blocks)


def _usable(cfg: QueryConfig, blk, ok, zero_row):
    use = ok | zero_row if cfg.zero_rows_possible else ok
    return use & (blk >= 0) & (blk < cfg.nb)


def _block_start(cfg: QueryConfig, blk, slot_ref):
    """First key token of selected block (slot) blk."""
    blk = jnp.clip(blk, 0, cfg.nb - 1)
    return slot_ref[blk] if cfg.packed else blk * cfg.sb


def _own(cfg: QueryConfig, t, bounds_ref, idx_vec, valid_vec, k_ref, v_ref):
    """Query t's own block: its keys and values [sbp, d] and (mask [sbp], phantom keys or None)."""
    bounds = (bounds_ref[0], bounds_ref[1]) if cfg.packed else None
    lo = own_block_range(cfg, t, bounds)[0]
    mask, phantom = own_keys(cfg, t, lo + iota(cfg.sbp), bounds, idx_vec, valid_vec)
    return k_ref[pl.ds(lo, cfg.sbp), :], v_ref[pl.ds(lo, cfg.sbp), :], mask, phantom


def _fwd_kernel(q_ref, k_ref, v_ref, idx_ref, valid_ref, gate_ref, *refs, cfg: QueryConfig):
    *packed, o_ref, lse_ref = refs  # packed: document bounds [2] and the slot table [nb]
    bounds_ref, slot_ref = packed if cfg.packed else (None, None)
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
        start = _block_start(cfg, blk, slot_ref)
        kb = k_ref[pl.ds(start, cfg.sbp), :]  # [sbp, d]
        vb = v_ref[pl.ds(start, cfg.sbp), :]
        s = mm(q, kb, trans_b=True) * (gate_ref[i] * c)  # [G, sbp]
        if cfg.zero_rows_possible:
            s = jnp.where(zero_row, 0.0, s)
        return online_softmax_step(carry, jnp.where(in_block & use, s, MASK_VALUE), vb)

    # Row sums as a [G, sbp] tile, summed once after the loop (the block's keys are split over warps).
    acc, m_i, l_tile = lax.fori_loop(0, cfg.num_sel, body, softmax_init(*q.shape, sum_tile=cfg.sbp))
    carry = acc, m_i, l_tile.sum(axis=1)
    if cfg.own_block:
        kb, vb, mask, phantom = _own(cfg, t, bounds_ref, idx_vec, valid_vec, k_ref, v_ref)
        s = mm(q, kb, trans_b=True) * c
        carry = online_softmax_step(carry, jnp.where(mask[None, :], s, MASK_VALUE), vb)
        if phantom is not None:
            carry = add_phantom_keys(carry, jnp.broadcast_to(phantom, (q.shape[0],)).astype(F32))
    o, lse = softmax_finish(carry)
    o_ref[...] = o.astype(o_ref.dtype)
    lse_ref[...] = lse


def _dq_kernel(q_ref, k_ref, v_ref, idx_ref, valid_ref, gate_ref, do_ref, lse_ref, delta_ref, *refs,
               cfg: QueryConfig):
    """dq and the dgates of one query group."""
    *packed, dq_ref, dgate_ref = refs
    bounds_ref, slot_ref = packed if cfg.packed else (None, None)
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
    slots = iota(cfg.kp)[None, :]

    def dlogits(vb, s, mask):
        """dL/dlogits (natural) [G, sbp] for base-2 logits s."""
        p = jnp.where(mask, jnp.exp2(s - lse), 0.0)
        return p * (mm(do, vb, trans_b=True) - delta)

    def body(i, carry):
        dq, dgate = carry
        blk = idx_ref[i]
        gate = gate_ref[i]
        use = _usable(cfg, blk, valid_ref[i] > 0, zero_row)
        start = _block_start(cfg, blk, slot_ref)
        kb = k_ref[pl.ds(start, cfg.sbp), :]
        vb = v_ref[pl.ds(start, cfg.sbp), :]
        qk = mm(q, kb, trans_b=True) * c  # [G, sbp], without the gate
        s = qk * gate
        if cfg.zero_rows_possible:
            s = jnp.where(zero_row, 0.0, s)
        ds = dlogits(vb, s, in_block & use)
        if cfg.zero_rows_possible:
            ds = jnp.where(zero_row, 0.0, ds)
        dq = dq + mm((ds * gate).astype(kb.dtype), kb)
        # Per row here, summed over the rows once after the loop (no cross-warp sum per block).
        if cfg.gate_grad:
            dgate = jnp.where(slots == i, jnp.sum(ds * qk, axis=1)[:, None], dgate)
        return dq, dgate

    rows, d = q.shape
    dq, dgate = lax.fori_loop(0, cfg.num_sel, body, (jnp.zeros((rows, d), F32), jnp.zeros((rows, cfg.kp), F32)))
    dgate = jnp.sum(dgate, axis=0) * (1.0 / LOG2E)
    if cfg.own_block:
        kb, vb, mask, _ = _own(cfg, t, bounds_ref, idx_vec, valid_vec, k_ref, v_ref)
        s = mm(q, kb, trans_b=True) * c
        dq = dq + mm(dlogits(vb, s, mask[None, :]).astype(kb.dtype), kb)
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)
    dgate_ref[...] = dgate


def _dq_stored_kernel(q_ref, k_ref, idx_ref, valid_ref, gate_ref, pos_ref, ds_ref, ds_own_ref, dq_ref, dgate_ref, *,
                      cfg: QueryConfig):
    """dq and the dgates of one query group from the dlogits the dk/dv kernel stored
    (`cfg.stored_ds`): per selected block a [sbp, G] tile of ds (at the entry's position `pos` in
    the sorted lists) and the own block's tile. Only K is read. The block's x = ds^T K gives both
    dq (gate * x) and the dgate (sum(x * q) = sum(ds * q.k)), so the dk/dv kernel keeps no q.k."""
    t = pl.program_id(0)
    q = q_ref[...].astype(F32) if cfg.gate_grad else None  # [G, d]
    valid_vec = valid_ref[...] > 0
    zero_row = jnp.logical_not(jnp.max(jnp.where(valid_vec, 1, 0)) > 0)
    slots = iota(cfg.kp)[None, :]

    def body(i, carry):
        dq, dgate = carry
        blk = idx_ref[i]
        use = _usable(cfg, blk, valid_ref[i] > 0, zero_row)
        kb = k_ref[pl.ds(_block_start(cfg, blk, None), cfg.sbp), :]
        # The [sbp, G] tile read as ds^T [G, sbp] through its indices goes from its asynchronous copy
        # straight into the matmul (loading it whole and transposing, or masking it before the matmul,
        # round-trips it through registers and shared memory). An unused slot's tile is garbage (maybe
        # NaN), so the select comes after the matmul.
        ds = ds_ref[pos_ref[i], iota(cfg.sbp)[None, :], iota(cfg.rows)[:, None]]  # [G, sbp]
        x = jnp.where(use, mm(ds.astype(kb.dtype), kb), 0.0)  # [G, d]
        # Per row here, summed over the rows once after the loop (no cross-warp sum per block).
        if cfg.gate_grad:
            dgate = jnp.where(slots == i, jnp.sum(x * q, axis=1)[:, None], dgate)
        return dq + x * gate_ref[i], dgate

    rows, d = dq_ref.shape
    dq, dgate = lax.fori_loop(0, cfg.num_sel, body, (jnp.zeros((rows, d), F32), jnp.zeros((rows, cfg.kp), F32)))
    if cfg.own_block:
        lo = own_block_range(cfg, t, None)[0]
        dq = dq + mm(ds_own_ref[...], k_ref[pl.ds(lo, cfg.sbp), :], trans_a=True)
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)
    dgate_ref[...] = jnp.sum(dgate, axis=0) * cfg.scale  # natural-log logits: scale * LOG2E / LOG2E


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, idx_ref, valid_ref, qid_ref, sgate_ref, split_ref,
                 *refs, cfg: QueryConfig, part: str):
    """dk, dv of key block j: the queries that selected it (split `split` of cfg.dkv_splits parts of
    that list), then the queries with keys of it in their own block (split 0). Packed ("packed"),
    a selected block is block slot j (from the slot table) and one more program per j
    (split = cfg.dkv_splits) takes the own blocks' keys j * sb + ..., into their own tile."""
    n_out = 4 if cfg.stored_ds else 2
    *packed, dk_ref, dv_ref = refs[:len(refs) - n_out + 2]  # packed: bounds [nq, 2], slots [nb], own queries [nb, 2]
    # stored_ds: ds (without the gate) [upk, e + 1, sbp, G] per entry, the same per own query
    # [upk, nq + 1, sbp, G]. Entry outermost, so that dq reads a tile in one piece (keys outermost made
    # dk/dv's stores one block store but dq's reads 64 rows of 32 bytes: 0.35 ms slower dk/dv and 0.75
    # slower dq at T = 64k, fla config, H200). The spare entry at the end takes a chunk's out-of-range rows.
    ds_ref, ds_own_ref = refs[len(refs) - 2:] if cfg.stored_ds else (None, None)
    bounds_ref, slot_ref, own_ref = packed if cfg.packed else (None, None, None)
    j = pl.program_id(0)
    split = pl.program_id(1)
    rows = cfg.rows
    d = q_ref.shape[-1]
    if part == "packed":
        own_program = split == cfg.dkv_splits
        first_key = jnp.where(own_program, j * cfg.sb, slot_ref[j])
    else:
        own_program, first_key = split == 0, j * cfg.sb
    kb = k_ref[pl.ds(first_key, cfg.sbp), :]  # [sbp, d]
    vb = v_ref[pl.ds(first_key, cfg.sbp), :]
    c = cfg.scale * LOG2E
    in_block = (iota(cfg.sbp) < cfg.sb)[:, None]  # [sbp, 1]

    def accumulate(carry, q, do, lse, delta, gate, mask, zero_row):
        """Add the contribution of query rows q, do [R, d] (lse, delta, gate [1, R] or scalars) to
        this block's dk, dv. Transposed scores [sbp, R] (keys in the matmul M dimension): no tile
        transposes in registers."""
        dk, dv = carry
        qk_t = mm(kb, q, trans_b=True) * c  # [sbp, R], without the gate
        s_t = qk_t * gate
        if zero_row is not None:
            s_t = jnp.where(zero_row, 0.0, s_t)
        p_t = jnp.where(mask, jnp.exp2(s_t - lse), 0.0)
        dv = dv + mm(p_t.astype(do.dtype), do)  # [sbp, d]
        ds_t = p_t * (mm(vb, do, trans_b=True) - delta)
        if zero_row is not None:
            ds_t = jnp.where(zero_row, 0.0, ds_t)
        dk = dk + mm((ds_t * gate).astype(q.dtype), q)
        return (dk, dv), ds_t.astype(q.dtype)  # and ds (without the gate) for the stored-dlogits dq

    r = iota(cfg.dkv_chunk * rows)  # the rows of a chunk: entry (or query) r // G, head r % G
    head_of_row = lax.rem(r, rows)  # [R]

    key_of_tile = iota(cfg.sbp)[:, None]  # [sbp, 1]

    def store_rows(ds_out, u, first, ok, ds_t):
        """A chunk's rows (entries first ..., those with ok; the others to the spare entry) of ds [sbp, R]."""
        ent = jnp.where(ok, first + lax.div(r, rows), ds_out.shape[1] - 1)[None, :]  # [1, R]
        ds_out[u, ent, key_of_tile, head_of_row[None, :]] = ds_t

    def per_group(u, carry):
        def selected(i, carry, first, stop):
            """Entries first + i * chunk ... of the block's list at once: [chunk * G] rows gathered."""
            e = first + i * cfg.dkv_chunk + lax.div(r, rows)  # [R] the row's entry
            ok = e < stop
            e = jnp.minimum(e, stop - 1)
            t = qid_ref[u, e]  # [R] the row's query
            h = u * rows + head_of_row  # [R] its head among the kv head's rows
            zero_row = None
            if cfg.zero_rows_possible:
                zero_row = jnp.logical_not(jnp.max(jnp.where(valid_ref[t, u, :] > 0, 1, 0), axis=1) > 0)[None, :]
            carry, ds_t = accumulate(carry, q_ref[t, h, :], do_ref[t, h, :], lse_ref[t, h][None, :],
                                     delta_ref[t, h][None, :], sgate_ref[u, e][None, :], in_block & ok[None, :],
                                     zero_row)
            if cfg.stored_ds:
                store_rows(ds_ref, u, first + i * cfg.dkv_chunk, ok, ds_t)
            return carry

        first, stop = split_ref[u, j, split], split_ref[u, j, split + 1]  # none for the packed own program
        chunks = lax.div(jnp.maximum(stop - first, 0) + cfg.dkv_chunk - 1, cfg.dkv_chunk)
        carry = lax.fori_loop(0, chunks, functools.partial(selected, first=first, stop=stop), carry)
        if cfg.own_block:  # the queries with keys of this block in their own block, a chunk at a time
            keys = (j * cfg.sb + iota(cfg.sbp))[:, None]  # [sbp, 1]

            def own(i, carry, first, stop):
                t = first + i * cfg.dkv_chunk + lax.div(r, rows)  # [R] the row's query
                ok = t < stop
                t = jnp.minimum(t, stop - 1)
                h = u * rows + head_of_row
                bounds = (bounds_ref[t, 0], bounds_ref[t, 1]) if cfg.packed else None
                lo, hi, slot = own_block_range(cfg, t, bounds)  # [R]
                mask = (keys >= lo[None, :]) & (keys < hi[None, :]) & ok[None, :]  # [sbp, R]
                if cfg.causal:
                    mask = mask & (keys <= t[None, :])
                attend = own_attended(cfg, slot, idx_ref[t, u, :], valid_ref[t, u, :] > 0, keepdims=False)
                if attend is not None:
                    mask = mask & attend[None, :]
                carry, ds_t = accumulate(carry, q_ref[t, h, :], do_ref[t, h, :], lse_ref[t, h][None, :],
                                         delta_ref[t, h][None, :], 1.0, mask, None)
                if cfg.stored_ds:  # unpacked: block j is the own block of each of these queries
                    store_rows(ds_own_ref, u, first + i * cfg.dkv_chunk, ok, ds_t)
                return carry

            # Unpacked: the block's own tokens; packed, own blocks start anywhere (the range from XLA).
            lo, hi = (own_ref[j, 0], own_ref[j, 1]) if cfg.packed else (j * cfg.sb, j * cfg.sb + cfg.sb)
            stop = jnp.where(own_program, jnp.minimum(hi, cfg.nq), lo)
            chunks = lax.div(jnp.maximum(stop - lo, 0) + cfg.dkv_chunk - 1, cfg.dkv_chunk)
            carry = lax.fori_loop(0, chunks, functools.partial(own, first=lo, stop=stop), carry)
        return carry

    zeros = jnp.zeros((cfg.sbp, d), F32)
    dk, dv = lax.fori_loop(0, cfg.groups_per_kv, per_group, (zeros, zeros))
    dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _group_specs(cfg: QueryConfig, d: int):
    """BlockSpecs of the per-(query, batch, group) kernels; grid (nq, b, groups)."""
    q_spec = pl.BlockSpec((None, None, None, cfg.rows, d), lambda t, bi, s: (bi, t, s, 0, 0))
    row_spec = pl.BlockSpec((None, None, None, cfg.rows), lambda t, bi, s: (bi, t, s, 0))
    sel_spec = pl.BlockSpec((None, None, None, cfg.kp), lambda t, bi, s: (bi, t, s, 0))
    return q_spec, row_spec, sel_spec


def _kv_spec(cfg: QueryConfig, nk_alloc: int, d: int):
    """All keys of the group's kv head: [nk_alloc, d]."""
    return pl.BlockSpec((None, nk_alloc, None, d), lambda t, bi, s: (bi, 0, s // cfg.groups_per_kv, 0))


def _packed_specs(cfg: QueryConfig, full: bool):
    """BlockSpecs of the packed inputs (document bounds [b, nq, 2], slot table [b, nb], own queries
    [b, nb, 2]): per query, or every query (`full`, the dk/dv kernel's grid (nb, splits, b, kh))."""
    if not cfg.packed:
        return []
    if full:
        return [pl.BlockSpec((None, cfg.nq, 2), lambda j, sp, bi, h: (bi, 0, 0)),
                pl.BlockSpec((None, cfg.nb), lambda j, sp, bi, h: (bi, 0)),
                pl.BlockSpec((None, cfg.nb, 2), lambda j, sp, bi, h: (bi, 0, 0))]
    return [pl.BlockSpec((None, None, 2), lambda t, bi, s: (bi, t, 0)),
            pl.BlockSpec((None, cfg.nb), lambda t, bi, s: (bi, 0))]


def _packed_args(packed: Packed | None, full: bool) -> list:
    if packed is None:
        return []
    return [jnp.stack([packed.start, packed.end], axis=-1), packed.slot_start] + ([packed.own_queries] if full else [])


def _forward(cfg: QueryConfig, q, k, v, idx, valid, gate, packed: Packed | None):
    """q [b, nq, groups, G, d]; k, v [b, nk_alloc, kh, d]; idx/valid/gate [b, nq, groups, kp]."""
    b, nq, groups, rows, d = q.shape
    q_spec, row_spec, sel_spec = _group_specs(cfg, d)
    kv_spec = _kv_spec(cfg, k.shape[1], d)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg),
        grid=(nq, b, groups),
        in_specs=[q_spec, kv_spec, kv_spec, sel_spec, sel_spec, sel_spec] + _packed_specs(cfg, False),
        out_specs=[q_spec, row_spec],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, nq, groups, rows), F32)],
        compiler_params=compiler_params(cfg.num_warps, cfg.num_stages),
        interpret=cfg.interpret,
        name="nsa_selected_fwd",
    )(q, k, v, idx, valid, gate, *_packed_args(packed, False))


def _inverted_index(cfg: QueryConfig, idx, valid):
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


def _split_bounds(cfg: QueryConfig, qid, offsets, programs: int):
    """Where each dk/dv program's part of a block's query list starts: qid [rows, e] the query of
    each sorted entry (ascending within a block), offsets [rows, nb + 1] -> [rows, nb, programs + 1].
    `cfg.split_by_range`: split s < dkv_splits of block j takes the entries whose query lies in the
    s-th of dkv_splits equal ranges of [first query that can pick j, nq) (a binary search within
    each block's entries, all at once); otherwise the s-th of dkv_splits equal counts. Splits past
    those (the packed own-block program) get none."""
    rows, e = qid.shape
    splits = cfg.dkv_splits
    s = jnp.minimum(jnp.arange(programs + 1, dtype=jnp.int32), splits)
    start, end = offsets[:, :-1, None], offsets[:, 1:, None]  # [rows, nb, 1]
    if not cfg.split_by_range:
        per = (end - start + splits - 1) // splits
        return jnp.minimum(start + s * per, end).astype(jnp.int32)
    first_q = jnp.arange(cfg.nb, dtype=jnp.int32)[:, None] * (cfg.sb if cfg.causal and not cfg.packed else 0)
    bound = first_q + (s * (cfg.nq - first_q) + splits - 1) // splits  # [nb, programs + 1]
    bound = jnp.where(s == 0, 0, bound)  # (s = splits gives nq)

    def halve(_, lo_hi):  # the answer stays in [lo, hi]: the first entry whose query >= bound, else hi
        lo, hi = lo_hi
        mid = (lo + hi) // 2
        q_mid = jnp.take_along_axis(qid, jnp.minimum(mid, e - 1).reshape(rows, -1), axis=1).reshape(mid.shape)
        right = (lo < hi) & (q_mid < bound)
        return jnp.where(right, mid + 1, lo), jnp.where(right | (lo >= hi), hi, mid)

    shape = (rows, cfg.nb, programs + 1)
    lo, _ = lax.fori_loop(0, e.bit_length(), halve, (jnp.broadcast_to(start, shape), jnp.broadcast_to(end, shape)),
                          unroll=True)
    return lo.astype(jnp.int32)


def _dq_recomputed(cfg: QueryConfig, q, k, v, idx, valid, gate, packed: Packed | None, lse, do, delta):
    """dq and dgate by the per-query dq kernel (recomputes each block's logits from K and V)."""
    b, nq, groups, _, d = q.shape
    q_spec, row_spec, sel_spec = _group_specs(cfg, d)
    kv_spec = _kv_spec(cfg, k.shape[1], d)
    return pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg),
        grid=(nq, b, groups),
        in_specs=[q_spec, kv_spec, kv_spec, sel_spec, sel_spec, sel_spec, q_spec, row_spec, row_spec]
        + _packed_specs(cfg, False),
        out_specs=[q_spec, sel_spec],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(idx.shape, F32)],
        compiler_params=compiler_params(cfg.num_warps, cfg.num_stages),
        interpret=cfg.interpret,
        name="nsa_selected_dq",
    )(q, k, v, idx, valid, gate, do, lse, delta, *_packed_args(packed, False))


def query_dq_from_stored(cfg: QueryConfig, q, k, idx, valid, gate, order, ds, ds_own):
    """dq and dgate from the dk/dv kernel's stored dlogits (`cfg.stored_ds`).

    order [b, groups, e] sorts the entries (query * kp + slot) by block; ds [b, kh, upk, e + 1,
    sbp, G], ds_own [b, kh, upk, nq + 1, sbp, G] (the last entry of each is spare).
    """
    b, nq, groups, rows, d = q.shape
    upk, e = cfg.groups_per_kv, nq * cfg.kp
    ent = jnp.arange(e, dtype=jnp.int32)
    pos = jax.vmap(jax.vmap(lambda o: jnp.zeros_like(o).at[o].set(ent)))(order)  # [b, groups, e]: inverse of order
    pos = pos.reshape(b, groups, nq, cfg.kp)  # read in this layout: no transpose
    pos_spec = pl.BlockSpec((None, None, None, cfg.kp), lambda t, bi, s: (bi, s, t, 0))
    q_spec, _, sel_spec = _group_specs(cfg, d)
    return pl.pallas_call(
        functools.partial(_dq_stored_kernel, cfg=cfg),
        grid=(nq, b, groups),
        in_specs=[q_spec, _kv_spec(cfg, k.shape[1], d), sel_spec, sel_spec, sel_spec, pos_spec,
                  pl.BlockSpec((None, None, None, e + 1, cfg.sbp, rows), lambda t, bi, s: (bi, s // upk, s % upk, 0, 0, 0)),
                  pl.BlockSpec((None, None, None, None, cfg.sbp, rows), lambda t, bi, s: (bi, s // upk, s % upk, t, 0, 0))],
        out_specs=[q_spec, sel_spec],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(idx.shape, F32)],
        compiler_params=compiler_params(cfg.dq_num_warps, cfg.dq_num_stages),
        interpret=cfg.interpret,
        name="nsa_selected_dq_stored",
    )(q, k, idx, valid, gate, pos, ds, ds_own)


def _backward(cfg: QueryConfig, q, k, v, idx, valid, gate, packed: Packed | None, o, lse, do):
    delta = softmax_delta(o, do)  # [b, nq, groups, G]
    if not cfg.stored_ds:
        dq, dgate = _dq_recomputed(cfg, q, k, v, idx, valid, gate, packed, lse, do, delta)
    dk, dv, order, stored_out = query_dkdv(cfg, q, k, v, idx, valid, gate, packed, lse, do, delta)
    if cfg.stored_ds:
        dq, dgate = query_dq_from_stored(cfg, q, k, idx, valid, gate, order, *stored_out)
    return dq, dk, dv, dgate


def query_dkdv(cfg: QueryConfig, q, k, v, idx, valid, gate, packed: Packed | None, lse, do, delta):
    """dk, dv [b, nk_alloc, kh, d] by the kernel over each key block's query list (the inverted
    index), and that index's entry order and (stored_ds) the dlogits dq reads. q, do [b, nq,
    groups, G, d]; lse, delta [b, nq, groups, G]; idx / valid / gate [b, nq, groups, kp]."""
    b, nq, groups, rows, d = q.shape
    kh = k.shape[2]
    upk = cfg.groups_per_kv
    order, offsets = _inverted_index(cfg, idx, valid)
    gate_flat = gate.transpose(0, 2, 1, 3).reshape(b, groups, nq * cfg.kp)
    sorted_gate = jnp.take_along_axis(gate_flat, order, axis=-1)
    qid = (order // cfg.kp).astype(jnp.int32)
    e = nq * cfg.kp
    gr = upk * rows  # query rows per kv head
    part, splits = ("all", cfg.dkv_splits) if packed is None else ("packed", cfg.dkv_splits + 1)
    bounds = _split_bounds(cfg, qid.reshape(b * groups, e), offsets.reshape(b * groups, cfg.nb + 1), splits)
    bounds_spec = pl.BlockSpec((None, None, upk, cfg.nb, splits + 1), lambda j, sp, bi, h: (bi, h, 0, 0, 0))
    q_full = pl.BlockSpec((None, nq, None, gr, d), lambda j, sp, bi, h: (bi, 0, h, 0, 0))
    row_full = pl.BlockSpec((None, nq, None, gr), lambda j, sp, bi, h: (bi, 0, h, 0))
    sel_full = pl.BlockSpec((None, nq, None, upk, cfg.kp), lambda j, sp, bi, h: (bi, 0, h, 0, 0))
    ent_spec = pl.BlockSpec((None, None, upk, e), lambda j, sp, bi, h: (bi, h, 0, 0))
    kv_full = pl.BlockSpec((None, k.shape[1], None, d), lambda j, sp, bi, h: (bi, 0, h, 0))
    out_spec = pl.BlockSpec((None, None, None, cfg.sbp, None, d), lambda j, sp, bi, h: (sp, bi, j, 0, h, 0))
    as_kv = lambda x: x.reshape(b, nq, kh, gr, *x.shape[4:])  # [b, nq, groups, G, ..] -> per kv head
    inputs = (as_kv(q), k, v, as_kv(do), as_kv(lse), as_kv(delta),
              idx.reshape(b, nq, kh, upk, cfg.kp), valid.reshape(b, nq, kh, upk, cfg.kp),
              qid.reshape(b, kh, upk, e), sorted_gate.reshape(b, kh, upk, e),
              bounds.reshape(b, kh, upk, cfg.nb, splits + 1),
              *_packed_args(packed, True))

    out_dtype = F32 if splits > 1 else k.dtype  # partial sums stay in f32
    out_specs = [out_spec, out_spec]
    out_shape = [jax.ShapeDtypeStruct((splits, b, cfg.nb, cfg.sbp, kh, d), out_dtype)] * 2
    if cfg.stored_ds:  # + ds per entry and per own query (and a spare one each)
        for count in (e + 1, nq + 1):
            out_shape.append(jax.ShapeDtypeStruct((b, kh, upk, count, cfg.sbp, rows), q.dtype))
            out_specs.append(pl.BlockSpec((None, None, upk, count, cfg.sbp, rows),
                                          lambda j, sp, bi, h: (bi, h, 0, 0, 0, 0)))
    dk, dv, *stored_out = pl.pallas_call(
        functools.partial(_dkdv_kernel, cfg=cfg, part=part),
        grid=(cfg.nb, splits, b, kh),
        in_specs=[q_full, kv_full, kv_full, q_full, row_full, row_full, sel_full, sel_full, ent_spec, ent_spec,
                  bounds_spec] + _packed_specs(cfg, True),
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=compiler_params(cfg.dkv_num_warps, cfg.dkv_num_stages),
        interpret=cfg.interpret,
        name="nsa_selected_dkdv",
    )(*inputs)

    def blocks_to_keys(x):  # [b, nb, sbp, kh, d] -> [b, nk_alloc, kh, d] (zeros past nb * sb)
        x = x[:, :, : cfg.sb].reshape(b, cfg.nb * cfg.sb, kh, d)
        return pad_axis(x, 1, k.shape[1])

    if packed is None:
        dk, dv = (blocks_to_keys(x.sum(axis=0).astype(k.dtype) if splits > 1 else x[0]) for x in (dk, dv))
    else:  # selected blocks are document slots (gathered back to their keys); own blocks aligned (last split)
        dk, dv = ((slot_tiles_to_keys(x[:-1].sum(axis=0), packed.key_source) + blocks_to_keys(x[-1])).astype(k.dtype)
                  for x in (dk, dv))
    return dk, dv, order, stored_out


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def query_selected(cfg: QueryConfig, q, k, v, idx, valid, gate, packed: Packed | None = None):
    """q [b, nq, groups, G, d]; k, v [b, nk_alloc, kh, d] (every [blk * sb, + sbp) load in
    bounds; packed: every [token, + sbp)); idx / valid / gate [b, nq, groups, kp] (packed: block
    slots) -> o like q."""
    return _forward(cfg, q, k, v, idx, valid, gate, packed)[0]


def _query_fwd(cfg: QueryConfig, q, k, v, idx, valid, gate, packed=None):
    o, lse = _forward(cfg, q, k, v, idx, valid, gate, packed)
    return o, (q, k, v, idx, valid, gate, packed, o, lse)


def _query_bwd(cfg: QueryConfig, res, do):
    q, k, v, idx, valid, gate, packed, o, lse = res
    dq, dk, dv, dgate = _backward(cfg, q, k, v, idx, valid, gate, packed, o, lse, do)
    return dq, dk, dv, None, None, dgate, None


query_selected.defvjp(_query_fwd, _query_bwd)

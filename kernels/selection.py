"""Top-k block selection in linear memory: a streaming Pallas kernel, forward and backward.

The reference averages the compressed branch's logits q_h . ck_c * scale over the g query
heads of a kv head (shared selection), then over the r = sb / stride compressed columns of
each selection block (or with interpolation weights). Both averages are linear, so the
block logit is one dot product per selection head and block:

    logit[t, s, j] = qs[t, s] . bk[j, kv(s)] * scale,   qs = mean_h(q) (shared) or q,
                                                         bk = W @ ck  [nb, kh, d]

with W the static [nb, nc] averaging (or interpolation) weights; XLA forms qs and bk (linear
in T). The kernel never writes the [n, nb] logits: one program per tile of queries and kv
head (rows: BQ tokens x the kv head's selection heads) streams over chunks of block keys,
keeping a running max / sum for the softmax normaliser and a running top-k sorted in
registers (k vectors of [R], the k-th best being the admission threshold; a chunk's entries
above it are inserted one per row and round, so a chunk that brings no better block costs
one comparison and two row reductions). Only the probabilities and indices of the picks
[b, n, sh, k] and the log-sum-exp [b, n, sh] reach HBM.

Masking follows the reference: a block is invisible iff (causal) any compressed column with a
nonzero weight ends at or after the query, or (sb != stride) it is the query's own block.
Probabilities are exp(logit - lse) with lse over [-1000, visible block logits], as the
reference's softmax over the padded blocks gives them. Picks are ordered as `lax.top_k`
orders the logits (value descending, lower index first among equal values; masked blocks
rank last, lower index first). The kernel sums the logit's products in another order than the
reference, so two blocks whose logits differ by less than float rounding may swap places, and
blocks whose probabilities underflow to 0 rank by logit here, by index there (invalid picks
either way); the tests compare the valid picks as sets, and exact ties in order
(tests/test_kernels_selection.py).

Backward (diff top-k): with P the block probabilities and dP the picks' cotangents,
dlogit = P * (dP - D), D = sum over the picks of P dP. `SelectionSettings.backward` chooses
how. "picks": the training forward also keeps O = sum_j P_j bk_j (a flash-attention output
over the block keys), so dq = scale * (sum over picks of P dP bk[pick] - D O) is a gather of
k block keys per row; d(block keys) is -sum_t P_tj D_t q_t (one program per chunk of blocks,
kv head and split of the queries that see them, recomputing the logits tile by tile) plus
the picks' P dP q_t summed per block after sorting the picks by block. "passes": dq and
d(block keys) both recompute the logits tile by tile and find the picks among a tile's
blocks by k compare passes.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels._common import F32, MIN_DOT, cdiv, compiler_params, interpret_mode, iota, mm, next_pow2, pad_axis, \
    round_up
from kernels._selected_common import sort_by_block
from kernels.settings import SelectionSettings
from nsa_jax import reference

NO_BLOCK = 1 << 30  # index of an empty top-k slot (value -inf)
MASKED = -3.0e38  # logit of an invisible block: below every logit, above an empty slot; exp() gives 0


def block_weights(nc: int, stride: int, sb: int, interpolated: bool) -> np.ndarray:
    """W [nb, nc] (float32) with block logits = W @ column logits, as `reference.block_importance`."""
    if sb == stride:
        return np.eye(nc, dtype=np.float32)
    if interpolated:
        # Token j of the interpolated scores = (1 - w) * col[lo] + w * col[hi]; see
        # reference._interpolate_to_tokens (computed in float32 there too).
        j = np.arange(nc * stride, dtype=np.float32)
        src = np.maximum((j + np.float32(0.5)) / np.float32(stride) - np.float32(0.5), np.float32(0.0))
        lo = np.floor(src).astype(np.int64)
        hi = np.minimum(lo + 1, nc - 1)
        w = (src - lo).astype(np.float32)
        nb = (nc * stride) // sb
        weights = np.zeros((nb, nc), np.float64)
        for tok in range(nb * sb):
            weights[tok // sb, lo[tok]] += 1.0 - w[tok]
            weights[tok // sb, hi[tok]] += w[tok]
        return (weights / sb).astype(np.float32)
    r = sb // stride
    nb = nc // r
    weights = np.zeros((nb, nc), np.float32)
    for blk in range(nb):
        weights[blk, blk * r: (blk + 1) * r] = 1.0 / r
    return weights


def num_blocks(nc: int, stride: int, sb: int, interpolated: bool) -> int:
    """Selection blocks of nc compressed columns (a trailing partial block is dropped)."""
    if sb == stride:
        return nc
    return (nc * stride) // sb if interpolated else nc // (sb // stride)


def _block_keys(ck: jax.Array, nc: int, stride: int, sb: int, interpolated: bool) -> jax.Array:
    """ck [b, nc, kh, d] -> W @ ck [b, nb, kh, d] in float32."""
    ck = ck.astype(F32)
    b, _, kh, d = ck.shape
    if sb == stride:
        return ck
    if not interpolated:  # mean of r consecutive columns: a reshape, no weight matrix
        r = sb // stride
        nb = nc // r
        return ck[:, : nb * r].reshape(b, nb, r, kh, d).mean(axis=2)
    weights = jnp.asarray(block_weights(nc, stride, sb, interpolated))
    return jnp.einsum("jc,bckd->bjkd", weights, ck)


def _last_column(nc: int, stride: int, sb: int, interpolated: bool) -> np.ndarray:
    """[nb]: the last compressed column each block's logit uses with a nonzero weight."""
    if sb == stride:
        return np.arange(nc)
    if not interpolated:
        r = sb // stride
        return np.arange(nc // r) * r + r - 1
    weights = block_weights(nc, stride, sb, interpolated)
    return np.array([np.nonzero(row)[0].max() for row in weights], np.int64)


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static description of one selection call (hashable: the custom_vjp's static argument)."""

    scale: float
    causal: bool
    own_block: bool  # sb != stride: a query's own block is never picked
    sb: int
    stride: int
    nc: int
    nb: int  # real blocks
    interpolated: bool
    n: int  # real queries
    gs: int  # selection heads per kv head (g when heads select separately, else 1)
    k: int  # picks per row
    kp: int  # pick slots in HBM (power of two >= k)
    block_q: int  # tokens per forward / dq tile (rows = block_q * gs)
    block_k: int  # blocks per forward / dq chunk
    block_q_dbk: int
    block_k_dbk: int
    n_pad: int
    nb_pad: int
    dbk_splits: int
    backward: str  # "picks" or "passes"
    num_warps: int
    num_stages: int
    interpret: bool


def _first_visible(cfg: _Config) -> np.ndarray:
    """[nb_pad] int32: the first query position that sees each block (padding: never)."""
    fv = np.full(cfg.nb_pad, np.iinfo(np.int32).max, np.int32)
    if cfg.causal:
        last = _last_column(cfg.nc, cfg.stride, cfg.sb, cfg.interpolated)
        fv[: cfg.nb] = (last + 1) * cfg.stride
    else:
        fv[: cfg.nb] = 0
    return fv


def _chunks_per_tile(cfg: _Config, fv: np.ndarray) -> np.ndarray:
    """[n_pad / block_q] int32: block chunks a query tile visits (those with a block visible to
    its last token; at least the first, so that every pick slot gets a real block)."""
    last = np.minimum(np.arange(1, cfg.n_pad // cfg.block_q + 1) * cfg.block_q, cfg.n) - 1
    visible = np.searchsorted(fv[: cfg.nb], last, side="right")  # fv is non-decreasing
    return np.maximum(1, -(-visible // cfg.block_k)).astype(np.int32)


def _first_tile_per_chunk(cfg: _Config, fv: np.ndarray) -> np.ndarray:
    """[nb_pad / block_k_dbk] int32: the first query tile (of block_q_dbk tokens) that sees a
    block of the chunk."""
    starts = np.minimum(fv[:: cfg.block_k_dbk].astype(np.int64), cfg.n_pad)  # fv non-decreasing
    return (starts // cfg.block_q_dbk).astype(np.int32)


def _logits(cfg: _Config, q, bk, fv, t, j, *, transposed: bool = False):
    """Masked block logits: q [R, d] x bk [C, d] -> [R, C] (transposed: [C, R]); t the rows'
    token positions, j the blocks' indices and fv their first visible positions, shaped to
    broadcast against the result. Invisible blocks hold MASKED."""
    s = (mm(bk, q, trans_b=True) if transposed else mm(q, bk, trans_b=True)) * cfg.scale
    visible = (j < cfg.nb) & (fv <= t)
    if cfg.own_block:
        visible = visible & (lax.div(t, cfg.sb) != j)
    return jnp.where(visible, s, MASKED)


def _merge_top_k(s, start, top_v, top_i):
    """Insert a chunk's logits s [R, C] (blocks start .. start + C - 1) into the rows' top-k:
    tuples of k vectors [R], best first. Each round inserts every row's best remaining entry
    above its k-th best; rounds repeat while some row has one.

    Blocks arrive in index order, so comparing values alone reproduces lax.top_k's order: an
    entry goes below the equal values already kept (lower indices), enters only if strictly
    above the k-th best, and argmax takes a chunk's lowest index among equal values. Masked
    blocks (MASKED, finite) rank below every logit but above the empty slots (-inf)."""
    k = len(top_v)
    col = iota(s.shape[1])[None, :]

    def best(sv):
        return jnp.max(sv, axis=1), jnp.argmax(sv, axis=1).astype(jnp.int32)

    def more(state):
        return jnp.max(state[3]) > -jnp.inf

    def insert(state):
        top_v, top_i, sv, best_v, best_c = state
        best_i = start + best_c
        above = [(best_v > v) for v in top_v]  # false for rows without a candidate (best_v = -inf)
        new_v, new_i = [], []
        for p in range(k):  # sorted insertion: slots below the new entry shift down by one
            v = jnp.where(above[p], best_v, top_v[p])
            i = jnp.where(above[p], best_i, top_i[p])
            if p:
                v = jnp.where(above[p - 1], top_v[p - 1], v)
                i = jnp.where(above[p - 1], top_i[p - 1], i)
            new_v.append(v)
            new_i.append(i)
        sv = jnp.where((col == best_c[:, None]) | (sv <= new_v[-1][:, None]), -jnp.inf, sv)
        return (tuple(new_v), tuple(new_i), sv, *best(sv))

    sv = jnp.where(s > top_v[-1][:, None], s, -jnp.inf)  # candidates: above the k-th best
    top_v, top_i, *_ = lax.while_loop(more, insert, (top_v, top_i, sv, *best(sv)))
    return top_v, top_i


def _fwd_kernel(chunks_ref, fv_ref, q_ref, bk_ref, val_ref, idx_ref, lse_ref, *obk_ref, cfg: _Config):
    """Picks and log-sum-exp; with `obk_ref` (for the backward) also O = sum_j P_j bk_j, the
    block keys' softmax average, as a flash forward computes its output."""
    bq, gs, bkc = cfg.block_q, cfg.gs, cfg.block_k
    rows, d = bq * gs, q_ref.shape[-1]
    q = q_ref[...].reshape(rows, d)  # [R, d] float32
    t = (pl.program_id(0) * bq + lax.div(iota(rows), gs))[:, None]  # [R, 1]
    pad = reference.IMPORTANCE_PAD_LOGIT  # the normaliser starts with the pad column: m = pad, l = 1

    def chunk(c, carry):
        m, l, acc, top_v, top_i = carry
        start = c * bkc
        j = (start + iota(bkc))[None, :]  # [1, C]
        bk = bk_ref[pl.ds(start, bkc), :]
        s = _logits(cfg, q, bk, fv_ref[pl.ds(start, bkc)][None, :], t, j)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        corr = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[:, None])  # MASKED gives 0
        l = l * corr + jnp.sum(p, axis=1)
        if obk_ref:
            acc = acc * corr[:, None] + mm(p, bk)
        top_v, top_i = _merge_top_k(s, start, top_v, top_i)
        return m_new, l, acc, top_v, top_i

    acc = jnp.zeros((rows, d) if obk_ref else (1,), F32)
    init = (jnp.full((rows,), pad, F32), jnp.ones((rows,), F32), acc,
            (jnp.full((rows,), -jnp.inf, F32),) * cfg.k, (jnp.full((rows,), NO_BLOCK, jnp.int32),) * cfg.k)
    m, l, acc, top_v, top_i = lax.fori_loop(0, chunks_ref[0], chunk, init)
    lse = m + jnp.log(l)
    if obk_ref:
        obk_ref[0][...] = (acc / l[:, None]).reshape(bq, gs, d)
    for p in range(cfg.k):
        val_ref[:, :, p] = jnp.exp(top_v[p] - lse).reshape(bq, gs)
        idx_ref[:, :, p] = top_i[p].reshape(bq, gs)
    lse_ref[...] = lse.reshape(bq, gs)


def _dlogits(s, j, lse, delta, picks):
    """dlogit = P * (dP - D) for logits s [R, C] (or transposed [C, R] with the row vectors
    shaped [1, R] and j [C, 1]); picks: k pairs (index, cotangent) of row vectors."""
    p = jnp.exp(s - lse)  # masked logits give 0
    dp = jnp.zeros_like(s)
    for idx, dval in picks:
        dp = jnp.where(j == idx, dval, dp)
    return p * (dp - delta)


def _dq_kernel(chunks_ref, fv_ref, q_ref, bk_ref, lse_ref, delta_ref, idx_ref, dval_ref, dq_ref, *, cfg: _Config):
    bq, gs, bkc = cfg.block_q, cfg.gs, cfg.block_k
    rows, d = bq * gs, q_ref.shape[-1]
    q = q_ref[...].reshape(rows, d)
    t = (pl.program_id(0) * bq + lax.div(iota(rows), gs))[:, None]
    lse = lse_ref[...].reshape(rows, 1)
    delta = delta_ref[...].reshape(rows, 1)
    picks = [(idx_ref[:, :, p].reshape(rows, 1), dval_ref[:, :, p].reshape(rows, 1)) for p in range(cfg.k)]

    def chunk(c, dq):
        start = c * bkc
        j = (start + iota(bkc))[None, :]
        bk = bk_ref[pl.ds(start, bkc), :]
        s = _logits(cfg, q, bk, fv_ref[pl.ds(start, bkc)][None, :], t, j)
        return dq + mm(_dlogits(s, j, lse, delta, picks), bk)

    dq = lax.fori_loop(0, chunks_ref[0], chunk, jnp.zeros((rows, d), F32))
    dq_ref[...] = (dq * cfg.scale).reshape(bq, gs, d)


def _dq_picks_kernel(obk_ref, bk_ref, delta_ref, idx_ref, w_ref, dq_ref, *, cfg: _Config):
    """dq = scale * (sum over picks of P dP bk[pick] - D O): the forward's O = sum_j P_j bk_j
    and a gather of the k picked block keys; no pass over the blocks."""
    bq, gs = cfg.block_q, cfg.gs
    rows, d = bq * gs, obk_ref.shape[-1]
    dq = -delta_ref[...].reshape(rows, 1) * obk_ref[...].reshape(rows, d)
    for p in range(cfg.k):
        dq = dq + w_ref[:, :, p].reshape(rows, 1) * bk_ref[idx_ref[:, :, p].reshape(rows), :]
    dq_ref[...] = (dq * cfg.scale).reshape(bq, gs, d)


SPARSE_ENTRIES = 64  # picks gathered per step of the d(block keys) pick kernel
SPARSE_SPLITS = 4  # programs per block (a block picked by most queries, e.g. the first, is split)


def _dbk_picks_kernel(off_ref, row_ref, w_ref, q_ref, dbk_ref, *, cfg: _Config):
    """Block j's sum over the picks of it (this split's share) of P dP q_row: the picks sorted
    by block (`sort_by_block`), so block j's are one contiguous run, gathered 64 at a time."""
    e, gs = SPARSE_ENTRIES, cfg.gs
    j = pl.program_id(0)
    start, end = off_ref[j], off_ref[j + 1]
    per_split = lax.div(end - start + SPARSE_SPLITS - 1, SPARSE_SPLITS)
    lo = start + pl.program_id(1) * per_split
    hi = jnp.minimum(end, lo + per_split)

    def step(i, acc):
        at = lo + i * e
        valid = at + iota(e) < hi
        row = jnp.where(valid, row_ref[pl.ds(at, e)], 0)  # [E] row = token * gs + head
        w = jnp.where(valid, w_ref[pl.ds(at, e)], 0.0)
        q = q_ref[lax.div(row, gs), lax.rem(row, gs), :]  # [E, d]
        return acc + jnp.sum(w[:, None] * q, axis=0)

    acc = lax.fori_loop(0, lax.div(jnp.maximum(hi - lo, 0) + e - 1, e), step, jnp.zeros((q_ref.shape[-1],), F32))
    dbk_ref[...] = acc * cfg.scale


def _dbk_kernel(first_ref, fv_ref, q_ref, bk_ref, lse_ref, delta_ref, *refs, cfg: _Config):
    """One chunk of block keys: sum over the query tiles that see it (this split's share) of
    dlogit^T q, on transposed logits [C, R] so no tile is transposed in registers. With the
    picks' refs (backward "passes"), dlogit = P (dP - D); without (backward "picks"), only the
    part every visible block gets, -P D (as flash attention's dV), the picks' part coming from
    `_dbk_picks_kernel`."""
    *pick_refs, dbk_ref = refs
    bq, gs, bkc = cfg.block_q_dbk, cfg.gs, cfg.block_k_dbk
    rows, d = bq * gs, q_ref.shape[-1]
    start = pl.program_id(0) * bkc
    j = (start + iota(bkc))[:, None]  # [C, 1]
    fv = fv_ref[...][:, None]
    bk = bk_ref[...]  # [C, d]
    lo, hi = first_ref[0], cfg.n_pad // bq
    per_split = lax.div(jnp.maximum(hi - lo, 0) + cfg.dbk_splits - 1, cfg.dbk_splits)
    lo, hi = lo + pl.program_id(1) * per_split, jnp.minimum(hi, lo + (pl.program_id(1) + 1) * per_split)

    def tile(qt, dbk):
        tokens = pl.ds(qt * bq, bq)
        q = q_ref[tokens, :, :].reshape(rows, d)
        t = (qt * bq + lax.div(iota(rows), gs))[None, :]  # [1, R]
        s_t = _logits(cfg, q, bk, fv, t, j, transposed=True)  # [C, R]
        lse, delta = lse_ref[tokens, :].reshape(1, rows), delta_ref[tokens, :].reshape(1, rows)
        if not pick_refs:
            return dbk - mm(jnp.exp(s_t - lse) * delta, q)
        idx_ref, dval_ref = pick_refs
        picks = [(idx_ref[tokens, :, p].reshape(1, rows), dval_ref[tokens, :, p].reshape(1, rows))
                 for p in range(cfg.k)]
        return dbk + mm(_dlogits(s_t, j, lse, delta, picks), q)

    dbk = lax.fori_loop(lo, hi, tile, jnp.zeros((bkc, d), F32))
    dbk_ref[...] = dbk * cfg.scale


def _specs(cfg: _Config, d: int, *, dbk: bool = False):
    """BlockSpecs over grid (query tiles, b, kh) (forward, dq) or (block chunks, splits, b, kh)
    (dbk). Layouts: q [b, n_pad, kh, gs, d]; bk [b, nb_pad, kh, d]; per-row arrays
    [b, n_pad, kh, gs]; picks [b, n_pad, kh, gs, kp]."""
    if not dbk:
        bq = cfg.block_q
        return dict(
            sched=pl.BlockSpec((1,), lambda i, bi, hi: (i,)),
            fv=pl.BlockSpec((cfg.nb_pad,), lambda i, bi, hi: (0,)),
            q=pl.BlockSpec((None, bq, None, cfg.gs, d), lambda i, bi, hi: (bi, i, hi, 0, 0)),
            bk=pl.BlockSpec((None, cfg.nb_pad, None, d), lambda i, bi, hi: (bi, 0, hi, 0)),
            row=pl.BlockSpec((None, bq, None, cfg.gs), lambda i, bi, hi: (bi, i, hi, 0)),
            picks=pl.BlockSpec((None, bq, None, cfg.gs, cfg.kp), lambda i, bi, hi: (bi, i, hi, 0, 0)),
        )
    bkc = cfg.block_k_dbk
    return dict(
        sched=pl.BlockSpec((1,), lambda c, sp, bi, hi: (c,)),
        fv=pl.BlockSpec((bkc,), lambda c, sp, bi, hi: (c,)),
        q=pl.BlockSpec((None, cfg.n_pad, None, cfg.gs, d), lambda c, sp, bi, hi: (bi, 0, hi, 0, 0)),
        bk=pl.BlockSpec((None, bkc, None, d), lambda c, sp, bi, hi: (bi, c, hi, 0)),
        row=pl.BlockSpec((None, cfg.n_pad, None, cfg.gs), lambda c, sp, bi, hi: (bi, 0, hi, 0)),
        picks=pl.BlockSpec((None, cfg.n_pad, None, cfg.gs, cfg.kp), lambda c, sp, bi, hi: (bi, 0, hi, 0, 0)),
        out=pl.BlockSpec((None, None, bkc, None, d), lambda c, sp, bi, hi: (sp, bi, c, hi, 0)),
    )


def _forward(cfg: _Config, qs, bk, *, with_obk: bool = False):
    """qs [b, n_pad, kh, gs, d], bk [b, nb_pad, kh, d] (float32) -> (probabilities, indices)
    [b, n_pad, kh, gs, kp], the natural log-sum-exp [b, n_pad, kh, gs] and, with_obk,
    O = sum_j P_j bk_j [b, n_pad, kh, gs, d]."""
    b, n_pad, kh, gs, d = qs.shape
    fv = _first_visible(cfg)
    sp = _specs(cfg, d)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg),
        grid=(n_pad // cfg.block_q, b, kh),
        in_specs=[sp["sched"], sp["fv"], sp["q"], sp["bk"]],
        out_specs=[sp["picks"], sp["picks"], sp["row"]] + [sp["q"]] * with_obk,
        out_shape=[jax.ShapeDtypeStruct((b, n_pad, kh, gs, cfg.kp), F32),
                   jax.ShapeDtypeStruct((b, n_pad, kh, gs, cfg.kp), jnp.int32),
                   jax.ShapeDtypeStruct((b, n_pad, kh, gs), F32)]
                  + [jax.ShapeDtypeStruct(qs.shape, F32)] * with_obk,
        compiler_params=compiler_params(cfg.num_warps, cfg.num_stages),
        interpret=cfg.interpret,
        name="nsa_selection_fwd",
    )(jnp.asarray(_chunks_per_tile(cfg, fv)), jnp.asarray(fv), qs, bk)


def _dq(cfg: _Config, qs, bk, lse, delta, indices, dvalues):
    """d qs [b, n_pad, kh, gs, d] (float32)."""
    b, n_pad, kh, gs, d = qs.shape
    fv = _first_visible(cfg)
    sp = _specs(cfg, d)
    return pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg),
        grid=(n_pad // cfg.block_q, b, kh),
        in_specs=[sp["sched"], sp["fv"], sp["q"], sp["bk"], sp["row"], sp["row"], sp["picks"], sp["picks"]],
        out_specs=sp["q"],
        out_shape=jax.ShapeDtypeStruct(qs.shape, F32),
        compiler_params=compiler_params(cfg.num_warps, cfg.num_stages),
        interpret=cfg.interpret,
        name="nsa_selection_dq",
    )(jnp.asarray(_chunks_per_tile(cfg, fv)), jnp.asarray(fv), qs, bk, lse, delta, indices, dvalues)


def _dbk(cfg: _Config, qs, bk, lse, delta, *picks):
    """d bk [b, nb_pad, kh, d] (float32): with picks (indices, dvalues) the whole of it, without
    only -sum_t P_tj D_t q_t (see `_dbk_kernel`); the splits' partial sums added in XLA."""
    b, n_pad, kh, gs, d = qs.shape
    fv = _first_visible(cfg)
    sp = _specs(cfg, d, dbk=True)
    dbk = pl.pallas_call(
        functools.partial(_dbk_kernel, cfg=cfg),
        grid=(cfg.nb_pad // cfg.block_k_dbk, cfg.dbk_splits, b, kh),
        in_specs=[sp["sched"], sp["fv"], sp["q"], sp["bk"], sp["row"], sp["row"]] + [sp["picks"]] * len(picks),
        out_specs=sp["out"],
        out_shape=jax.ShapeDtypeStruct((cfg.dbk_splits, *bk.shape), F32),
        compiler_params=compiler_params(cfg.num_warps, cfg.num_stages),
        interpret=cfg.interpret,
        name="nsa_selection_dbk",
    )(jnp.asarray(_first_tile_per_chunk(cfg, fv)), jnp.asarray(fv), qs, bk, lse, delta, *picks)
    return dbk.sum(axis=0)


def _dq_picks(cfg: _Config, obk, bk, delta, indices, w):
    b, n_pad, kh, gs, d = obk.shape
    sp = _specs(cfg, d)
    return pl.pallas_call(
        functools.partial(_dq_picks_kernel, cfg=cfg),
        grid=(n_pad // cfg.block_q, b, kh),
        in_specs=[sp["q"], sp["bk"], sp["row"], sp["picks"], sp["picks"]],
        out_specs=sp["q"],
        out_shape=jax.ShapeDtypeStruct(obk.shape, F32),
        compiler_params=compiler_params(cfg.num_warps, cfg.num_stages),
        interpret=cfg.interpret,
        name="nsa_selection_dq",
    )(obk, bk, delta, indices, w)


def _dbk_picks(cfg: _Config, qs, indices, w):
    """The picks' part of d(block keys) [b, nb_pad, kh, d]: picks sorted by block, then one
    program per block (and split) sums its picks' weighted query rows."""
    b, n_pad, kh, gs, d = qs.shape
    entries = n_pad * gs * cfg.k
    flat = lambda x: x[..., : cfg.k].transpose(0, 2, 1, 3, 4).reshape(b * kh, entries)  # noqa: E731
    order, offsets = sort_by_block(flat(indices), cfg.nb)  # [b kh, E], [b kh, nb + 1]
    rows = pad_axis(lax.div(order, jnp.int32(cfg.k)), 1, entries + SPARSE_ENTRIES)  # row = token * gs + head
    w = pad_axis(jnp.take_along_axis(flat(w), order, axis=1), 1, entries + SPARSE_ENTRIES)
    offsets = jnp.concatenate([offsets, jnp.broadcast_to(offsets[:, -1:], (b * kh, cfg.nb_pad - cfg.nb))], axis=1)
    bkh = lambda j, sp, i: (i, 0)  # noqa: E731
    dbk = pl.pallas_call(
        functools.partial(_dbk_picks_kernel, cfg=cfg),
        grid=(cfg.nb_pad, SPARSE_SPLITS, b * kh),
        in_specs=[pl.BlockSpec((None, cfg.nb_pad + 1), bkh),
                  pl.BlockSpec((None, entries + SPARSE_ENTRIES), bkh),
                  pl.BlockSpec((None, entries + SPARSE_ENTRIES), bkh),
                  pl.BlockSpec((None, n_pad, None, gs, d), lambda j, sp, i: (i // kh, 0, i % kh, 0, 0))],
        out_specs=pl.BlockSpec((None, None, None, d), lambda j, sp, i: (sp, i, j, 0)),
        out_shape=jax.ShapeDtypeStruct((SPARSE_SPLITS, b * kh, cfg.nb_pad, d), F32),
        compiler_params=compiler_params(cfg.num_warps, cfg.num_stages),
        interpret=cfg.interpret,
        name="nsa_selection_dbk_picks",
    )(offsets, rows, w, qs)
    return dbk.sum(axis=0).reshape(b, kh, cfg.nb_pad, d).transpose(0, 2, 1, 3)


def _backward(cfg: _Config, qs, bk, values, indices, lse, obk, dvalues):
    # D = sum over the picks of P dP; slots beyond k are never written (and never read).
    delta = jnp.sum(values[..., : cfg.k] * dvalues[..., : cfg.k], axis=-1)  # [b, n_pad, kh, gs]
    if cfg.backward == "picks":
        w = values * dvalues  # P dP of each pick
        return (_dq_picks(cfg, obk, bk, delta, indices, w),
                _dbk(cfg, qs, bk, lse, delta) + _dbk_picks(cfg, qs, indices, w))
    return _dq(cfg, qs, bk, lse, delta, indices, dvalues), _dbk(cfg, qs, bk, lse, delta, indices, dvalues)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _select(cfg: _Config, qs, bk):
    values, indices, _ = _forward(cfg, qs, bk)
    return values, indices


def _select_fwd(cfg: _Config, qs, bk):
    values, indices, lse, *obk = _forward(cfg, qs, bk, with_obk=cfg.backward == "picks")
    return (values, indices), (qs, bk, values, indices, lse, obk[0] if obk else None)


def _select_bwd(cfg: _Config, res, cotangents):
    return _backward(cfg, *res, cotangents[0])


_select.defvjp(_select_fwd, _select_bwd)


def _config(n: int, nc: int, nb: int, gs: int, k: int, d_pad: int, kh: int, b: int, *, stride: int, sb: int,
            causal: bool, interpolated: bool, scale: float, settings: SelectionSettings) -> _Config:
    kp = next_pow2(k)
    block_q = max(1, settings.rows // gs, cdiv(MIN_DOT, gs))
    block_q_dbk = max(1, settings.rows_dbk // gs, cdiv(MIN_DOT, gs))
    q_cap = max(next_pow2(n), next_pow2(cdiv(MIN_DOT, gs)))
    block_q, block_q_dbk = min(next_pow2(block_q), q_cap), min(next_pow2(block_q_dbk), q_cap)
    key_cap = max(MIN_DOT, kp, next_pow2(nb))
    block_k = min(max(settings.block_keys, kp, MIN_DOT), key_cap)  # >= kp: the first chunk fills every slot
    block_k_dbk = min(max(settings.block_keys_dbk, MIN_DOT), key_cap)
    n_pad = round_up(n, max(block_q, block_q_dbk))
    nb_pad = round_up(nb, max(block_k, block_k_dbk))
    # dbk: split a chunk's queries over programs until about `dbk_target_programs` run.
    programs = (nb_pad // block_k_dbk) * b * kh
    tiles = n_pad // block_q_dbk
    splits = min(settings.max_dbk_splits, cdiv(settings.dbk_target_programs, programs),
                 max(1, tiles // settings.min_dbk_tiles_per_split))
    return _Config(scale=float(scale), causal=causal, own_block=sb != stride, sb=sb, stride=stride, nc=nc, nb=nb,
                   interpolated=interpolated, n=n, gs=gs, k=k, kp=kp, block_q=block_q, block_k=block_k,
                   block_q_dbk=block_q_dbk, block_k_dbk=block_k_dbk, n_pad=n_pad, nb_pad=nb_pad,
                   dbk_splits=max(1, splits), backward=settings.backward,
                   num_warps=settings.num_warps,
                   num_stages=settings.num_stages, interpret=interpret_mode())


def select_blocks(
    q: jax.Array,  # [b, n, h, d], not rotated
    ck: jax.Array,  # [b, m + nc, kh, d]
    *,
    num_mem: int,
    stride: int,
    causal: bool,
    share_heads: bool,
    num_selected: int,
    selection_block_size: int,
    interpolated: bool = False,
    scale: float | None = None,
    settings: SelectionSettings = SelectionSettings(),
) -> tuple[jax.Array, jax.Array]:
    """`nsa_jax.reference.select_blocks` for the parallel forward (no `q_positions`):
    (probabilities, indices), each [b, n, sh, k'] (float32, int32); linear memory in n.
    Differentiable in q and ck through the probabilities (diff top-k)."""
    b, n, h, d = q.shape
    kh = ck.shape[2]
    g = h // kh
    sh = kh if share_heads else h
    nc = ck.shape[1] - num_mem
    sb = selection_block_size
    scale = d**-0.5 if scale is None else scale
    nb = num_blocks(nc, stride, sb, interpolated)
    k = min(num_selected, nc, nb)
    if k == 0 or n == 0:
        empty = jnp.zeros((b, n, sh, k))
        return empty.astype(F32), empty.astype(jnp.int32)

    gs = 1 if share_heads else g
    d_pad = max(MIN_DOT, next_pow2(d))
    cfg = _config(n, nc, nb, gs, k, d_pad, kh, b, stride=stride, sb=sb, causal=causal, interpolated=interpolated,
                  scale=scale, settings=settings)
    qs = q.astype(F32).reshape(b, n, kh, g, d)
    if share_heads:
        qs = qs.mean(axis=3, keepdims=True)  # [b, n, kh, 1, d]
    qs = pad_axis(pad_axis(qs, 4, d_pad), 1, cfg.n_pad)
    bk = _block_keys(ck[:, num_mem:], nc, stride, sb, interpolated)  # [b, nb, kh, d]
    bk = pad_axis(pad_axis(bk, 3, d_pad), 1, cfg.nb_pad)
    values, indices = _select(cfg, qs, bk)  # [b, n_pad, kh, gs, kp]
    values = values[:, :n, :, :, :k].reshape(b, n, sh, k)
    indices = indices[:, :n, :, :, :k].reshape(b, n, sh, k)
    return values, indices

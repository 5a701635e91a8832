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
two row reductions; or, `SelectionSettings(top_k="lanes")`, k entries per row and column lane,
merged once per tile). Only the probabilities and indices of the picks
[b, n, sh, k] and the log-sum-exp [b, n, sh] reach HBM.

Masking follows the reference: a block is invisible iff (causal) any compressed column with a
nonzero weight ends at or after the query, or (sb != stride) it is the query's own block.
Packed documents (segments) put each document's blocks on its own slots (`nsa_jax.segments`):
the block keys average that document's entries, each row sees only its document's slots (the
others are -inf, never picked), and the picks come out as the reference gives them (local
indices, NO_PICK past the document's own k'). Where a program works comes from a `_Layout`,
built from the shapes for one sequence and from the segments for packed documents.
Probabilities are exp(logit - lse) with lse over [-1000, visible block logits], as the
reference's softmax over the padded blocks gives them. Picks are ordered as `lax.top_k`
orders the logits (value descending, lower index first among equal values; masked blocks
rank last, lower index first). The kernel sums the logit's products in another order than the
reference, so two blocks whose logits differ by less than float rounding may swap places, and
blocks whose probabilities underflow to 0 rank by logit here, by index there (invalid picks
either way); the tests compare the valid picks as sets, and exact ties in order
(tests/test_kernels_selection.py).

Backward (diff top-k): with P the block probabilities and dP the picks' cotangents,
dlogit = P * (dP - D), D = sum over the picks of P dP. dq = scale * (sum over the picks of
P dP bk[pick] - D O) with O = sum_j P_j bk_j: one pass over the blocks for O (P recomputed from
the forward's log-sum-exp), then a gather of the k picked block keys. d(block keys): one
program per chunk of blocks, kv head and split of the queries that see them, recomputing the
logits tile by tile and finding the picks among the chunk's blocks by one compare pass per
pick. The backward recomputes its logits from the same float32 operands as the forward, whatever
the inputs' dtype, and so does every matmul of d(block keys): P = exp(logit - lse) is only a
probability when the logit is the one lse was summed from. (Recomputed from bf16 operands, as
flash attention's backward does, a logit of size L is off by about L / 256, P by a factor
exp(L / 256): at the sharp selections a trained model makes, the gradient was wrong by 50% and
more, and the bf16 seed model's gradient norm went to inf within 600 steps of the passkey task
(H200, 2026-11-30, `bench/retrieval.py`). With only dlogit^T q on bf16 operands, dlogit formed in
float32 first as flash attention forms dk, 19 of 96 gradient-norm samples of two such passkey runs
were above 100, up to 27,921; 1 of 324 in the float32 runs (H200, 2026-11-30).)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import numpy as np

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels._common import F32, MIN_DOT, cdiv, compiler_params, in_xla, interpret_mode, iota, mm, next_pow2, \
    pad_axis, round_up, tokens_to_rows
from kernels.settings import SelectionSettings
from nsa_jax import reference
from nsa_jax import segments as seg

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
    lanes: bool  # the forward keeps a top-k per column lane (`_insert_lanes`) instead of merging rounds
    block_k_fwd: int  # blocks per forward step (divides block_k; < block_k only with lanes)
    block_q_dbk: int
    block_k_dbk: int
    n_pad: int
    nb_pad: int
    dbk_splits: int
    packed: bool  # packed documents: per-row block bounds (`_Layout`)
    num_warps: int
    num_warps_dbk: int
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


class _Layout(NamedTuple):
    """Where each program works and what each row sees (int32, batch-leading; an input of the
    kernels). fv [b, nb_pad]: the first query position that sees each block (never: int32
    max). chunk_lo, chunk_hi [b, n_pad / block_q]: the block chunks a forward / dq query tile
    visits. tile_lo, tile_hi [b, nb_pad / block_k_dbk]: the query tiles (of block_q_dbk
    tokens) a d(block keys) chunk visits. Packed documents also give each query its
    document's block slots [blo, bhi) and its own block's slot `own` ([b, n_pad] each;
    -1: none): blocks outside the bounds do not exist for it (-inf, never picked)."""

    fv: jax.Array
    chunk_lo: jax.Array
    chunk_hi: jax.Array
    tile_lo: jax.Array
    tile_hi: jax.Array
    blo: jax.Array | None = None
    bhi: jax.Array | None = None
    own: jax.Array | None = None


def _static_layout(cfg: _Config, b: int) -> _Layout:
    """One sequence: the schedule depends on the shapes only."""
    fv = _first_visible(cfg)
    chunk_hi = _chunks_per_tile(cfg, fv)
    tile_lo = _first_tile_per_chunk(cfg, fv)
    per_batch = lambda x: jnp.broadcast_to(jnp.asarray(x, jnp.int32), (b, len(x)))  # noqa: E731
    return _Layout(per_batch(fv), per_batch(np.zeros_like(chunk_hi)), per_batch(chunk_hi), per_batch(tile_lo),
                   per_batch(np.full_like(tile_lo, cfg.n_pad // cfg.block_q_dbk)))


def _packed_layout(cfg: _Config, segments: seg.Segments, blocks: seg.Slots) -> _Layout:
    """Packed documents, on `nsa_jax.segments`' block grid (`blocks`: its slots)."""
    b = segments.start.shape[0]
    st, sb, big = cfg.stride, cfg.sb, np.iinfo(np.int32).max
    if sb == st:
        last = blocks.local
    elif not cfg.interpolated:
        last = blocks.local * (sb // st) + sb // st - 1
    else:  # the last entry with a nonzero interpolation weight
        lo, hi, w = seg.block_interpolation(blocks, st, sb)
        last = jnp.max(jnp.where(w > 0, jnp.maximum(lo, hi), lo), axis=-1)
    sees_from = blocks.doc_start + ((last + 1) * st if cfg.causal else 0)  # [b, nb]
    fv = jnp.where(blocks.valid, sees_from, big)
    fv = jnp.pad(fv, ((0, 0), (0, cfg.nb_pad - cfg.nb)), constant_values=big).astype(jnp.int32)

    pad_rows = lambda x, value: jnp.pad(x, ((0, 0), (0, cfg.n_pad - cfg.n)), constant_values=value)  # noqa: E731
    pos, length = segments.positions, segments.lengths
    num_blocks = seg.block_counts(length // st, st, sb, cfg.interpolated)  # [b, n]
    picks = seg.picks_per_query(segments, cfg.k, st, sb, cfg.interpolated)
    blo = segments.start // sb
    own = blo + pos // sb if cfg.own_block else jnp.full_like(blo, -1)
    # Blocks a query visits: its document's first blocks, enough to see every visible one
    # (a block is visible only after its last token: at most pos // sb + 1) and to fill its picks.
    visits = num_blocks if not cfg.causal else jnp.minimum(num_blocks, jnp.maximum(pos // sb + 1, picks))
    first = pad_rows(blo, cfg.nb_pad).reshape(b, -1, cfg.block_q).min(axis=2)
    end = pad_rows(blo + visits, 0).reshape(b, -1, cfg.block_q).max(axis=2)
    chunk_lo = first // cfg.block_k
    chunk_hi = jnp.maximum(chunk_lo, -(-end // cfg.block_k))
    # Queries that see a block: from fv to its document's end.
    q_from = jnp.pad(jnp.where(blocks.valid, sees_from, cfg.n_pad), ((0, 0), (0, cfg.nb_pad - cfg.nb)),
                     constant_values=cfg.n_pad)
    q_to = jnp.pad(jnp.where(blocks.valid, blocks.doc_end, 0), ((0, 0), (0, cfg.nb_pad - cfg.nb)))
    tile_lo = q_from.reshape(b, -1, cfg.block_k_dbk).min(axis=2) // cfg.block_q_dbk
    tile_hi = -(-q_to.reshape(b, -1, cfg.block_k_dbk).max(axis=2) // cfg.block_q_dbk)
    i32 = lambda x: x.astype(jnp.int32)  # noqa: E731
    return _Layout(fv, i32(chunk_lo), i32(chunk_hi), i32(tile_lo), i32(tile_hi),
                   i32(pad_rows(blo, 0)), i32(pad_rows(blo + num_blocks, 0)), i32(pad_rows(own, -1)))


def _shard_layout(cfg: _Config, b: int, q_offset: jax.Array) -> _Layout:
    """Queries at positions q_offset + [0, n) of a longer sequence (one shard under context
    parallelism, `nsa_jax.context`): the one-sequence schedule with the rows' positions moved by
    q_offset, through the packed path's per-row bounds (every block exists; the own block is the
    one holding the row's position), so the kernels need no offset of their own. Without own
    blocks (cfg.packed false) the rows' positions enter through the first visible positions alone."""
    big = np.iinfo(np.int32).max
    fv = _first_visible(cfg)  # [nb_pad] global positions (padding: never)
    off = jnp.asarray(q_offset, jnp.int32)
    fv_rows = jnp.where(fv == big, big, jnp.asarray(fv) - off)  # in the shard's row coordinates
    last = off + np.minimum(np.arange(1, cfg.n_pad // cfg.block_q + 1) * cfg.block_q, cfg.n) - 1
    # unrolled: the default ("scan") is a while loop, a few kernels per step of log2(nb), per layer
    visible = jnp.searchsorted(jnp.asarray(fv[: cfg.nb]), last, side="right", method="scan_unrolled")
    chunk_hi = jnp.maximum(1, -(-visible // cfg.block_k))
    tile_lo = jnp.clip(fv_rows[:: cfg.block_k_dbk], 0, cfg.n_pad) // cfg.block_q_dbk
    rows = off + jnp.arange(cfg.n_pad, dtype=jnp.int32)
    own = rows // cfg.sb if cfg.own_block else jnp.full_like(rows, -1)
    per_batch = lambda x: jnp.broadcast_to(jnp.asarray(x).astype(jnp.int32), (b, *jnp.shape(x)))  # noqa: E731
    layout = _Layout(per_batch(fv_rows), per_batch(jnp.zeros_like(chunk_hi)), per_batch(chunk_hi), per_batch(tile_lo),
                     per_batch(jnp.full_like(tile_lo, cfg.n_pad // cfg.block_q_dbk)))
    if not cfg.packed:
        return layout
    return layout._replace(blo=per_batch(jnp.zeros_like(rows)), bhi=per_batch(jnp.full_like(rows, cfg.nb)),
                           own=per_batch(own))


def _row_bounds(tokens, gs: int, column: bool):
    """The packed rows' (blo, bhi, own) from their tokens' values [BQ], shaped [R, 1] (column)
    or [1, R]."""
    rows = [tokens_to_rows(x, gs) for x in tokens]
    return tuple(x[:, None] if column else x[None, :] for x in rows)


def _logits(cfg: _Config, q, bk, fv, t, j, bounds=None, *, transposed: bool = False):
    """Masked block logits: q [R, d] x bk [C, d] -> [R, C] (transposed: [C, R]); t the rows'
    token positions, j the blocks' indices and fv their first visible positions, shaped to
    broadcast against the result. Invisible blocks hold MASKED; with packed documents'
    `bounds` (blo, bhi, own per row), blocks outside a row's document hold -inf."""
    s = (mm(bk, q, trans_b=True) if transposed else mm(q, bk, trans_b=True)) * cfg.scale
    if bounds is not None:
        blo, bhi, own = bounds
        exists = (j >= blo) & (j < bhi)
        return jnp.where(exists & (fv <= t) & (j != own), s, jnp.where(exists, MASKED, -jnp.inf))
    visible = (j < cfg.nb) & (fv <= t)
    if cfg.own_block:
        visible = visible & (lax.div(t, cfg.sb) != j)
    return jnp.where(visible, s, MASKED)


def _merge_top_k(s, start, top_v, top_i):
    """Insert a chunk's logits s [R, C] (blocks start .. start + C - 1) into the rows' top-k:
    tuples of k vectors [R], best first. Each round inserts every row's best remaining entry
    that beats its k-th best; rounds repeat while some row has one (the k-th best only rises,
    so a row whose best remaining entry does not beat it is done for this chunk).

    Blocks arrive in index order, so comparing values alone reproduces lax.top_k's order: an
    entry goes below the equal values already kept (lower indices), enters only if strictly
    above the k-th best, and a round takes a chunk's lowest index among equal values. Masked
    blocks (MASKED, finite) rank below every logit but above the empty slots (-inf). A round is
    a max and a min over the chunk (the best value, then its lowest column): cheaper than an
    argmax's paired compares."""
    cols = s.shape[1]
    col = iota(cols)[None, :]

    def best(sv):
        best_v = jnp.max(sv, axis=1)
        return best_v, jnp.min(jnp.where(sv == best_v[:, None], col, cols), axis=1)

    def more(state):
        top_v, _, _, best_v, _ = state
        return jnp.max((best_v > top_v[-1]).astype(jnp.int32)) > 0

    def insert(state):
        top_v, top_i, sv, best_v, best_c = state
        new_v, new_i = _sorted_insert(best_v, start + best_c, top_v, top_i)  # no-op for rows without a candidate
        sv = jnp.where(col == best_c[:, None], -jnp.inf, sv)
        return (new_v, new_i, sv, *best(sv))

    top_v, top_i, *_ = lax.while_loop(more, insert, (top_v, top_i, s, *best(s)))
    return top_v, top_i


def _insert_lanes(s, j, top_v, top_i):
    """Insert a step's logits s [R, C] (blocks j [1, C]) into a top-k kept per row and column
    lane: tuples of k arrays [R, C], best first. Every entry of a lane is a block of the same
    index modulo C, arriving in index order, so strict compares keep lax.top_k's order within a
    lane (an entry goes below the equal values already kept); `_lanes_to_rows` merges the lanes
    once per tile. Elementwise only: k compares and 4k selects per logit, no row reductions, where
    `_merge_top_k` pays two row reductions per round and a round per pick entering any row (on an
    H200 the kernel ran no faster for it: `SelectionSettings.top_k`)."""
    return _sorted_insert(s, jnp.broadcast_to(j, s.shape), top_v, top_i)


def _sorted_insert(value, index, top_v, top_i):
    """Insert (value, index) into sorted slots top_v / top_i (k arrays of value's shape, best
    first) where it is strictly above a slot's value: the slots below it shift down by one, the
    last drops out; equal values stay above it (the lower indices, which arrived first)."""
    above = [value > v for v in top_v]  # above[p - 1] implies above[p]: the slots are sorted
    new_v, new_i = [], []
    for p in range(len(top_v)):
        v = jnp.where(above[p], value, top_v[p])
        i = jnp.where(above[p], index, top_i[p])
        if p:
            v = jnp.where(above[p - 1], top_v[p - 1], v)
            i = jnp.where(above[p - 1], top_i[p - 1], i)
        new_v.append(v)
        new_i.append(i)
    return tuple(new_v), tuple(new_i)


def _lanes_to_rows(top_v, top_i):
    """The rows' top-k (k vectors [R], best first, in lax.top_k's order) from the lanes' (k
    arrays [R, C], each lane sorted): k rounds taking the best lane head (lowest block index
    among equal values; lanes hold distinct blocks) and popping it."""
    k = len(top_v)
    out_v, out_i = [], []
    for p in range(k):
        best_v = jnp.max(top_v[0], axis=1)
        best_i = jnp.min(jnp.where(top_v[0] == best_v[:, None], top_i[0], NO_BLOCK), axis=1)
        out_v.append(best_v)
        out_i.append(best_i)
        if p + 1 < k:  # pop the head of the winning lane (empty lanes, NO_BLOCK: popping is a no-op)
            hit = top_i[0] == best_i[:, None]
            top_v = tuple(jnp.where(hit, top_v[r + 1] if r + 1 < k else -jnp.inf, top_v[r]) for r in range(k))
            top_i = tuple(jnp.where(hit, top_i[r + 1] if r + 1 < k else NO_BLOCK, top_i[r]) for r in range(k))
    return out_v, out_i


def _fwd_kernel(c_lo_ref, c_hi_ref, fv_ref, q_ref, bk_ref, *refs, cfg: _Config):
    """The picks (probabilities, indices) and the log-sum-exp of one tile of query rows."""
    *bound_refs, val_ref, idx_ref, lse_ref = refs
    bq, gs, bkc = cfg.block_q, cfg.gs, cfg.block_k_fwd
    steps = cfg.block_k // bkc  # the layout counts chunks of block_k blocks: the same blocks, in steps
    rows, d = bq * gs, q_ref.shape[-1]
    t = (pl.program_id(0) * bq + lax.div(iota(rows), gs))[:, None]  # [R, 1]
    bounds = _row_bounds([r[...] for r in bound_refs], gs, column=True) if cfg.packed else None
    pad = reference.IMPORTANCE_PAD_LOGIT  # the normaliser starts with the pad column: m = pad, l = 1

    def chunk(c, carry):
        m, l, top_v, top_i = carry
        start = c * bkc
        j = (start + iota(bkc))[None, :]  # [1, C]
        q = q_ref[...].reshape(rows, d)  # [R, d] float32, loaded per chunk (from cache): fewer registers held
        bk = bk_ref[pl.ds(start, bkc), :]
        s = _logits(cfg, q, bk, fv_ref[pl.ds(start, bkc)][None, :], t, j, bounds)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        l = l * jnp.exp(m - m_new) + jnp.sum(jnp.exp(s - m_new[:, None]), axis=1)  # MASKED gives 0
        if cfg.lanes:
            top_v, top_i = _insert_lanes(s, j, top_v, top_i)
        else:
            top_v, top_i = _merge_top_k(s, start, top_v, top_i)
        return m_new, l, top_v, top_i

    slots = (rows, bkc) if cfg.lanes else (rows,)
    init = (jnp.full((rows,), pad, F32), jnp.ones((rows,), F32),
            (jnp.full(slots, -jnp.inf, F32),) * cfg.k, (jnp.full(slots, NO_BLOCK, jnp.int32),) * cfg.k)
    m, l, top_v, top_i = lax.fori_loop(c_lo_ref[0] * steps, c_hi_ref[0] * steps, chunk, init)
    if cfg.lanes:
        top_v, top_i = _lanes_to_rows(top_v, top_i)
    lse = m + jnp.log(l)
    for p in range(cfg.k):
        val_ref[:, :, p] = jnp.exp(top_v[p] - lse).reshape(bq, gs)
        # Packed: slots past a short document's blocks stay empty (probability 0, never kept);
        # they point at block 0 so that the backward's gathers stay in bounds.
        idx = jnp.where(top_i[p] == NO_BLOCK, 0, top_i[p]) if cfg.packed else top_i[p]
        idx_ref[:, :, p] = idx.reshape(bq, gs)
    lse_ref[...] = lse.reshape(bq, gs)


def _dlogits(s, j, lse, delta, picks):
    """dlogit = P * (dP - D) for logits s [R, C] (or transposed [C, R] with the row vectors
    shaped [1, R] and j [C, 1]); picks: k pairs (index, cotangent) of row vectors."""
    p = jnp.exp(s - lse)  # masked logits give 0
    dp = jnp.zeros_like(s)
    for idx, dval in picks:
        dp = jnp.where(j == idx, dval, dp)
    return p * (dp - delta)


def _dq_kernel(c_lo_ref, c_hi_ref, fv_ref, q_ref, bk_ref, lse_ref, delta_ref, idx_ref, w_ref, *refs, cfg: _Config):
    """dq = scale * (sum over the picks of P dP bk[pick] - D O), O = sum_j P_j bk_j: one pass
    over the blocks for O (P from the forward's log-sum-exp, as flash attention's backward
    recomputes it), then a gather of the k picked block keys. No compare passes."""
    *bound_refs, dq_ref = refs
    bq, gs, bkc = cfg.block_q, cfg.gs, cfg.block_k
    rows, d = bq * gs, q_ref.shape[-1]
    q = q_ref[...].reshape(rows, d)
    t = (pl.program_id(0) * bq + lax.div(iota(rows), gs))[:, None]
    lse = lse_ref[...].reshape(rows, 1)
    bounds = _row_bounds([r[...] for r in bound_refs], gs, column=True) if cfg.packed else None

    def chunk(c, o):
        start = c * bkc
        j = (start + iota(bkc))[None, :]
        bk = bk_ref[pl.ds(start, bkc), :]
        s = _logits(cfg, q, bk, fv_ref[pl.ds(start, bkc)][None, :], t, j, bounds)
        return o + mm(jnp.exp(s - lse).astype(bk.dtype), bk)  # masked logits give 0

    o = lax.fori_loop(c_lo_ref[0], c_hi_ref[0], chunk, jnp.zeros((rows, d), F32))
    dq = -delta_ref[...].reshape(rows, 1) * o
    for p in range(cfg.k):
        dq = dq + w_ref[:, :, p].reshape(rows, 1) * bk_ref[idx_ref[:, :, p].reshape(rows), :].astype(F32)
    dq_ref[...] = (dq * cfg.scale).reshape(bq, gs, d)


def _dbk_kernel(t_lo_ref, t_hi_ref, fv_ref, q_ref, bk_ref, lse_ref, delta_ref, idx_ref, dval_ref, *refs,
                cfg: _Config):
    """One chunk of block keys: sum over the query tiles that see it (this split's share) of
    dlogit^T q, dlogit = P (dP - D) on transposed logits [C, R] (no tile is transposed in
    registers), dP found among the chunk's blocks by one compare pass per pick."""
    *bound_refs, dbk_ref = refs
    bq, gs, bkc = cfg.block_q_dbk, cfg.gs, cfg.block_k_dbk
    rows, d = bq * gs, q_ref.shape[-1]
    start = pl.program_id(0) * bkc
    j = (start + iota(bkc))[:, None]  # [C, 1]
    fv = fv_ref[...][:, None]
    bk = bk_ref[...]  # [C, d]
    lo, hi = t_lo_ref[0], t_hi_ref[0]
    per_split = lax.div(jnp.maximum(hi - lo, 0) + cfg.dbk_splits - 1, cfg.dbk_splits)
    lo, hi = lo + pl.program_id(1) * per_split, jnp.minimum(hi, lo + (pl.program_id(1) + 1) * per_split)

    def tile(qt, dbk):
        tokens = pl.ds(qt * bq, bq)
        q = q_ref[tokens, :, :].reshape(rows, d)
        t = (qt * bq + lax.div(iota(rows), gs))[None, :]  # [1, R]
        bounds = _row_bounds([r[tokens] for r in bound_refs], gs, column=False) if cfg.packed else None
        s_t = _logits(cfg, q, bk, fv, t, j, bounds, transposed=True)  # [C, R]
        lse, delta = lse_ref[tokens, :].reshape(1, rows), delta_ref[tokens, :].reshape(1, rows)
        picks = [(idx_ref[tokens, :, p].reshape(1, rows), dval_ref[tokens, :, p].reshape(1, rows))
                 for p in range(cfg.k)]
        return dbk + mm(_dlogits(s_t, j, lse, delta, picks).astype(q.dtype), q)

    dbk = lax.fori_loop(lo, hi, tile, jnp.zeros((bkc, d), F32))
    dbk_ref[...] = dbk * cfg.scale


def _specs(cfg: _Config, d: int, *, dbk: bool = False):
    """BlockSpecs over grid (query tiles, b, kh) (forward, dq) or (block chunks, splits, b, kh)
    (dbk). Layouts: q [b, n_pad, kh, gs, d]; bk [b, nb_pad, kh, d]; per-row arrays
    [b, n_pad, kh, gs]; picks [b, n_pad, kh, gs, kp]; the `_Layout` arrays."""
    if not dbk:
        bq = cfg.block_q
        return dict(
            sched=pl.BlockSpec((None, 1), lambda i, bi, hi: (bi, i)),
            fv=pl.BlockSpec((None, cfg.nb_pad), lambda i, bi, hi: (bi, 0)),
            tokens=pl.BlockSpec((None, bq), lambda i, bi, hi: (bi, i)),
            q=pl.BlockSpec((None, bq, None, cfg.gs, d), lambda i, bi, hi: (bi, i, hi, 0, 0)),
            bk=pl.BlockSpec((None, cfg.nb_pad, None, d), lambda i, bi, hi: (bi, 0, hi, 0)),
            row=pl.BlockSpec((None, bq, None, cfg.gs), lambda i, bi, hi: (bi, i, hi, 0)),
            picks=pl.BlockSpec((None, bq, None, cfg.gs, cfg.kp), lambda i, bi, hi: (bi, i, hi, 0, 0)),
        )
    bkc = cfg.block_k_dbk
    return dict(
        sched=pl.BlockSpec((None, 1), lambda c, sp, bi, hi: (bi, c)),
        fv=pl.BlockSpec((None, bkc), lambda c, sp, bi, hi: (bi, c)),
        tokens=pl.BlockSpec((None, cfg.n_pad), lambda c, sp, bi, hi: (bi, 0)),
        q=pl.BlockSpec((None, cfg.n_pad, None, cfg.gs, d), lambda c, sp, bi, hi: (bi, 0, hi, 0, 0)),
        bk=pl.BlockSpec((None, bkc, None, d), lambda c, sp, bi, hi: (bi, c, hi, 0)),
        row=pl.BlockSpec((None, cfg.n_pad, None, cfg.gs), lambda c, sp, bi, hi: (bi, 0, hi, 0)),
        picks=pl.BlockSpec((None, cfg.n_pad, None, cfg.gs, cfg.kp), lambda c, sp, bi, hi: (bi, 0, hi, 0, 0)),
        out=pl.BlockSpec((None, None, bkc, None, d), lambda c, sp, bi, hi: (sp, bi, c, hi, 0)),
    )


def _bounds(layout: _Layout) -> list:
    return [x for x in (layout.blo, layout.bhi, layout.own) if x is not None]


def _forward(cfg: _Config, layout: _Layout, qs, bk):
    """qs [b, n_pad, kh, gs, d], bk [b, nb_pad, kh, d] (float32) -> (probabilities, indices)
    [b, n_pad, kh, gs, kp] and the natural log-sum-exp [b, n_pad, kh, gs]."""
    b, n_pad, kh, gs, d = qs.shape
    sp = _specs(cfg, d)
    bounds = _bounds(layout)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg),
        grid=(n_pad // cfg.block_q, b, kh),
        in_specs=[sp["sched"], sp["sched"], sp["fv"], sp["q"], sp["bk"]] + [sp["tokens"]] * len(bounds),
        out_specs=[sp["picks"], sp["picks"], sp["row"]],
        out_shape=[jax.ShapeDtypeStruct((b, n_pad, kh, gs, cfg.kp), F32),
                   jax.ShapeDtypeStruct((b, n_pad, kh, gs, cfg.kp), jnp.int32),
                   jax.ShapeDtypeStruct((b, n_pad, kh, gs), F32)],
        compiler_params=compiler_params(cfg.num_warps, cfg.num_stages),
        interpret=cfg.interpret,
        name="nsa_selection_fwd",
    )(layout.chunk_lo, layout.chunk_hi, layout.fv, qs, bk, *bounds)


def _dq(cfg: _Config, layout: _Layout, qs, bk, lse, delta, indices, w):
    """d qs [b, n_pad, kh, gs, d] (float32); qs and bk float32, as in the forward."""
    b, n_pad, kh, gs, d = qs.shape
    sp = _specs(cfg, d)
    bounds = _bounds(layout)
    return pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg),
        grid=(n_pad // cfg.block_q, b, kh),
        in_specs=[sp["sched"], sp["sched"], sp["fv"], sp["q"], sp["bk"], sp["row"], sp["row"], sp["picks"],
                  sp["picks"]] + [sp["tokens"]] * len(bounds),
        out_specs=sp["q"],
        out_shape=jax.ShapeDtypeStruct(qs.shape, F32),
        compiler_params=compiler_params(cfg.num_warps, cfg.num_stages),
        interpret=cfg.interpret,
        name="nsa_selection_dq",
    )(layout.chunk_lo, layout.chunk_hi, layout.fv, qs, bk, lse, delta, indices, w, *bounds)


def _dbk(cfg: _Config, layout: _Layout, qs, bk, lse, delta, indices, dvalues):
    """d bk [b, nb_pad, kh, d] (float32); the splits' partial sums added in XLA."""
    b, n_pad, kh, gs, d = qs.shape
    sp = _specs(cfg, d, dbk=True)
    bounds = _bounds(layout)
    dbk = pl.pallas_call(
        functools.partial(_dbk_kernel, cfg=cfg),
        grid=(cfg.nb_pad // cfg.block_k_dbk, cfg.dbk_splits, b, kh),
        in_specs=[sp["sched"], sp["sched"], sp["fv"], sp["q"], sp["bk"], sp["row"], sp["row"], sp["picks"],
                  sp["picks"]] + [sp["tokens"]] * len(bounds),
        out_specs=sp["out"],
        out_shape=jax.ShapeDtypeStruct((cfg.dbk_splits, *bk.shape), F32),
        compiler_params=compiler_params(cfg.num_warps_dbk, cfg.num_stages),
        interpret=cfg.interpret,
        name="nsa_selection_dbk",
    )(layout.tile_lo, layout.tile_hi, layout.fv, qs, bk, lse, delta, indices, dvalues, *bounds)
    return dbk.sum(axis=0)


def _backward(cfg: _Config, layout: _Layout, qs, bk, values, indices, lse, dvalues):
    # D = sum over the picks of P dP; slots beyond k are never written (and never read).
    delta = jnp.sum(values[..., : cfg.k] * dvalues[..., : cfg.k], axis=-1)  # [b, n_pad, kh, gs]
    w = values * dvalues  # P dP of each pick
    return (_dq(cfg, layout, qs, bk, lse, delta, indices, w),
            _dbk(cfg, layout, qs, bk, lse, delta, indices, dvalues))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _select(cfg: _Config, layout: _Layout, qs, bk):
    values, indices, _ = _forward(cfg, layout, qs, bk)
    return values, indices


def _select_fwd(cfg: _Config, layout: _Layout, qs, bk):
    values, indices, lse = _forward(cfg, layout, qs, bk)
    # qs and bk are float32 (`select_blocks`): the backward's logits are the forward's, which lse
    # normalises (see the module docstring on bf16 operands).
    return (values, indices), (layout, qs, bk, values, indices, lse)


def _select_bwd(cfg: _Config, res, cotangents):
    layout, *res = res
    dqs, dbk = _backward(cfg, layout, *res, cotangents[0])
    return jax.tree.map(lambda _: None, layout), dqs, dbk


_select.defvjp(_select_fwd, _select_bwd)


def _config(n: int, nc: int, nb: int, gs: int, k: int, d_pad: int, kh: int, b: int, *, stride: int, sb: int,
            causal: bool, interpolated: bool, scale: float, settings: SelectionSettings,
            packed: bool = False, active_blocks: int | None = None) -> _Config:
    """active_blocks: the blocks whose dbk programs have work when fewer than nb (a sequence
    shard's first chunk sees only its own), to size the dbk split."""
    kp = next_pow2(k)
    block_q = max(1, settings.rows // gs, cdiv(MIN_DOT, gs))
    block_q_dbk = max(1, settings.rows_dbk // gs, cdiv(MIN_DOT, gs))
    q_cap = max(next_pow2(n), next_pow2(cdiv(MIN_DOT, gs)))
    block_q, block_q_dbk = min(next_pow2(block_q), q_cap), min(next_pow2(block_q_dbk), q_cap)
    key_cap = max(MIN_DOT, kp, next_pow2(nb))
    block_k = min(max(settings.block_keys, kp, MIN_DOT), key_cap)  # >= kp: the first chunk fills every slot
    lanes = settings.top_k == "lanes" and kp <= settings.max_lane_picks
    block_k_fwd = min(max(settings.lane_keys, MIN_DOT), block_k) if lanes else block_k
    block_k_dbk = min(max(settings.block_keys_dbk, MIN_DOT), key_cap)
    n_pad = round_up(n, max(block_q, block_q_dbk))
    nb_pad = round_up(nb, max(block_k, block_k_dbk))
    # dbk: split a chunk's queries over programs until about `dbk_target_programs` run.
    programs = cdiv(min(nb_pad, active_blocks or nb_pad), block_k_dbk) * b * kh
    tiles = n_pad // block_q_dbk
    splits = min(settings.max_dbk_splits, cdiv(settings.dbk_target_programs, programs),
                 max(1, tiles // settings.min_dbk_tiles_per_split))
    return _Config(scale=float(scale), causal=causal, own_block=sb != stride, sb=sb, stride=stride, nc=nc, nb=nb,
                   interpolated=interpolated, n=n, gs=gs, k=k, kp=kp, block_q=block_q, block_k=block_k,
                   lanes=lanes, block_k_fwd=block_k_fwd,
                   block_q_dbk=block_q_dbk, block_k_dbk=block_k_dbk, n_pad=n_pad, nb_pad=nb_pad,
                   dbk_splits=max(1, splits), packed=packed,
                   num_warps=settings.num_warps,
                   num_warps_dbk=settings.num_warps_dbk or (8 if d_pad >= 128 else 4),
                   num_stages=settings.num_stages, interpret=interpret_mode())


def _block_keys_packed(ck: jax.Array, blocks: seg.Slots, stride: int, sb: int, interpolated: bool) -> jax.Array:
    """ck [b, nc, kh, d] on the entry grid -> block keys [b, nb, kh, d] (float32) on the block
    grid of `nsa_jax.segments` (`blocks`: its slots), each from its own document's entries (as
    `_block_keys` for that document alone); slots no document owns are 0."""
    ck = ck.astype(F32)
    b, nc, kh, d = ck.shape
    nb = blocks.local.shape[1]
    if sb == stride:
        return ck[:, :nb]
    base = (blocks.doc_start // stride)[:, :, None]  # [b, nb, 1]: the document's first entry slot
    take = lambda idx: jnp.take_along_axis(  # noqa: E731  entry slots [b, nb, r] -> [b, nb, r, kh, d]
        ck, jnp.clip(idx, 0, nc - 1).reshape(b, -1, 1, 1), axis=1).reshape(b, nb, idx.shape[-1], kh, d)
    if not interpolated:
        r = sb // stride
        keys = take(base + blocks.local[:, :, None] * r + jnp.arange(r)[None, None, :]).mean(axis=2)
    else:
        lo, hi, w = seg.block_interpolation(blocks, stride, sb)  # [b, nb, sb]
        w = w[..., None, None]
        keys = (take(base + lo) * (1.0 - w) + take(base + hi) * w).mean(axis=2)
    return jnp.where(blocks.valid[:, :, None, None], keys, 0.0)


def select_blocks(
    q: jax.Array,  # [b, n, h, d], not rotated
    ck: jax.Array,  # [b, m + nc, kh, d]
    segments: seg.Segments | None = None,  # packed documents
    *,
    q_offset: jax.Array | int | None = None,
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
    Differentiable in q and ck through the probabilities (diff top-k). With segments, as the
    reference: indices within the query's document, NO_PICK past its own k'. q_offset (int
    scalar, may be traced): the queries sit at positions q_offset + [0, n) of the sequence whose
    compressed keys ck are (one shard under context parallelism), as the reference's
    q_positions gives them."""
    if q_offset is not None and segments is not None:
        raise ValueError("select_blocks: q_offset (a sequence shard) does not take packed documents (segments)")
    if settings.impl == "xla":
        positions = None if q_offset is None else q_offset + jnp.arange(q.shape[1])
        return in_xla(lambda q, ck, segments, positions: reference.select_blocks(
            q, ck, num_mem=num_mem, stride=stride, causal=causal, share_heads=share_heads, num_selected=num_selected,
            selection_block_size=selection_block_size, interpolated=interpolated, scale=scale, segments=segments,
            q_positions=positions), q, ck, segments, positions)
    b, n, h, d = q.shape
    kh = ck.shape[2]
    g = h // kh
    sh = kh if share_heads else h
    nc = ck.shape[1] - num_mem
    sb = selection_block_size
    scale = d**-0.5 if scale is None else scale
    nb = seg.block_counts(nc, stride, sb, interpolated)
    k = min(num_selected, nc, nb)
    if k == 0 or n == 0:
        empty = jnp.zeros((b, n, sh, k))
        return empty.astype(F32), empty.astype(jnp.int32)

    gs = 1 if share_heads else g
    d_pad = max(MIN_DOT, next_pow2(d))
    # A shard's rows need the packed path's per-row bounds only for their own block (sb != stride).
    cfg = _config(n, nc, nb, gs, k, d_pad, kh, b, stride=stride, sb=sb, causal=causal, interpolated=interpolated,
                  scale=scale, settings=settings, packed=segments is not None or (q_offset is not None and sb != stride),
                  active_blocks=None if q_offset is None else cdiv(n, sb))
    qs = q.astype(F32).reshape(b, n, kh, g, d)
    if share_heads:
        qs = qs.mean(axis=3, keepdims=True)  # [b, n, kh, 1, d]
    qs = pad_axis(pad_axis(qs, 4, d_pad), 1, cfg.n_pad)
    if segments is None:
        layout = _static_layout(cfg, b) if q_offset is None else _shard_layout(cfg, b, q_offset)
        bk = _block_keys(ck[:, num_mem:], nc, stride, sb, interpolated)  # [b, nb, kh, d]
    else:
        blocks = seg.block_slots(segments, stride, sb, interpolated, nb)
        layout = _packed_layout(cfg, segments, blocks)
        bk = _block_keys_packed(ck[:, num_mem:], blocks, stride, sb, interpolated)
    bk = pad_axis(pad_axis(bk, 3, d_pad), 1, cfg.nb_pad)
    values, indices = _select(cfg, layout, qs, bk)  # [b, n_pad, kh, gs, kp]
    values = values[:, :n, :, :, :k].reshape(b, n, sh, k)
    indices = indices[:, :n, :, :, :k].reshape(b, n, sh, k)
    if segments is None:
        return values, indices
    picks = seg.picks_per_query(segments, k, stride, sb, interpolated)  # the document alone's k'
    kept = jnp.arange(k)[None, None, None, :] < picks[:, :, None, None]
    local = indices - (segments.start // sb)[:, :, None, None]
    return jnp.where(kept, values, 0.0), jnp.where(kept, local, reference.NO_PICK).astype(jnp.int32)

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
two row reductions). Only the probabilities and indices of the picks
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
dlogit = P * (dP - D), D = sum over the picks of P dP. dq = scale * (sum over the picks of
P dP bk[pick] - D O) with O = sum_j P_j bk_j: one pass over the blocks for O (P recomputed from
the forward's log-sum-exp), then a gather of the k picked block keys. d(block keys): one
program per chunk of blocks, kv head and split of the queries that see them, recomputing the
logits tile by tile and finding the picks among the chunk's blocks by one compare pass per
pick. The backward recomputes its logits from operands in the inputs' dtype (bf16 for a bf16
model, float32 accumulation), as flash attention's backward does; the forward's logits, which
decide the picks, are float32 whatever the inputs.
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
    backward_dtype: str  # operands of the backward's recomputed logits (the inputs' dtype)
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
    that beats its k-th best; rounds repeat while some row has one (the k-th best only rises,
    so a row whose best remaining entry does not beat it is done for this chunk).

    Blocks arrive in index order, so comparing values alone reproduces lax.top_k's order: an
    entry goes below the equal values already kept (lower indices), enters only if strictly
    above the k-th best, and a round takes a chunk's lowest index among equal values. Masked
    blocks (MASKED, finite) rank below every logit but above the empty slots (-inf). A round is
    a max and a min over the chunk (the best value, then its lowest column): cheaper than an
    argmax's paired compares, which is what this kernel spends its time on."""
    k = len(top_v)
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
        best_i = start + best_c
        above = [(best_v > v) for v in top_v]  # false for rows without a candidate
        new_v, new_i = [], []
        for p in range(k):  # sorted insertion: slots below the new entry shift down by one
            v = jnp.where(above[p], best_v, top_v[p])
            i = jnp.where(above[p], best_i, top_i[p])
            if p:
                v = jnp.where(above[p - 1], top_v[p - 1], v)
                i = jnp.where(above[p - 1], top_i[p - 1], i)
            new_v.append(v)
            new_i.append(i)
        sv = jnp.where(col == best_c[:, None], -jnp.inf, sv)
        return (tuple(new_v), tuple(new_i), sv, *best(sv))

    top_v, top_i, *_ = lax.while_loop(more, insert, (top_v, top_i, s, *best(s)))
    return top_v, top_i


def _fwd_kernel(chunks_ref, fv_ref, q_ref, bk_ref, val_ref, idx_ref, lse_ref, *, cfg: _Config):
    """The picks (probabilities, indices) and the log-sum-exp of one tile of query rows."""
    bq, gs, bkc = cfg.block_q, cfg.gs, cfg.block_k
    rows, d = bq * gs, q_ref.shape[-1]
    t = (pl.program_id(0) * bq + lax.div(iota(rows), gs))[:, None]  # [R, 1]
    pad = reference.IMPORTANCE_PAD_LOGIT  # the normaliser starts with the pad column: m = pad, l = 1

    def chunk(c, carry):
        m, l, top_v, top_i = carry
        start = c * bkc
        j = (start + iota(bkc))[None, :]  # [1, C]
        q = q_ref[...].reshape(rows, d)  # [R, d] float32, loaded per chunk (from cache): fewer registers held
        bk = bk_ref[pl.ds(start, bkc), :]
        s = _logits(cfg, q, bk, fv_ref[pl.ds(start, bkc)][None, :], t, j)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        l = l * jnp.exp(m - m_new) + jnp.sum(jnp.exp(s - m_new[:, None]), axis=1)  # MASKED gives 0
        top_v, top_i = _merge_top_k(s, start, top_v, top_i)
        return m_new, l, top_v, top_i

    init = (jnp.full((rows,), pad, F32), jnp.ones((rows,), F32),
            (jnp.full((rows,), -jnp.inf, F32),) * cfg.k, (jnp.full((rows,), NO_BLOCK, jnp.int32),) * cfg.k)
    m, l, top_v, top_i = lax.fori_loop(0, chunks_ref[0], chunk, init)
    lse = m + jnp.log(l)
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


def _dq_kernel(chunks_ref, fv_ref, q_ref, bk_ref, lse_ref, delta_ref, idx_ref, w_ref, dq_ref, *, cfg: _Config):
    """dq = scale * (sum over the picks of P dP bk[pick] - D O), O = sum_j P_j bk_j: one pass
    over the blocks for O (P from the forward's log-sum-exp, as flash attention's backward
    recomputes it), then a gather of the k picked block keys. No compare passes."""
    bq, gs, bkc = cfg.block_q, cfg.gs, cfg.block_k
    rows, d = bq * gs, q_ref.shape[-1]
    q = q_ref[...].reshape(rows, d)
    t = (pl.program_id(0) * bq + lax.div(iota(rows), gs))[:, None]
    lse = lse_ref[...].reshape(rows, 1)

    def chunk(c, o):
        start = c * bkc
        j = (start + iota(bkc))[None, :]
        bk = bk_ref[pl.ds(start, bkc), :]
        s = _logits(cfg, q, bk, fv_ref[pl.ds(start, bkc)][None, :], t, j)
        return o + mm(jnp.exp(s - lse).astype(bk.dtype), bk)  # masked logits give 0

    o = lax.fori_loop(0, chunks_ref[0], chunk, jnp.zeros((rows, d), F32))
    dq = -delta_ref[...].reshape(rows, 1) * o
    for p in range(cfg.k):
        dq = dq + w_ref[:, :, p].reshape(rows, 1) * bk_ref[idx_ref[:, :, p].reshape(rows), :].astype(F32)
    dq_ref[...] = (dq * cfg.scale).reshape(bq, gs, d)


def _dbk_kernel(first_ref, fv_ref, q_ref, bk_ref, lse_ref, delta_ref, idx_ref, dval_ref, dbk_ref, *, cfg: _Config):
    """One chunk of block keys: sum over the query tiles that see it (this split's share) of
    dlogit^T q, dlogit = P (dP - D) on transposed logits [C, R] (no tile is transposed in
    registers), dP found among the chunk's blocks by one compare pass per pick."""
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
        picks = [(idx_ref[tokens, :, p].reshape(1, rows), dval_ref[tokens, :, p].reshape(1, rows))
                 for p in range(cfg.k)]
        return dbk + mm(_dlogits(s_t, j, lse, delta, picks).astype(q.dtype), q)

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


def _forward(cfg: _Config, qs, bk):
    """qs [b, n_pad, kh, gs, d], bk [b, nb_pad, kh, d] (float32) -> (probabilities, indices)
    [b, n_pad, kh, gs, kp] and the natural log-sum-exp [b, n_pad, kh, gs]."""
    b, n_pad, kh, gs, d = qs.shape
    fv = _first_visible(cfg)
    sp = _specs(cfg, d)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg),
        grid=(n_pad // cfg.block_q, b, kh),
        in_specs=[sp["sched"], sp["fv"], sp["q"], sp["bk"]],
        out_specs=[sp["picks"], sp["picks"], sp["row"]],
        out_shape=[jax.ShapeDtypeStruct((b, n_pad, kh, gs, cfg.kp), F32),
                   jax.ShapeDtypeStruct((b, n_pad, kh, gs, cfg.kp), jnp.int32),
                   jax.ShapeDtypeStruct((b, n_pad, kh, gs), F32)],
        compiler_params=compiler_params(cfg.num_warps, cfg.num_stages),
        interpret=cfg.interpret,
        name="nsa_selection_fwd",
    )(jnp.asarray(_chunks_per_tile(cfg, fv)), jnp.asarray(fv), qs, bk)


def _dq(cfg: _Config, qs, bk, lse, delta, indices, w):
    """d qs [b, n_pad, kh, gs, d] (float32); qs and bk in the backward's operand dtype."""
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
    )(jnp.asarray(_chunks_per_tile(cfg, fv)), jnp.asarray(fv), qs, bk, lse, delta, indices, w)


def _dbk(cfg: _Config, qs, bk, lse, delta, indices, dvalues):
    """d bk [b, nb_pad, kh, d] (float32); the splits' partial sums added in XLA."""
    b, n_pad, kh, gs, d = qs.shape
    fv = _first_visible(cfg)
    sp = _specs(cfg, d, dbk=True)
    dbk = pl.pallas_call(
        functools.partial(_dbk_kernel, cfg=cfg),
        grid=(cfg.nb_pad // cfg.block_k_dbk, cfg.dbk_splits, b, kh),
        in_specs=[sp["sched"], sp["fv"], sp["q"], sp["bk"], sp["row"], sp["row"], sp["picks"], sp["picks"]],
        out_specs=sp["out"],
        out_shape=jax.ShapeDtypeStruct((cfg.dbk_splits, *bk.shape), F32),
        compiler_params=compiler_params(cfg.num_warps_dbk, cfg.num_stages),
        interpret=cfg.interpret,
        name="nsa_selection_dbk",
    )(jnp.asarray(_first_tile_per_chunk(cfg, fv)), jnp.asarray(fv), qs, bk, lse, delta, indices, dvalues)
    return dbk.sum(axis=0)


def _backward(cfg: _Config, qs, bk, values, indices, lse, dvalues):
    # D = sum over the picks of P dP; slots beyond k are never written (and never read).
    delta = jnp.sum(values[..., : cfg.k] * dvalues[..., : cfg.k], axis=-1)  # [b, n_pad, kh, gs]
    w = values * dvalues  # P dP of each pick
    return _dq(cfg, qs, bk, lse, delta, indices, w), _dbk(cfg, qs, bk, lse, delta, indices, dvalues)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _select(cfg: _Config, qs, bk):
    values, indices, _ = _forward(cfg, qs, bk)
    return values, indices


def _select_fwd(cfg: _Config, qs, bk):
    values, indices, lse = _forward(cfg, qs, bk)
    # The backward recomputes logits for gradients only: in the inputs' dtype (bf16 operands
    # with f32 accumulation, as flash attention's backward), while the picks above came from
    # float32 logits, as the reference's.
    dtype = jnp.dtype(cfg.backward_dtype)
    return (values, indices), (qs.astype(dtype), bk.astype(dtype), values, indices, lse)


def _select_bwd(cfg: _Config, res, cotangents):
    dqs, dbk = _backward(cfg, *res, cotangents[0])
    return dqs, dbk


_select.defvjp(_select_fwd, _select_bwd)


def _config(n: int, nc: int, nb: int, gs: int, k: int, d_pad: int, kh: int, b: int, *, stride: int, sb: int,
            causal: bool, interpolated: bool, scale: float, settings: SelectionSettings,
            backward_dtype: str = "float32") -> _Config:
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
                   dbk_splits=max(1, splits), backward_dtype=backward_dtype, num_warps=settings.num_warps,
                   num_warps_dbk=settings.num_warps_dbk or (8 if d_pad >= 128 else 4),
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
                  scale=scale, settings=settings, backward_dtype=jnp.promote_types(q.dtype, ck.dtype).name)
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

"""fla's block selection as a streaming Pallas kernel (`nsa_jax.fla_reference.select_blocks`).

fla scores block c of a query's document by the sum over the kv group's query heads of that
head's compressed-attention probability of entry c, forces blocks 0, own - 1 and own, and keeps
the top k (`nsa_jax.fla_reference`). One program per tile of BQ tokens and kv head, looping
over the group's query heads one [BQ, chunk] logit tile at a time (a [BQ * g, chunk] tile of
fla's 16 heads would spill registers, and summing its heads by a matmul would round the
probabilities to TF32). Two passes over the compressed keys, chunk by chunk, never writing
the [n, n / block] scores:
  1. each head's log-sum-exp over the token's visible entries (online max / sum);
  2. the probabilities exp(s - lse) summed over the heads in float32, masked to the
     candidates (+inf for the forced blocks), and merged into a running top-k per token
     (`kernels.selection._merge_top_k`: lax.top_k's order, the lower index first among
     equal scores).
Blocks live on the slots of `nsa_jax.segments`' grid (a document's block c at slot
start // block + c); a program visits the chunks its tokens' documents reach, up to their own
block (causal). Forward only: the picks are integers, with no gradient.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels._common import F32, MIN_DOT, cdiv, compiler_params, interpret_mode, iota, mm, next_pow2, pad_axis, \
    round_up
from kernels.selection import NO_BLOCK, _merge_top_k
from nsa_jax import segments as seg
from nsa_jax.fla_reference import entry_bounds
from nsa_jax.reference import NO_PICK


@dataclasses.dataclass(frozen=True)
class _Config:
    scale: float
    causal: bool
    g: int  # query heads per kv head
    k: int  # picks
    kp: int  # pick slots in HBM (power of two >= k)
    nc: int  # compressed entries (slots with a key)
    block_q: int  # tokens per program
    block_k: int  # slots per chunk
    num_warps: int
    num_stages: int
    interpret: bool


def _kernel(lo_ref, hi_ref, q_ref, ck_ref, first_ref, count_ref, cand_ref, own_ref, idx_ref, *, cfg: _Config):
    bq, bk = cfg.block_q, cfg.block_k
    first, count = first_ref[...][:, None], count_ref[...][:, None]  # [BQ, 1]: visible slots [first, first + count)
    floor = -1e30  # the running max's start: finite, so a chunk with no visible entry adds exp(-inf) = 0

    def logits(head, start):  # [BQ, C] for one query head of the group, -inf where not visible
        s = mm(q_ref[:, head, :], ck_ref[pl.ds(start, bk), :], trans_b=True) * cfg.scale
        j = (start + iota(bk))[None, :]
        return jnp.where((j >= first) & (j < first + count) & (j < cfg.nc), s, -jnp.inf)

    def normaliser(c, carry):  # per head: running max and sum
        new = []
        for head, (m, l) in enumerate(carry):
            s = logits(head, c * bk)
            m_new = jnp.maximum(m, jnp.max(s, axis=1))
            new.append((m_new, l * jnp.exp(m - m_new) + jnp.sum(jnp.exp(s - m_new[:, None]), axis=1)))
        return tuple(new)

    lo, hi = lo_ref[0], hi_ref[0]
    init = tuple((jnp.full((bq,), floor, F32), jnp.zeros((bq,), F32)) for _ in range(cfg.g))
    lse = [m + jnp.log(jnp.maximum(l, 1e-30)) for m, l in lax.fori_loop(lo, hi, normaliser, init)]
    own, cand_end = own_ref[...][:, None], cand_ref[...][:, None]  # [BQ, 1] slots

    def pick(c, carry):
        start = c * bk
        score = jnp.exp(logits(0, start) - lse[0][:, None])  # [BQ, C], 0 where not visible
        for head in range(1, cfg.g):
            score = score + jnp.exp(logits(head, start) - lse[head][:, None])
        j = (start + iota(bk))[None, :]
        candidate = (j >= first) & (j < cand_end)
        forced = (j == first) | ((j == own - 1) & (own > first)) | (j == own)
        score = jnp.where(forced, jnp.inf, jnp.where(candidate, score, -jnp.inf))
        return _merge_top_k(score, start, *carry)

    init = ((jnp.full((bq,), -jnp.inf, F32),) * cfg.k, (jnp.full((bq,), NO_BLOCK, jnp.int32),) * cfg.k)
    top_v, top_i = lax.fori_loop(lo, hi, pick, init)
    for p in range(cfg.k):
        idx_ref[:, p] = jnp.where(top_v[p] > -jnp.inf, top_i[p] - first[:, 0], NO_PICK)
    for p in range(cfg.k, cfg.kp):
        idx_ref[:, p] = jnp.full((bq,), NO_PICK, jnp.int32)


def select_blocks(
    q: jax.Array,  # [b, n, h, d]
    ck: jax.Array,  # [b, nc, kh, d]
    segments: seg.Segments,
    *,
    block_size: int,
    block_count: int,
    causal: bool,
    scale: float,
    block_q: int | None = None,
    block_k: int = 64,
    num_warps: int | None = None,
    num_stages: int = 2,
) -> jax.Array:  # [b, n, kh, k] int32 local block indices, NO_PICK in empty slots
    """`nsa_jax.fla_reference.select_blocks` without the [n, n / block_size] scores."""
    q, ck = lax.stop_gradient(q), lax.stop_gradient(ck)
    b, n, h, d = q.shape
    nc, kh = ck.shape[1], ck.shape[2]
    g = h // kh
    nb = cdiv(n, block_size)
    k = min(block_count, nb)
    bq = block_q or 32
    bk = min(block_k, max(MIN_DOT, next_pow2(nb)))
    n_pad, nb_pad = round_up(n, bq), round_up(nb, bk)
    d_pad = max(MIN_DOT, next_pow2(d))
    cfg = _Config(scale=float(scale), causal=causal, g=g, k=k, kp=next_pow2(k), nc=nc, block_q=bq,
                  block_k=bk, num_warps=num_warps or 4,
                  num_stages=num_stages, interpret=interpret_mode())

    first, count = entry_bounds(segments.start, segments.positions, segments.lengths, block_size, causal)
    own = first + segments.positions // block_size  # the own block's slot
    cand_end = own if causal else first + cdiv(segments.lengths, block_size)  # candidates [first, cand_end)
    reach = jnp.maximum(own + 1, cand_end)  # slots a token's program must visit: [first, reach)
    edge = lambda x: jnp.pad(x.astype(jnp.int32), ((0, 0), (0, n_pad - n)), mode="edge")  # noqa: E731
    first, count, own, cand_end, reach = map(edge, (first, count, own, cand_end, reach))
    lo = first.reshape(b, -1, bq).min(axis=2) // bk
    hi = cdiv(reach.reshape(b, -1, bq).max(axis=2), bk)

    qp = pad_axis(pad_axis(q.reshape(b, n, kh, g, d), 4, d_pad), 1, n_pad)  # [b, n_pad, kh, g, d_pad]
    ckp = pad_axis(pad_axis(ck, 3, d_pad), 1, nb_pad).astype(qp.dtype)  # [b, nb_pad, kh, d_pad]
    sched = pl.BlockSpec((None, 1), lambda i, bi, hi_: (bi, i))
    tokens = pl.BlockSpec((None, bq), lambda i, bi, hi_: (bi, i))
    out = pl.pallas_call(
        functools.partial(_kernel, cfg=cfg),
        grid=(n_pad // bq, b, kh),
        in_specs=[sched, sched,
                  pl.BlockSpec((None, bq, None, g, d_pad), lambda i, bi, hi_: (bi, i, hi_, 0, 0)),
                  pl.BlockSpec((None, nb_pad, None, d_pad), lambda i, bi, hi_: (bi, 0, hi_, 0)),
                  tokens, tokens, tokens, tokens],
        out_specs=pl.BlockSpec((None, bq, None, cfg.kp), lambda i, bi, hi_: (bi, i, hi_, 0)),
        out_shape=jax.ShapeDtypeStruct((b, n_pad, kh, cfg.kp), jnp.int32),
        compiler_params=compiler_params(cfg.num_warps, cfg.num_stages),
        interpret=cfg.interpret,
        name="nsa_fla_selection",
    )(lo.astype(jnp.int32), hi.astype(jnp.int32), qp, ckp, first, count, cand_end, own)
    return out[:, :n, :, :k]

"""Top-k selection of fine blocks without the [n, n / stride] logits of every query head.

The reference averages the compressed branch's logits q_h . ck_c * scale over the g query
heads of a kv head (shared selection), then over the r = sb / stride compressed columns of
each selection block (or with interpolation weights). Both averages are linear, so the
block logit is one dot product per kv head and block:

    logit[t, k, j] = mean_h(q[t, h]) . (sum_c W[j, c] ck[c, k]) * scale

with W the static [nb, nc] averaging (or interpolation) weights. This computes q-bar
[b, n, kh, d] and the block keys [b, nb, kh, d] and one [b, n, kh, nb] logit tensor
(per query head [b, n, h, nb] when heads do not share), instead of the reference's
[b, n, h, nc]: g * r times fewer logits (64x in the paper's configuration).

Masking follows the reference exactly: a block gets probability 0 iff (causal) any column
with a nonzero weight is invisible to the query, or (sb != stride) it is the query's own
block. The top k' blocks are picked on the block logits (softmax is monotone) and only
their probabilities are computed, against the log-sum-exp over [-1000, block logits], as the
reference's softmax gives them (top-k by `SelectionSettings.topk`). Plain XLA in float32,
its matmuls at JAX's matmul-precision setting like the reference's (TF32 by default on the
GPU; the parity tests run under "highest", since TF32 rounding can flip near-tied
selections); differentiable in q and ck through the probabilities (diff top-k).
"""

from __future__ import annotations

import numpy as np

import jax
import jax.numpy as jnp
from jax import lax

from kernels.settings import SelectionSettings
from nsa_jax import reference
from nsa_jax.numerics import F32


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
    (probabilities, indices), each [b, n, sh, k']."""
    b, n, h, d = q.shape
    kh = ck.shape[2]
    g = h // kh
    sh = kh if share_heads else h
    nc = ck.shape[1] - num_mem
    sb = selection_block_size
    scale = d**-0.5 if scale is None else scale
    nb = nc if sb == stride else ((nc * stride) // sb if interpolated else nc // (sb // stride))
    k = min(num_selected, nc, nb)
    if k == 0:
        empty = jnp.zeros((b, n, sh, 0))
        return empty.astype(F32), empty.astype(jnp.int32)

    block_keys = _block_keys(ck[:, num_mem:], nc, stride, sb, interpolated)  # [b, nb, kh, d]
    qf = q.astype(F32).reshape(b, n, kh, g, d)
    if share_heads:
        logits = jnp.einsum("bnkd,bjkd->bnkj", qf.mean(axis=3), block_keys)
    else:
        logits = jnp.einsum("bnkgd,bjkd->bnkgj", qf, block_keys)
        logits = logits.reshape(b, n, h, nb)
    logits = logits * scale  # [b, n, sh, nb]

    pos = jnp.arange(n)[:, None]  # [n, 1]
    blocks = jnp.arange(nb)[None, :]  # [1, nb]
    masked = jnp.zeros((n, nb), bool)
    if causal:
        last_col = jnp.asarray(_last_column(nc, stride, sb, interpolated))[None, :]
        masked = masked | ~((last_col + 1) * stride - 1 < pos)
    if sb != stride:
        masked = masked | (pos // sb == blocks)
    logits = jnp.where(masked[None, :, None, :], -jnp.inf, logits)

    # Softmax is monotone: pick on the logits, then the probabilities of the picks only,
    # against the log-sum-exp over [-1000, block logits] (never materialise the softmax).
    picking = lax.stop_gradient(logits)
    indices = lax.top_k(picking, k)[1] if settings.topk == "lax" else top_k_passes(picking, k)
    indices = indices.astype(jnp.int32)
    pad = reference.IMPORTANCE_PAD_LOGIT
    top = lax.stop_gradient(jnp.maximum(jnp.max(logits, axis=-1), pad))  # finite
    lse = top + jnp.log(jnp.sum(jnp.exp(logits - top[..., None]), axis=-1) + jnp.exp(pad - top))
    values = jnp.exp(jnp.take_along_axis(logits, indices, axis=-1) - lse[..., None])
    return values, indices


def top_k_passes(x: jax.Array, k: int) -> jax.Array:
    """Indices of the k largest entries of x [..., m] (ties: lower index first), by k
    reduction passes over x, each taking the largest entry after the previous pick in
    (value descending, index ascending) order. k reads of x and nothing written but the
    picks; same order as `lax.top_k` (which also orders -0.0 below 0.0)."""
    m = x.shape[-1]
    axis = x.ndim - 1
    pos = lax.broadcasted_iota(jnp.int32, x.shape, axis)

    def better(a, b):
        (va, ia), (vb, ib) = a, b
        take_a = (va > vb) | ((va == vb) & (ia < ib))
        return jnp.where(take_a, va, vb), jnp.where(take_a, ia, ib)

    prev_v = jnp.full(x.shape[:-1], jnp.inf, x.dtype)
    prev_i = jnp.full(x.shape[:-1], -1, jnp.int32)
    picks = []
    for _ in range(k):
        after = (x < prev_v[..., None]) | ((x == prev_v[..., None]) & (pos > prev_i[..., None]))
        prev_v, prev_i = lax.reduce((jnp.where(after, x, -jnp.inf), jnp.where(after, pos, m)),
                                    (jnp.array(-jnp.inf, x.dtype), jnp.array(m, jnp.int32)), better, (axis,))
        picks.append(prev_i)
    return jnp.stack(picks, axis=-1)

"""The NSA core as fla's `parallel_nsa` computes it (fla-core 0.6.0), in pure JAX.

`nsa_jax.ops.native_sparse_attention` runs these semantics; this module holds the two pieces
that differ from the PyTorch package's (`nsa_jax.reference`): attention over the compressed
blocks and the block selection. Selected attention and the sliding window are the package's
branches with other arguments (see `nsa_jax.ops`).

With block size B and a query at position t (within its document):
- compressed entries are the complete blocks of B tokens, one key/value each; entry c is
  visible iff (c + 1) * B <= t + 1 (causal; all complete blocks otherwise). There is no memory
  entry: a query that sees none gets 0.
- block c's importance is the sum over the kv group's query heads of that head's compressed
  attention probability of entry c; blocks 0, t // B - 1 and t // B are always taken (score
  +inf here, 1.0 per head in fla), other blocks compete if c < t // B (causal; every block of
  the document otherwise; a trailing partial block has no entry and scores 0). The top
  `block_count` blocks are picked, NO_PICK (-1) filling the slots of queries with fewer candidates.

Everything is per document when `segments` are given (`nsa_jax.segments`): entry and block c of
a document are its local c-th, at slot start // B + c of the n // B grid.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from nsa_jax import segments as seg
from nsa_jax.numerics import F32, cdiv
from nsa_jax.reference import NO_PICK, _grouped_logits, compression_windows



def single_document(b: int, n: int) -> seg.Segments:
    """The Segments of unpacked sequences: one document of n tokens per row."""
    return seg.Segments(jnp.zeros((b, n), jnp.int32), jnp.full((b, n), n, jnp.int32))


def entry_bounds(start: jax.Array, positions: jax.Array, lengths: jax.Array, block_size: int,
                 causal: bool) -> tuple[jax.Array, jax.Array]:
    """The compressed entries each query sees, as slots [first, first + count): from the query's
    document start, its position in the document and the document's length ([b, n] each)."""
    first = start // block_size
    count = (positions + 1) // block_size if causal else lengths // block_size
    return first, count


def compress(x: jax.Array, block_size: int, fn, segments: seg.Segments | None = None) -> jax.Array:
    """x [b, n, kh, d] -> fn(blocks [b, nc, block_size, kh, d]) [b, nc, kh, d], nc = n // block_size;
    with segments each document's complete blocks at its own slots (zeros in slots no document
    owns; no query sees those)."""
    windows = compression_windows(x, block_size, block_size, segments)  # [b, kh, nc, bs, d]
    return fn(windows.transpose(0, 2, 3, 1, 4))


def mean_pool(blocks: jax.Array) -> jax.Array:
    """blocks [b, nc, bs, kh, d] -> their mean [b, nc, kh, d] (float32 sum, fla's mean_pooling)."""
    return blocks.astype(F32).mean(axis=2).astype(blocks.dtype)


def _visible(first: jax.Array, count: jax.Array, nc: int) -> jax.Array:  # [b, n, nc]
    j = jnp.arange(nc)
    return (j >= first[..., None]) & (j < (first + count)[..., None])


def _masked_softmax(sim: jax.Array, visible: jax.Array) -> jax.Array:
    """sim [b, kh, g, n, nc] float32, visible broadcastable -> probabilities, rows seeing nothing 0."""
    sim = jnp.where(visible, sim, -jnp.inf)
    m = jnp.max(sim, axis=-1, keepdims=True)
    e = jnp.exp(sim - jnp.where(jnp.isfinite(m), m, 0.0))
    total = jnp.sum(e, axis=-1, keepdims=True)
    return e / jnp.where(total > 0, total, 1.0)


def compressed_attention(
    q: jax.Array,  # [b, n, h, d]
    ck: jax.Array,  # [b, nc, kh, d]
    cv: jax.Array,  # [b, nc, kh, d]
    first: jax.Array,  # [b, n]: the entries a query sees, `entry_bounds`
    count: jax.Array,  # [b, n]
    *,
    scale: float,
) -> jax.Array:  # [b, n, h, d]
    """Softmax attention of each query over its visible entries; 0 for a query that sees none."""
    b, n, h, d = q.shape
    nc = ck.shape[1]
    if nc == 0:
        return jnp.zeros_like(q)
    p = _masked_softmax(_grouped_logits(q, ck, scale), _visible(first, count, nc)[:, None, None])
    out = jnp.einsum("bkgij,bjkd->bikgd", p, cv.astype(F32))
    return out.reshape(b, n, h, d).astype(q.dtype)


def block_scores(
    q: jax.Array,  # [b, nq, h, d]
    ck: jax.Array,  # [b, nc, kh, d]
    start: jax.Array,  # [b, nq]: the query's document start, its position in it, its length
    positions: jax.Array,
    lengths: jax.Array,
    *,
    num_blocks: int,
    block_size: int,
    causal: bool,
    scale: float,
) -> jax.Array:  # [b, nq, kh, num_blocks] float32, local block indices
    """Each query's score of its document's blocks: +inf forced, -inf not a candidate."""
    b, n, h, d = q.shape
    nc, kh = ck.shape[1], ck.shape[2]
    nb = num_blocks
    first, count = entry_bounds(start, positions, lengths, block_size, causal)
    c = jnp.arange(nb)[None, None, :]  # [1, 1, nb] local block
    if nc > 0:
        p = _masked_softmax(_grouped_logits(q, ck, scale), _visible(first, count, nc)[:, None, None])
        p = p.sum(axis=2).transpose(0, 2, 1, 3)  # [b, n, kh, nc]: summed over the group
        slot = jnp.clip(first[..., None] + c, 0, nc - 1)  # [b, n, nb]
        probs = jnp.take_along_axis(p, jnp.broadcast_to(slot[:, :, None, :], (b, n, kh, nb)), axis=-1)
        probs = jnp.where((c < count[..., None])[:, :, None, :], probs, 0.0)
    else:
        probs = jnp.zeros((b, q.shape[1], kh, nb), F32)
    own = (positions // block_size)[..., None]  # [b, n, 1]
    blocks_in_doc = cdiv(lengths, block_size)[..., None]
    candidate = c < own if causal else c < blocks_in_doc
    forced = (c == 0) | (c == own - 1) | (c == own)
    score = jnp.where(candidate[:, :, None, :], probs, -jnp.inf)
    return jnp.where(forced[:, :, None, :], jnp.inf, score)


def select_blocks(
    q: jax.Array,  # [b, n, h, d]
    ck: jax.Array,  # [b, nc, kh, d]
    segments: seg.Segments,
    *,
    block_size: int,
    block_count: int,
    causal: bool,
    scale: float,
) -> jax.Array:  # [b, n, kh, k] int32 local block indices, NO_PICK in empty slots; k = min(block_count, nb)
    """The top `block_count` blocks per query and kv head (scores: `block_scores`), the highest
    first, the lower index first among equal scores. Not differentiable (integer picks). Writes
    the [b, n, h, n / block_size] scores: `kernels.fla_selection` streams them instead."""
    q, ck = lax.stop_gradient(q), lax.stop_gradient(ck)
    nb = cdiv(q.shape[1], block_size)
    scores = block_scores(q, ck, segments.start, segments.positions, segments.lengths, num_blocks=nb,
                          block_size=block_size, causal=causal, scale=scale)
    values, indices = lax.top_k(scores, min(block_count, nb))
    return jnp.where(values > -jnp.inf, indices, NO_PICK).astype(jnp.int32)

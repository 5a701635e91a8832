"""Context parallelism: one sequence split along its length over the `context` mesh axis.

The split is zig-zag, for causal balance: the sequence is cut into 2c chunks of m tokens and
device i of c holds chunks i and 2c - 1 - i, in that order (an early chunk, whose queries see few
keys, with a late one, which see many). The Trainer reorders each sequence so (`order`) before
splitting it in order. Everything but attention is per token and runs on the shard as it is. The
attention modules (`SparseAttention`, `Attention`, called with `context_axis`) put their queries
at the shard's global positions (`positions`) and all-gather the keys and values back into
sequence order (`gather`, whose transpose in the backward pass, a reduce-scatter, returns each
shard the gradient of its own keys and values). Every branch then reads the same keys as on one
device, so the result is the one-device forward's, shard by shard.

The compressed keys are computed per shard (each half's windows, with a halo of the tokens
before it where windows overlap: `compression_windows`, `halos`) and only they are all-gathered,
for the compressed branch and selection. With the Pallas backend every branch of a causal shard
runs through the kernels (`kernels/shard_attention.py`, `kernels.selection.select_blocks`'s
q_offset): the compressed branch over the gathered compressed keys and selection, half by half
at the half's positions (each half is a run of consecutive positions); selected attention over
[the shard's keys | the whole sequence's], both halves in one call; the sliding window, half by
half, with only a halo of the keys before the half. Memory per device is linear in the sequence.
The reference backend runs the reference for queries at positions (as cached decoding does),
whose selected branch holds the shard's [n / c, n] logits. Fetching only the blocks a shard's
queries selected would move far less (`bench/context_fetch.py`: 0.2-0.9% of the other shards'
blocks for a trained model at 1M tokens over 4 shards), but the all-gather and its reduce-scatter
take ~3% of a step (BENCHMARKS.md, "Context parallelism"), so the keys are gathered whole.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from nsa_jax import reference


def order(n: int, shards: int) -> np.ndarray:  # [n] int
    """The token order whose split into `shards` equal parts in order is the zig-zag split:
    chunks 0, 2c - 1, 1, 2c - 2, ... of n / 2c tokens each (n a multiple of 2c)."""
    if n % (2 * shards):
        raise ValueError(f"the sequence length ({n}) must be a multiple of twice the context parallelism "
                         f"({2 * shards})")
    chunks = np.arange(n).reshape(2 * shards, n // (2 * shards))
    return np.concatenate([chunks[[i, 2 * shards - 1 - i]].reshape(-1) for i in range(shards)])


def halves(x: jax.Array) -> tuple[jax.Array, jax.Array]:  # [b, n_local, ...] -> 2 x [b, n_local / 2, ...]
    """The shard's two chunks: (early, late)."""
    m = x.shape[1] // 2
    return x[:, :m], x[:, m:]


def positions(n_local: int, axis: str) -> jax.Array:  # [n_local] int32
    """Global positions of this shard's tokens: chunks i and 2c - 1 - i of n_local / 2 tokens."""
    i, c, m = jax.lax.axis_index(axis), jax.lax.axis_size(axis), n_local // 2
    return jnp.concatenate([i * m + jnp.arange(m), (2 * c - 1 - i) * m + jnp.arange(m)]).astype(jnp.int32)


def gather(x: jax.Array, axis: str) -> jax.Array:  # [b, n_local, ...] -> [b, n, ...]
    """The whole sequence, in sequence order, from every shard's two chunks along axis 1."""
    c = jax.lax.axis_size(axis)
    b, m = x.shape[0], x.shape[1] // 2
    every = jax.lax.all_gather(x, axis, axis=1, tiled=True).reshape(b, c, 2, m, *x.shape[2:])
    chunks = jnp.concatenate([every[:, :, 0], every[:, ::-1, 1]], axis=1)  # [b, 2c, m, ...]
    return chunks.reshape(b, 2 * c * m, *x.shape[2:])


def halos(x: jax.Array, size: int, axis: str) -> tuple[jax.Array, jax.Array]:  # 2 x [b, size, ...]
    """The `size` tokens before each of the shard's chunks (size <= n_local / 2). Before the
    early chunk i: chunk i - 1's last, the previous shard's early chunk (zeros on shard 0, where
    the sequence starts). Before the late chunk 2c - 1 - i: chunk 2c - 2 - i's last, the next
    shard's late chunk, or on the last shard its own early chunk."""
    c, i = jax.lax.axis_size(axis), jax.lax.axis_index(axis)
    early, late = halves(x)
    early_tail, late_tail = early[:, early.shape[1] - size:], late[:, late.shape[1] - size:]
    before_early = jax.lax.ppermute(early_tail, axis, [(j, j + 1) for j in range(c - 1)])
    from_next = jax.lax.ppermute(late_tail, axis, [(j + 1, j) for j in range(c - 1)])
    return before_early, jnp.where(i == c - 1, early_tail, from_next)


def compression_windows(x: jax.Array, block_size: int, stride: int, axis: str) -> jax.Array:
    """`nsa_jax.reference.compression_windows` of the whole sequence, restricted to this shard's
    windows, early chunk's then late chunk's: x [b, n_local, kh, d] (each chunk a multiple of
    stride, block_size - stride <= n_local / 2) -> [b, kh, n_local // stride, block_size, d]. A
    window reaches block_size - stride tokens back, before its chunk: those arrive as a halo
    (`halos`; shard 0's first is zeros, the one-device left padding)."""
    parts = halves(x)
    if block_size > stride:
        parts = [jnp.concatenate([h, p], axis=1) for h, p in zip(halos(x, block_size - stride, axis), parts)]
    return jnp.concatenate([reference.windows_after(p, block_size, stride) for p in parts], axis=2)

"""Context parallelism: one sequence split along its length over the `context` mesh axis.

Inside `jax.shard_map`, device i of c holds tokens [i * n / c, (i + 1) * n / c) of every sequence
of its batch slice. Everything but attention is per token and runs on the shard as it is. The
attention modules (`SparseAttention`, `Attention`, called with `context_axis`) put their queries
at the shard's global positions (`positions`) and all-gather the keys and values (`gather`,
whose transpose in the backward pass, a reduce-scatter, returns each shard the gradient of its
own keys and values). Every branch then reads the same keys as on one device, so the result is
the one-device forward's, shard by shard.

The compressed keys are computed per shard (its windows, with a halo of the previous shard's
last tokens where windows overlap: `compression_windows`) and only they are all-gathered, for
the compressed branch and selection. With the Pallas backend every branch of a causal shard
runs through the kernels (`kernels/shard_attention.py`, `kernels.selection.select_blocks`'s
q_offset): the compressed branch over the gathered compressed keys, selection at the shard's
positions, selected attention over [the shard's keys | the whole sequence's], and the sliding
window with only a halo of the previous shard's keys; memory per device is linear in the
sequence. The reference backend runs the reference for queries at positions (as cached
decoding does), whose selected branch holds the shard's [n / c, n] logits. What the issue asks
next: the selected blocks fetched from their shards instead of all keys gathered, and a zig-zag
split for causal balance.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nsa_jax import reference


def positions(n_local: int, axis: str) -> jax.Array:  # [n_local] int32
    """Global positions of this shard's tokens (the shard's index on `axis` times its length)."""
    return jax.lax.axis_index(axis) * n_local + jnp.arange(n_local)


def gather(x: jax.Array, axis: str) -> jax.Array:  # [b, n_local, ...] -> [b, n, ...]
    """The whole sequence from every shard's part along axis 1, in shard order."""
    return jax.lax.all_gather(x, axis, axis=1, tiled=True)


def shift_from_previous(x: jax.Array, axis: str) -> jax.Array:  # [b, m, ...] -> [b, m, ...]
    """Each shard receives the previous shard's x; the first shard receives zeros."""
    shards = jax.lax.axis_size(axis)
    return jax.lax.ppermute(x, axis, [(i, i + 1) for i in range(shards - 1)])


def compression_windows(x: jax.Array, block_size: int, stride: int, axis: str) -> jax.Array:
    """`nsa_jax.reference.compression_windows` of the whole sequence, restricted to this shard's
    windows: x [b, n, kh, d] (the shard; n a multiple of stride, block_size - stride <= n) ->
    [b, kh, n // stride, block_size, d]. A window reaches block_size - stride tokens back, into
    the previous shard: those arrive as a halo; the first shard's halo is zeros, the one-device
    left padding."""
    n, halo = x.shape[1], block_size - stride
    if halo:
        x = jnp.concatenate([shift_from_previous(x[:, n - halo:], axis), x], axis=1)
    return reference.windows_after(x, block_size, stride)

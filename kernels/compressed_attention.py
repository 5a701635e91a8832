"""Compressed-branch attention as a Pallas flash kernel (forward, dq, dk/dv).

Queries attend to [num_mem memory entries, nc compressed blocks]; with `causal`,
compressed entry c is visible to query t iff (c + 1) * stride - 1 < t, memory always.
The g query heads of a kv head share a tile (rows = tokens x g heads), so each
compressed K/V tile is read once per group; a query tile only visits the key tiles its
last token can see. The logits are never written to HBM: the selection scores that the
fine branch needs come from `kernels.selection.select_blocks`, which computes block
logits per kv head directly (see there).

Causal attention without memory entries (num_mem == 0; `SparseAttention` always has at
least one) goes to `nsa_jax.reference.compressed_attention`: there the first queries see
no key and the reference's softmax is uniform over all masked entries.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels._common import interpret_mode
from kernels._flash import Visibility, banded_attention
from kernels.settings import Tiles
from nsa_jax import reference
from nsa_jax import segments as seg
from nsa_jax.fla_reference import entry_bounds


def compressed_attention(
    q: jax.Array,  # [b, n, h, d], not rotated
    ck: jax.Array,  # [b, m + nc, kh, d]: m memory entries, then nc compressed blocks
    cv: jax.Array,  # [b, m + nc, kh, d]
    segments: seg.Segments | None = None,  # packed documents
    *,
    num_mem: int,
    stride: int,
    causal: bool,
    scale: float | None = None,
    tiles: Tiles = Tiles(),
) -> jax.Array:  # [b, n, h, d]
    """`nsa_jax.reference.compressed_attention` for the parallel forward (no `q_positions`).

    With segments each query sees the memory and its document's visible entries (slots
    first .. first + count - 1 of `nsa_jax.segments`' grid), as bounds per query."""
    if (causal or segments is not None) and num_mem == 0:
        return reference.compressed_attention(q, ck, cv, num_mem=num_mem, stride=stride, causal=causal, scale=scale,
                                              segments=segments)
    d = q.shape[-1]
    scale = d**-0.5 if scale is None else scale
    vis = Visibility("compressed", causal=causal, num_keys=ck.shape[1], num_mem=num_mem, stride=stride,
                     packed=segments is not None)
    if segments is None:
        return banded_attention(q, ck, cv, vis, scale=scale, tiles=tiles, interpret=interpret_mode())
    nc = ck.shape[1] - num_mem
    first = num_mem + segments.start // stride  # [b, n]
    count = segments.positions // stride if causal else segments.lengths // stride
    slots = seg.entry_slots(segments, stride, nc)  # which queries see each entry
    see_from = slots.doc_start + ((slots.local + 1) * stride if causal else 0)
    mem = lambda x, value: jnp.concatenate(  # noqa: E731  the memory entries: every query
        [jnp.full((x.shape[0], num_mem), value, jnp.int32), x.astype(jnp.int32)], axis=1)
    key_queries = (mem(jnp.where(slots.valid, see_from, q.shape[1]), 0), mem(jnp.where(slots.valid, slots.doc_end, 0),
                                                                             q.shape[1]))
    return banded_attention(q, ck, cv, vis, scale=scale, tiles=tiles, interpret=interpret_mode(),
                            bounds=(first, first + count), key_queries=key_queries)


def entry_attention(
    q: jax.Array,  # [b, n, h, d]
    ck: jax.Array,  # [b, nc, kh, d]: compressed entries, no memory
    cv: jax.Array,  # [b, nc, kh, d]
    segments: seg.Segments,  # the queries' documents (one per row when unpacked)
    *,
    block_size: int,
    causal: bool,
    scale: float,
    tiles: Tiles = Tiles(),
) -> jax.Array:  # [b, n, h, d]
    """`nsa_jax.fla_reference.compressed_attention` (fla's compressed branch: entry c of a
    document visible iff (c + 1) * block_size <= t + 1, no memory, 0 where nothing is visible)
    as the flash kernel with per-query key bounds."""
    n, nc = q.shape[1], ck.shape[1]
    if nc == 0:
        return jnp.zeros_like(q)
    first, count = entry_bounds(segments.start, segments.positions, segments.lengths, block_size, causal)
    slots = seg.entry_slots(segments, block_size, nc)  # the queries that see each entry
    see_from = slots.doc_start + ((slots.local + 1) * block_size - 1 if causal else 0)
    key_queries = (jnp.where(slots.valid, see_from, n), jnp.where(slots.valid, slots.doc_end, 0))
    vis = Visibility("compressed", causal=causal, num_keys=nc, stride=block_size, packed=True)
    out = banded_attention(q, ck, cv, vis, scale=scale, tiles=tiles, interpret=interpret_mode(),
                           bounds=(first, first + count), key_queries=key_queries)
    # Rows that see no entry may share a tile with rows that do: their finite garbage is
    # replaced by 0 (and gets no cotangent, so the backward ignores them).
    return jnp.where((count > 0)[:, :, None, None], out, 0).astype(q.dtype)

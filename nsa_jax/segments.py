"""Packed documents: where each token's document starts and ends, and the per-document grids.

`segment_ids` [b, n] marks documents as runs of equal ids (splash attention's and MaxText's
idiom; a later run of an id already seen is another document). With them every token must get
what running its document alone would give it, positions restarting at 0. The NSA branches
work on two grids derived from token positions, and each document gets its own:

- compressed entries, one per `stride` tokens of a document: a document starting at token s
  with L tokens owns entry slots s // stride + e for e < L // stride (its e-th entry compresses
  its local tokens e * stride - (block - stride) .. (e + 1) * stride - 1, zeros before its start);
- selection blocks of `sb` tokens, likewise at slots s // sb + b for b < its block count.

Contiguous documents never share a slot (floor(s / m) + floor(L / m) <= floor((s + L) / m)), so
both grids keep their single-document sizes, n // stride and n // sb, and a single document
gets exactly today's layout. A slot's owner is the document of its last token: slot c of
grid m belongs to the document holding token (c + 1) * m - 1, if that document reaches c.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax


class Segments(NamedTuple):
    """Per-token document bounds, both [b, n] int32: the first token of the token's document
    and one past its last."""

    start: jax.Array
    end: jax.Array

    @property
    def positions(self) -> jax.Array:  # [b, n]: the token's position within its document
        return jnp.arange(self.start.shape[1], dtype=jnp.int32)[None] - self.start

    @property
    def lengths(self) -> jax.Array:  # [b, n]: its document's length
        return self.end - self.start


def from_ids(segment_ids: jax.Array) -> Segments:
    """segment_ids [b, n] (any integer dtype) -> Segments."""
    ids = jnp.asarray(segment_ids)
    b, n = ids.shape
    t = jnp.arange(n, dtype=jnp.int32)[None]
    change = ids[:, 1:] != ids[:, :-1]  # [b, n - 1]: a document ends at i, the next starts at i + 1
    first = jnp.concatenate([jnp.ones((b, 1), bool), change], axis=1)
    last = jnp.concatenate([change, jnp.ones((b, 1), bool)], axis=1)
    start = lax.cummax(jnp.where(first, t, 0), axis=1)
    end = lax.cummin(jnp.where(last, t + 1, n), axis=1, reverse=True)
    return Segments(start.astype(jnp.int32), end.astype(jnp.int32))


class Slots(NamedTuple):
    """A per-document grid of `size` slots of `unit` tokens, for every slot [b, slots]: its
    document's first token, the slot's index within that document's grid (`local`), and
    whether the document reaches it (`valid`)."""

    doc_start: jax.Array
    doc_end: jax.Array
    local: jax.Array
    valid: jax.Array


def slots(segments: Segments, unit: int, count: int, per_document=None) -> Slots:
    """The grid of `count` slots of `unit` tokens (count <= n // unit). per_document(L) -> the
    number of slots a document of L tokens owns (default L // unit)."""
    c = jnp.arange(count, dtype=jnp.int32)
    last_token = (c + 1) * unit - 1
    s = segments.start[:, last_token]
    e = segments.end[:, last_token]
    local = c[None] - s // unit
    owned = (e - s) // unit if per_document is None else per_document(e - s)
    return Slots(s, e, local, local < owned)


def same_document(segments: Segments, doc_start: jax.Array | None = None) -> jax.Array:
    """[b, n, slots]: the slot's document (by its first token) is the query's; without
    doc_start, [b, n, n] for the tokens themselves."""
    doc_start = segments.start if doc_start is None else doc_start
    return segments.start[:, :, None] == doc_start[:, None, :]


def entry_slots(segments: Segments, stride: int, count: int) -> Slots:
    """The compressed entries' grid (`count` = n // stride entry slots)."""
    return slots(segments, stride, count)


def block_counts(num_entries, stride: int, sb: int, interpolated: bool):
    """Selection blocks of a sequence or document with `num_entries` compressed entries (an
    int or an array), as `reference.block_importance` forms them (a trailing partial block
    is dropped)."""
    if sb == stride:
        return num_entries
    if interpolated:
        return (num_entries * stride) // sb
    return num_entries // (sb // stride)


def block_slots(segments: Segments, stride: int, sb: int, interpolated: bool, count: int) -> Slots:
    """The selection blocks' grid (`count` = n // sb block slots)."""
    return slots(segments, sb, count, lambda length: block_counts(length // stride, stride, sb, interpolated))


def picks_per_query(segments: Segments, num_selected: int, stride: int, sb: int, interpolated: bool) -> jax.Array:
    """[b, n]: the picks each query's document alone makes, k' = min(k, entries, blocks)."""
    entries = segments.lengths // stride
    return jnp.minimum(jnp.minimum(num_selected, entries), block_counts(entries, stride, sb, interpolated))


def block_interpolation(blocks: Slots, stride: int, sb: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Interpolated importance on the block grid: for each block slot's sb tokens [b, nb, sb],
    the two entries (lo, hi: indices within its document) that token interpolates and the
    weight w of hi, as `reference._interpolate_to_tokens` for the document alone."""
    entries = ((blocks.doc_end - blocks.doc_start) // stride)[:, :, None]
    j = (blocks.local[:, :, None] * sb + jnp.arange(sb)[None, None, :]).astype(jnp.float32)
    src = jnp.maximum((j + 0.5) / stride - 0.5, 0.0)
    lo = jnp.floor(src).astype(jnp.int32)
    return lo, jnp.minimum(lo + 1, entries - 1), src - lo


def window_padding(segments: Segments, window: int) -> jax.Array:
    """[b, n]: the zero keys within `window` of each query that its document alone gets from
    the package's non-causal sliding window (keys zero-padded to a multiple of the window)."""
    pos, length = segments.positions, segments.lengths
    padded = (length + window - 1) // window * window
    return jnp.maximum(jnp.minimum(padded - 1, pos + window) - jnp.maximum(length, pos - window) + 1, 0)

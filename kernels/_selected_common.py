"""What both selected-attention kernel families share: the static layout, the block sort and
packed documents.

`kernels.selected_query` (one program per query) and `kernels.selected_tiled` (one program
per tile of queries) import this module; neither imports the other.

Packed documents (`nsa_jax.segments`): the selection picks blocks of the query's own document
(local indices). The kernels take them as block *slots* (`nsa_jax.segments.slots`: slot
s // sb + local for a document starting at token s), which documents never share, with a table
of each slot's first token; a slot is one of a document's full blocks, so its keys need no
mask. The own block (a document's last one may be partial) starts at s + (p // sb) * sb for
a query at position p, is cut at the document's end, and non-causal queries whose document
picks nothing also count the zero keys their document alone is padded with there.
"""

from __future__ import annotations

import dataclasses

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from kernels._common import iota, pad_axis
from nsa_jax import segments as seg


@dataclasses.dataclass(frozen=True)
class SelectedConfig:
    """The static shape of one selected-attention call, as the kernels see it."""

    sb: int  # selection block size
    sbp: int  # keys loaded per block: a power of two >= sb (>= MIN_DOT on the matrix-unit path)
    nb: int  # key blocks
    nq: int  # queries
    num_sel: int  # k'
    kp: int  # k' padded to a power of two (>= 1)
    rows: int  # rows of a selection group (g heads when shared, else 1), power of two
    groups_per_kv: int  # selection groups per kv head (1 when shared, else g)
    causal: bool
    scale: float
    num_warps: int
    num_stages: int
    interpret: bool
    packed: bool  # documents packed: indices are block slots, queries carry their document's bounds
    gate_grad: bool  # the gates need a gradient (diff-top-k); without, the dq kernels skip the dgate sums

    @property
    def zero_rows_possible(self) -> bool:
        """Non-causal with k' > 0: a group with no valid block gets the uniform fallback."""
        return not self.causal and self.num_sel > 0

    @property
    def own_block(self) -> bool:
        """The own block can be attended (causal, nothing can be selected, or packed: a document
        may pick nothing)."""
        return self.causal or self.num_sel == 0 or self.packed

    @property
    def phantom_keys(self) -> bool:
        """Non-causal packed: a query whose document picks nothing counts its own block's padding."""
        return self.packed and not self.causal


class Packed(NamedTuple):
    """The packed-document inputs of the kernels, all int32."""

    start: jax.Array  # [b, nq] first token of each query's document
    end: jax.Array  # [b, nq] one past its last
    slot_start: jax.Array  # [b, nb] first token of each block slot (0 where no document has that block)
    key_source: jax.Array  # [b, nk_alloc] each key's row in the per-slot tiles [nb * sbp], or -1
    own_queries: jax.Array  # [b, nb, 2] the queries [first, end) with keys of aligned block j in their own block


def packed_inputs(segments: seg.Segments, *, sb: int, sbp: int, nb: int, nk_alloc: int, causal: bool) -> Packed:
    """Slot table, per-key slot rows and own-block query ranges of these documents (every full
    block is a slot)."""
    n = segments.start.shape[1]
    slots = seg.slots(segments, sb, n // sb)
    slot_start = pad_axis(jnp.where(slots.valid, slots.doc_start + slots.local * sb, 0), 1, nb)
    s = segments.start
    u = jnp.arange(n, dtype=jnp.int32)[None]
    local = (u - s) // sb  # [b, n] the key's block in its document
    row = (s // sb + local) * sbp + (u - s) % sb
    source = jnp.where(local < segments.lengths // sb, row, -1)
    source = jnp.pad(source, ((0, 0), (0, nk_alloc - n)), constant_values=-1)
    # Key u is in the own block of the queries [u (causal) or its block's first token, block end).
    own_lo = s + local * sb
    first = jnp.broadcast_to(u, s.shape) if causal else own_lo
    end = jnp.minimum(own_lo + sb, segments.end)
    per_block = lambda x, fill, op: op(  # noqa: E731  [b, n] -> [b, nb]
        jnp.pad(x, ((0, 0), (0, nb * sb - n)), constant_values=fill).reshape(-1, nb, sb), axis=2)
    own_queries = jnp.stack([per_block(first, n, jnp.min), per_block(end, 0, jnp.max)], axis=-1)
    i32 = lambda x: x.astype(jnp.int32)  # noqa: E731
    return Packed(s, segments.end, i32(slot_start), i32(source), i32(own_queries))


def slot_indices(indices: jax.Array, segments: seg.Segments, sb: int) -> jax.Array:
    """Local block indices [b, nq, sh, k'] (NO_PICK = -1 past a document's k') -> block slots (-1 kept)."""
    first = (segments.start // sb)[:, :, None, None]
    return jnp.where(indices >= 0, indices + first, -1).astype(jnp.int32)


def slot_tiles_to_keys(x: jax.Array, source: jax.Array) -> jax.Array:
    """x [b, nb, sbp, ...] per-slot key tiles -> [b, nk_alloc, ...] per key (zero where no slot)."""
    b, nb, sbp = x.shape[:3]
    flat = x.reshape(b, nb * sbp, *x.shape[3:])
    idx = jnp.maximum(source, 0).reshape(b, -1, *([1] * (x.ndim - 3)))
    got = jnp.take_along_axis(flat, idx, axis=1)
    return jnp.where((source >= 0).reshape(idx.shape), got, 0)


def no_pick(cfg: SelectedConfig, idx: jax.Array, keepdims: bool = True) -> jax.Array:
    """idx [.., kp] -> [.., 1] (or [..]): the row's document picks no block (packed; all slots -1)."""
    if cfg.num_sel == 0:
        return jnp.full(idx.shape[:-1] + ((1,) if keepdims else ()), True)
    picked = (idx >= 0) & (iota(cfg.kp) < cfg.num_sel)
    return jnp.max(jnp.where(picked, 1, 0), axis=-1, keepdims=keepdims) == 0


def own_block_range(cfg: SelectedConfig, t, bounds):
    """Query t's own block: (its first key token, one past its last, its block slot). t of any
    shape; bounds = (document start, end) shaped like t, or None unpacked, where the block runs
    past the sequence end into the zero keys the package pads with (non-causal, k' = 0)."""
    if cfg.packed:
        start, end = bounds
        local = lax.div(t - start, cfg.sb)
        lo = start + local * cfg.sb
        return lo, jnp.minimum(lo + cfg.sb, end), lax.div(start, cfg.sb) + local
    slot = lax.div(t, cfg.sb)
    return slot * cfg.sb, slot * cfg.sb + cfg.sb, slot


def own_keys(cfg: SelectedConfig, t, keys, bounds, idx, valid):
    """Which `keys` (token ids) query t attends as its own block: (mask, phantom zero keys or None).

    Per query t a scalar (keys [K], idx / valid [kp]) or per row [R, 1] (keys [1, K], idx /
    valid [R, kp]); bounds as `own_block_range`. A validly selected own block is attended in full
    (with its gate) among the selected ones instead.
    """
    lo, hi, slot = own_block_range(cfg, t, bounds)
    mask = (keys >= lo) & (keys < hi)
    if cfg.causal:
        mask = mask & (keys <= t)
    attend = own_attended(cfg, slot, idx, valid)
    if attend is not None:
        mask = mask & attend
    phantom = jnp.where(attend, jnp.maximum(lo + cfg.sb - bounds[1], 0), 0) if cfg.phantom_keys else None
    return mask, phantom


def own_attended(cfg: SelectedConfig, slot, idx, valid, keepdims: bool = True):
    """Whether a query attends its own block (slot) as such: not when it validly selected it, and
    (packed, non-causal) only when its document picks no block; None when always. idx / valid
    [.., kp]; slot shaped like the result: [.., 1] (keepdims) or [..]."""
    attend = None
    if cfg.num_sel > 0:
        hit = idx == (slot if keepdims else slot[..., None])
        attend = jnp.max(jnp.where(hit & valid, 1, 0), axis=-1, keepdims=keepdims) == 0
    if cfg.phantom_keys:
        nothing = no_pick(cfg, idx, keepdims)
        attend = nothing if attend is None else attend & nothing
    return attend


# sort_by_block sorts all rows as one flat array from this many entries on, each row on its own
# below (H200, 4 or 8 rows, wall ms per sort, batched -> flat: 4 x 2^18 0.60 -> 0.73, 8 x 2^17 0.56 ->
# 0.67, 4 x 2^19 0.83 -> 0.55, 8 x 2^20 3.14 -> 0.72; BENCHMARKS.md, "sort_by_block").
FLAT_SORT_MIN_ENTRIES = 1 << 21


def sort_by_block(key: jax.Array, nb: int) -> tuple[jax.Array, jax.Array]:
    """key [rows, e] block ids in [0, nb] (nb: unused entry) -> (order [rows, e]: entry ids sorted by block,
    stable; offsets [rows, nb + 1] int32: block j's entries are order[offsets[j]:offsets[j + 1]]).

    The transpose of a selection (which queries or tiles chose each block), for the dk/dv kernels.
    Large selections are sorted as one flat array keyed by (row, block): on Hopper, XLA's sort
    rewriter sends a one-row sort of 32-bit pairs (over 22,000 of them) to CUB's radix sort, but a
    batch of fewer than 27 rows to XLA's own sort network (4 rows of 2^20 at T = 64k, fla config,
    H200: 42 kernels, 1.1 ms). Below `FLAT_SORT_MIN_ENTRIES` the batched sort network is the faster.
    """
    rows, e = key.shape
    if rows * e < FLAT_SORT_MIN_ENTRIES:  # one sort gives both the sorted keys and the order
        sorted_key, order = lax.sort((key.astype(jnp.int32), lax.broadcasted_iota(jnp.int32, (rows, e), 1)),
                                     dimension=1, num_keys=1, is_stable=True)
    else:
        row = jnp.arange(rows, dtype=jnp.int32)[:, None]
        flat = (key.astype(jnp.int32) + row * (nb + 1)).reshape(rows * e)
        sorted_flat, order = lax.sort((flat, lax.iota(jnp.int32, rows * e)), num_keys=1, is_stable=True)
        sorted_key = sorted_flat.reshape(rows, e) - row * (nb + 1)
        order = order.reshape(rows, e) - row * e  # each row's entries stay in its own span
    return order, block_offsets(sorted_key, nb)


# block_offsets counts with one comparison per (entry, block) up to this many of them (one kernel),
# and scatters run starts above it (two kernels, linear in the entries)
COMPARE_ALL_MAX = 1 << 25


def block_offsets(sorted_key: jax.Array, nb: int) -> jax.Array:
    """sorted_key [rows, e] block ids in [0, nb], ascending per row -> [rows, nb + 1] int32: entries
    with a smaller id than j (block j's first entry).

    Small selections count the entries below each block in one reduction. Larger ones write each
    run's first position to its block (one scatter whose targets never collide), then a reverse
    cumulative minimum gives blocks without entries their successor's offset. Not
    `jnp.searchsorted`: a while loop of log2(e) steps, a few kernels and a host round trip each
    (the seed model's T = 512 step: 72 iterations, ~150 kernels), or four kernels unrolled; not a
    scatter-add of counts, whose atomics pile onto the blocks most queries pick (the first ones,
    under causal selection)."""
    rows, e = sorted_key.shape
    if rows * e * (nb + 1) <= COMPARE_ALL_MAX:
        below = sorted_key[:, None, :] < jnp.arange(nb + 1, dtype=sorted_key.dtype)[None, :, None]
        return jnp.sum(below, axis=-1, dtype=jnp.int32)
    pos = lax.broadcasted_iota(jnp.int32, (rows, e), 1)
    run_start = jnp.concatenate([jnp.ones((rows, 1), bool), sorted_key[:, 1:] != sorted_key[:, :-1]], axis=1)
    target = jnp.where(run_start, sorted_key, nb + 1)  # past the end: dropped
    first = jnp.full((rows, nb + 1), e, jnp.int32).at[jnp.arange(rows)[:, None], target].set(pos, mode="drop")
    return lax.cummin(first, axis=1, reverse=True)

"""The branches of NSA for a run of consecutive queries of a longer sequence: one chunk of a
sequence shard under context parallelism.

Inside `jax.shard_map`, a device holds two chunks of a longer sequence (`nsa_jax.context`), each
a run of queries [off, off + n) that these functions serve. The compressed branch and the
sliding window are the banded flash kernel of `_flash.py` in its packed form, whose per-query
key bounds say what each row sees, so no kernel changes:
- compressed: the whole sequence's compressed keys (with memory); query t (global) sees
  memory and entries c < t // stride: bounds [num_mem, num_mem + t // stride), and entry c is
  seen by the run's rows from (c + 1) * stride - off on;
- sliding window: the `window` keys before the run arrive as a halo (`nsa_jax.context.halos`)
  and go in front of its own; `window` zero query rows go in front of the queries, so that row
  and key indices line up as in a one-device call. At the sequence start the halo does not
  exist: the real rows' bounds start after it (the padding rows see the halo, and are dropped).
- selected attention: the selected kernels' packed-documents form, with no kernel change. The
  keys are the run's own, then the whole sequence's (all-gathered): [own | all]. Every query
  is in one "document", the run, so its own block and the causal mask fall among the own keys
  at the row's index. The picks, blocks of the whole sequence, become the slots after the own
  blocks, so an own block is never mistaken for a pick.
Memory per device: linear in the sequence (the gathered keys) and the shard; no [n, n] logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels._common import interpret_mode
from kernels._flash import Visibility, banded_attention
from kernels._selected_common import Packed
from kernels.selected_attention import layout, packed_keys, run_kernels
from kernels.settings import SelectedSettings, Tiles


def compressed_attention_shard(
    q: jax.Array,  # [b, n, h, d]: the run's queries, not rotated
    ck: jax.Array,  # [b, m + nc, kh, d]: memory, then the whole sequence's compressed keys
    cv: jax.Array,  # [b, m + nc, kh, d]
    positions: jax.Array,  # [n] int: the queries' global positions, consecutive
    *,
    num_mem: int,
    stride: int,
    scale: float,
    tiles: Tiles = Tiles(),
) -> jax.Array:  # [b, n, h, d]
    """Causal compressed attention of the run's queries (as the one-device forward's rows)."""
    b, n = q.shape[:2]
    nk = ck.shape[1]
    lo = jnp.full((b, n), num_mem, jnp.int32)
    hi = jnp.broadcast_to(jnp.minimum(num_mem + positions // stride, nk).astype(jnp.int32), (b, n))
    entry = jnp.arange(nk - num_mem)
    sees_from = jnp.clip((entry + 1) * stride - positions[0], 0, n)  # the first row that sees entry c
    q_lo = jnp.concatenate([jnp.zeros((num_mem,), jnp.int32), sees_from.astype(jnp.int32)])
    key_queries = (jnp.broadcast_to(q_lo, (b, nk)), jnp.full((b, nk), n, jnp.int32))
    vis = Visibility("compressed", causal=True, num_keys=nk, num_mem=num_mem, stride=stride, packed=True)
    return banded_attention(q, ck, cv, vis, scale=scale, tiles=tiles, interpret=interpret_mode(),
                            bounds=(lo, hi), key_queries=key_queries)


def sliding_window_shard(
    q: jax.Array,  # [b, n, h, d]: queries at consecutive positions, rotated
    k: jax.Array,  # [b, n, kh, d]: their keys, rotated
    v: jax.Array,  # [b, n, kh, d]
    k_halo: jax.Array,  # [b, window, kh, d]: the `window` keys before them (`nsa_jax.context.halos`)
    v_halo: jax.Array,  # [b, window, kh, d]
    has_halo: jax.Array | bool,  # false where the run starts the sequence: no keys before it
    *,
    window: int,
    scale: float,
    tiles: Tiles = Tiles(),
) -> jax.Array:  # [b, n, h, d]
    """Causal sliding-window attention of a run of consecutive positions within a longer
    sequence (a chunk of a sequence shard), given the keys before it as its halo (window <= n)."""
    b, n, h, d = q.shape
    if window > n:
        raise ValueError(f"the sliding window ({window}) must fit in half a sequence shard ({n} tokens): "
                         "use a smaller --context_parallelism")
    k_ext = jnp.concatenate([k_halo, k], axis=1)  # [b, window + n, kh, d]
    v_ext = jnp.concatenate([v_halo, v], axis=1)
    q_ext = jnp.concatenate([jnp.zeros((b, window, h, d), q.dtype), q], axis=1)
    rows = jnp.arange(window + n)
    first = jnp.where(jnp.logical_not(has_halo) & (rows >= window), window, 0)  # no halo: rows start after it
    rows_shape = (b, window + n)
    bounds = (jnp.broadcast_to(first, rows_shape).astype(jnp.int32), jnp.full(rows_shape, window + n, jnp.int32))
    vis = Visibility("window", causal=True, num_keys=window + n, window=window, packed=True)
    out = banded_attention(q_ext, k_ext, v_ext, vis, scale=scale, tiles=tiles, interpret=interpret_mode(),
                           bounds=bounds)
    return out[:, window:]


def selected_attention_shard(
    q: jax.Array,  # [b, n, h, d]: the run's queries, rotated
    k: jax.Array,  # [b, n, kh, d]: the run's keys, rotated
    v: jax.Array,  # [b, n, kh, d]
    k_all: jax.Array,  # [b, N, kh, d]: the whole sequence's keys, rotated (all-gathered)
    v_all: jax.Array,  # [b, N, kh, d]
    indices: jax.Array,  # [b, n, sh, k']: blocks of the whole sequence
    valid: jax.Array,  # [b, n, sh, k'] bool
    gates: jax.Array | None,  # [b, n, sh, k']
    *,
    block_size: int,
    scale: float,
    settings: SelectedSettings = SelectedSettings(),
) -> jax.Array:  # [b, n, h, d]
    """Causal selected attention of a run of consecutive queries (a whole number of selection
    blocks, starting at a multiple of one), as the one-device forward's rows."""
    b, n = q.shape[:2]
    sb = block_size
    if n % sb or k_all.shape[1] % sb:
        raise ValueError(f"a run of queries ({n} tokens) must be a whole number of selection blocks ({sb})")
    keys, values = jnp.concatenate([k, k_all], axis=1), jnp.concatenate([v, v_all], axis=1)  # [own | all]
    lay = layout(q.shape, keys.shape, indices.shape, block_size=sb, settings=settings)
    own_blocks, nk_alloc = n // sb, packed_keys(lay, sb)
    u = jnp.arange(nk_alloc, dtype=jnp.int32)
    slot = jnp.arange(lay.nb, dtype=jnp.int32)  # own blocks, then the sequence's: slot j starts at key j * sb
    own = slot < own_blocks  # the queries with keys of slot j in their own block: its own tokens
    own_queries = jnp.stack([jnp.where(own, slot * sb, n), jnp.where(own, slot * sb + sb, 0)], axis=-1)
    per_batch = lambda x: jnp.broadcast_to(x.astype(jnp.int32), (b, *x.shape))  # noqa: E731
    packed = Packed(start=per_batch(jnp.zeros(n, jnp.int32)), end=per_batch(jnp.full(n, n, jnp.int32)),
                    slot_start=per_batch(slot * sb),
                    key_source=per_batch(jnp.where(u < keys.shape[1], (u // sb) * lay.sbp + u % sb, -1)),
                    own_queries=per_batch(own_queries))
    return run_kernels(q, keys, values, (indices + own_blocks).astype(jnp.int32), valid, gates, packed,
                       block_size=sb, causal=True, scale=scale, settings=settings)

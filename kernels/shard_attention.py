"""The compressed branch and the sliding window for one sequence shard (context parallelism).

Inside `jax.shard_map`, a device holds queries [off, off + n) of a longer sequence
(`nsa_jax.context`). Both branches are the banded flash kernel of `_flash.py` in its packed
form, whose per-query key bounds say what each row sees, so no kernel changes:
- compressed: the whole sequence's compressed keys (with memory); query t (global) sees
  memory and entries c < t // stride: bounds [num_mem, num_mem + t // stride), and entry c is
  seen by the shard's rows from (c + 1) * stride - off on;
- sliding window: the previous shard's last `window` keys arrive by `ppermute` (a halo) and go
  in front of the shard's own; `window` zero query rows go in front of the queries, so that row
  and key indices line up as in a one-device call. On the first shard the halo does not exist:
  the real rows' bounds start after it (the padding rows see the halo, and are dropped).
- selected attention: the selected kernels' packed-documents form, with no kernel change. The
  keys are the shard's own, then the whole sequence's (all-gathered): [own | all]. Every query
  is in one "document", the shard, so its own block and the causal mask fall among the own
  keys at the row's index. The picks, blocks of the whole sequence, become the slots after the
  own blocks, so an own block is never mistaken for a pick.
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
from nsa_jax import context


def compressed_attention_shard(
    q: jax.Array,  # [b, n, h, d]: the shard's queries, not rotated
    ck: jax.Array,  # [b, m + nc, kh, d]: memory, then the whole sequence's compressed keys
    cv: jax.Array,  # [b, m + nc, kh, d]
    positions: jax.Array,  # [n] int: the queries' global positions, consecutive
    *,
    num_mem: int,
    stride: int,
    scale: float,
    tiles: Tiles = Tiles(),
) -> jax.Array:  # [b, n, h, d]
    """Causal compressed attention of the shard's queries (as the one-device forward's rows)."""
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
    q: jax.Array,  # [b, n, h, d]: the shard's queries, rotated
    k: jax.Array,  # [b, n, kh, d]: the shard's keys, rotated
    v: jax.Array,  # [b, n, kh, d]
    *,
    window: int,
    axis: str,
    scale: float,
    tiles: Tiles = Tiles(),
) -> jax.Array:  # [b, n, h, d]
    """Causal sliding-window attention of shard `axis_index(axis)` of the sequence, with the
    previous shard's last `window` keys as its halo (window <= n)."""
    b, n, h, d = q.shape
    if window > n:
        raise ValueError(f"the sliding window ({window}) must fit in one sequence shard ({n} tokens): "
                         "use a smaller --context_parallelism")
    halo = lambda x: context.shift_from_previous(x[:, n - window:], axis)  # noqa: E731  (shard 0: zeros)
    k_ext = jnp.concatenate([halo(k), k], axis=1)  # [b, window + n, kh, d]
    v_ext = jnp.concatenate([halo(v), v], axis=1)
    q_ext = jnp.concatenate([jnp.zeros((b, window, h, d), q.dtype), q], axis=1)
    rows = jnp.arange(window + n)
    first = jnp.where((jax.lax.axis_index(axis) == 0) & (rows >= window), window, 0)  # no halo on shard 0
    rows_shape = (b, window + n)
    bounds = (jnp.broadcast_to(first, rows_shape).astype(jnp.int32), jnp.full(rows_shape, window + n, jnp.int32))
    vis = Visibility("window", causal=True, num_keys=window + n, window=window, packed=True)
    out = banded_attention(q_ext, k_ext, v_ext, vis, scale=scale, tiles=tiles, interpret=interpret_mode(),
                           bounds=bounds)
    return out[:, window:]


def selected_attention_shard(
    q: jax.Array,  # [b, n, h, d]: the shard's queries, rotated
    k: jax.Array,  # [b, n, kh, d]: the shard's keys, rotated
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
    """Causal selected attention of one sequence shard's queries (the shard a whole number of
    selection blocks, so its offset is one too), as the one-device forward's rows."""
    b, n = q.shape[:2]
    sb = block_size
    if n % sb or k_all.shape[1] % sb:
        raise ValueError(f"a sequence shard ({n} tokens) must be a whole number of selection blocks ({sb})")
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

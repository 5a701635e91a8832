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
Memory per device: linear in the shard (and the compressed keys); no [n, n] logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels._common import interpret_mode
from kernels._flash import Visibility, banded_attention
from kernels.settings import Tiles
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

"""The branches of NSA for the queries of one sequence shard under context parallelism: runs of
consecutive queries of a longer sequence.

Inside `jax.shard_map`, a device holds two chunks of a longer sequence (`nsa_jax.context`), each
a run of queries [off, off + n) that these functions serve. The compressed branch and the
sliding window are the banded flash kernel of `_flash.py`:
- compressed: the whole sequence's compressed keys (with memory), the rows at their positions
  (the kernel's `Visibility.offset`): as one sequence's, tiles fully visible go unmasked;
- sliding window, in the kernel's packed form (per-query key bounds): the `window` keys before
  the run arrive as a halo (`nsa_jax.context.halos`)
  and go in front of its own; `window` zero query rows go in front of the queries, so that row
  and key indices line up as in a one-device call. At the sequence start the halo does not
  exist: the real rows' bounds start after it (the padding rows see the halo, and are dropped).
- selected attention: the selected kernels as for one sequence, with no kernel change. The
  keys are the run's own, then the whole sequence's (all-gathered): [own | all], so a query's
  own block and the causal mask fall among the own keys at the row's index, as when queries
  and keys are one sequence. The picks, blocks of the whole sequence, become the blocks after
  the own ones, so an own block is never mistaken for a pick; key blocks past the queries hold
  no query's own block, which the kernels' own-block loops already skip.
Memory per device: linear in the sequence (the gathered keys) and the shard; no [n, n] logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels._common import interpret_mode
from kernels._flash import Visibility, banded_attention
from kernels.selected_attention import run_kernels
from kernels.settings import SelectedSettings, Tiles


def compressed_attention_shard(
    q: jax.Array,  # [b, n, h, d]: the run's queries, not rotated
    ck: jax.Array,  # [b, m + nc, kh, d]: memory, then the whole sequence's compressed keys
    cv: jax.Array,  # [b, m + nc, kh, d]
    q_offset: jax.Array | int,  # the first query's position in the sequence (may be traced)
    *,
    num_mem: int,
    stride: int,
    scale: float,
    tiles: Tiles = Tiles(),
) -> jax.Array:  # [b, n, h, d]
    """Causal compressed attention of the run's queries (as the one-device forward's rows): the
    one-sequence kernel with the rows at their positions (`Visibility.offset`)."""
    vis = Visibility("compressed", causal=True, num_keys=ck.shape[1], num_mem=num_mem, stride=stride, offset=True)
    return banded_attention(q, ck, cv, vis, scale=scale, tiles=tiles, interpret=interpret_mode(),
                            offset=q_offset)


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
    """Causal selected attention of a sequence shard's queries, as the one-device forward's rows:
    runs of consecutive queries (a shard's chunks), each a whole number of selection blocks
    starting at a multiple of one, with their own keys k, v row for row."""
    b, n = q.shape[:2]
    sb = block_size
    if n % sb or k_all.shape[1] % sb:
        raise ValueError(f"a run of queries ({n} tokens) must be a whole number of selection blocks ({sb})")
    keys, values = jnp.concatenate([k, k_all], axis=1), jnp.concatenate([v, v_all], axis=1)  # [own | all]
    own_blocks = n // sb
    return run_kernels(q, keys, values, (indices + own_blocks).astype(jnp.int32), valid, gates, None,
                       block_size=sb, causal=True, scale=scale, settings=settings)

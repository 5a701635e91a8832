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

from kernels._common import interpret_mode
from kernels._flash import Visibility, banded_attention
from kernels.settings import Tiles
from nsa_jax import reference


def compressed_attention(
    q: jax.Array,  # [b, n, h, d], not rotated
    ck: jax.Array,  # [b, m + nc, kh, d]: m memory entries, then nc compressed blocks
    cv: jax.Array,  # [b, m + nc, kh, d]
    *,
    num_mem: int,
    stride: int,
    causal: bool,
    scale: float | None = None,
    tiles: Tiles = Tiles(),
) -> jax.Array:  # [b, n, h, d]
    """`nsa_jax.reference.compressed_attention` for the parallel forward (no `q_positions`)."""
    if causal and num_mem == 0:
        return reference.compressed_attention(q, ck, cv, num_mem=num_mem, stride=stride, causal=causal, scale=scale)
    d = q.shape[-1]
    scale = d**-0.5 if scale is None else scale
    vis = Visibility("compressed", causal=causal, num_keys=ck.shape[1], num_mem=num_mem, stride=stride)
    return banded_attention(q, ck, cv, vis, scale=scale, tiles=tiles, interpret=interpret_mode())

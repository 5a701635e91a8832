"""Compressed-branch attention as a Pallas flash kernel (forward, dq, dk/dv).

Queries attend to [num_mem memory entries, nc compressed blocks]; with `causal`,
compressed entry c is visible to query t iff (c + 1) * stride - 1 < t, memory always.
The g query heads of a kv head share a tile (rows = tokens x g heads), so each
compressed K/V tile is read once per group; a query tile only visits the key tiles its
last token can see. The logits are never written to HBM: the selection scores that the
fine branch needs come from `kernels.selection.select_blocks`, which computes block
logits per kv head directly (see there).

Falls back to `nsa_jax.reference.compressed_attention` for cached decoding
(`q_positions` given) and for causal attention without memory entries (num_mem == 0),
where the first queries see no key and the reference's softmax is uniform over all
masked entries.
"""

from __future__ import annotations

import jax

from kernels._common import interpret_mode
from kernels._flash import Tiles, Visibility, banded_attention
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
    q_positions: jax.Array | None = None,
    tiles: Tiles = Tiles(),
) -> jax.Array:  # [b, n, h, d]
    """Same contract as `nsa_jax.reference.compressed_attention`."""
    if q_positions is not None or (causal and num_mem == 0):
        return reference.compressed_attention(q, ck, cv, num_mem=num_mem, stride=stride,
                                              causal=causal, scale=scale, q_positions=q_positions)
    d = q.shape[-1]
    scale = d**-0.5 if scale is None else scale
    vis = Visibility("compressed", causal=causal, num_keys=ck.shape[1], num_mem=num_mem, stride=stride)
    return banded_attention(q, ck, cv, vis, scale=scale, tiles=tiles, interpret=interpret_mode())

"""Compressed-branch attention as a Pallas flash kernel (forward, dq, dk/dv).

Queries attend to [num_mem memory entries, nc compressed blocks]; with `causal`,
compressed entry c is visible to query t iff (c + 1) * stride - 1 < t, memory always.
The g query heads of a kv head share a tile (rows = tokens x g heads), so each
compressed K/V tile is read once per group; a query tile only visits the key tiles its
last token can see. The logits are never written to HBM: the selection scores that the
fine branch needs come from `kernels.selection.select_blocks`, which computes block
logits per kv head directly (see there).

With one memory entry (the package's default) and causal, key j (the memory, then the
compressed blocks) is visible to query t iff j * stride <= t: block-causal attention of the
n / stride query blocks over the first n / stride keys. `block_causal_attention` folds each
block's stride tokens into the heads and runs that as plain causal attention, on the GPU
through cuDNN's flash attention; `impl="auto"` takes it where it measured faster than the
Pallas kernel: from 1024 query blocks on at head dim 128, from 2048 below (H200, BENCHMARKS.md,
"Compressed branch through cuDNN").

Float32 on a Hopper GPU (causal, unpacked, head dim 32 or 64) goes to the Mosaic GPU kernels of
`kernels.mosaic_compressed` instead (TF32 tensor cores reading shared memory directly): with
`impl="mosaic"`, or `impl="auto"` from 128 compressed keys and 4096 query rows on, where they
measured faster (1.8x fwd+bwd at T=16384, H200).

Causal attention without memory entries (num_mem == 0; `SparseAttention` always has at
least one) goes to `nsa_jax.reference.compressed_attention`: there the first queries see
no key and the reference's softmax is uniform over all masked entries.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels._common import cdiv, cudnn_flash_usable, in_xla, interpret_mode, pad_axis
from kernels._flash import Visibility, banded_attention
from kernels.mosaic_compressed import compressed_attention_mosaic, mosaic_pays, mosaic_usable
from kernels.settings import COMPRESSED_IMPLS, MosaicTiles, Tiles
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
    impl: str = "auto",  # "auto" | "pallas" | "mosaic" | "cudnn" | "xla"
    tiles: Tiles = Tiles(),
    mosaic_tiles: MosaicTiles = MosaicTiles(),
) -> jax.Array:  # [b, n, h, d]
    """`nsa_jax.reference.compressed_attention` for the parallel forward (no `q_positions`).

    With segments each query sees the memory and its document's visible entries (slots
    first .. first + count - 1 of `nsa_jax.segments`' grid), as bounds per query.
    impl="xla": no kernel, the reference's masked attention over all entries ([b, h, n, m + nc]
    logits), its backward recomputing them (`jax.checkpoint`): for short sequences."""
    if impl not in COMPRESSED_IMPLS:
        raise ValueError(f"impl must be one of {', '.join(COMPRESSED_IMPLS)}, got {impl!r}")
    if impl == "xla":
        return in_xla(lambda q, ck, cv, segments: reference.compressed_attention(
            q, ck, cv, num_mem=num_mem, stride=stride, causal=causal, scale=scale, segments=segments),
            q, ck, cv, segments)
    if (causal or segments is not None) and num_mem == 0:
        return reference.compressed_attention(q, ck, cv, num_mem=num_mem, stride=stride, causal=causal, scale=scale,
                                              segments=segments)
    d = q.shape[-1]
    scale = d**-0.5 if scale is None else scale
    mosaic = mosaic_usable(q, ck, cv, num_mem=num_mem, causal=causal, packed=segments is not None)
    if impl == "mosaic" and not mosaic:
        raise ValueError("the Mosaic GPU compressed branch serves causal, unpacked float32 attention with memory "
                         "entries, head dim 32 or 64, TF32 matmuls, on a Hopper GPU; use impl='pallas' or 'auto'")
    if impl == "mosaic" or (impl == "auto" and mosaic and not interpret_mode() and mosaic_pays(q, ck, num_mem)):
        return compressed_attention_mosaic(q, ck, cv, num_mem=num_mem, stride=stride, scale=scale, tiles=mosaic_tiles)
    block_causal = segments is None and causal and num_mem == 1 and ck.shape[1] >= cdiv(q.shape[1], stride)
    if impl == "cudnn" and not block_causal:
        raise ValueError("the cuDNN compressed branch serves causal attention with one memory entry, unpacked, "
                         "and at least n / stride keys; use impl='pallas' or 'auto'")
    if impl == "cudnn" or (impl == "auto" and block_causal and _cudnn_usable(q, stride)):
        return block_causal_attention(q, ck, cv, stride=stride, scale=scale, implementation="cudnn")
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


def cudnn_min_query_blocks(dim_head: int) -> int:
    """From this many query blocks (n / stride) on, cuDNN clearly beat the Pallas kernel (H200,
    fwd+bwd, Pallas -> cuDNN: fla config 14.27 -> 12.07 ms at 1024 blocks, 4.54 -> 4.36 at 512,
    2.05 -> 2.07 at 256; paper 3.96 -> 3.17 at 1024, 1.43 -> 1.45 at 512; seed, head dim 64,
    0.57 -> 0.55 at 1024 (0.53 -> 0.66 with an earlier, transposing fold), 1.38 -> 1.07 at 2048).
    Below, each folded head has too few key tiles for cuDNN's kernels to gain."""
    return 1024 if dim_head >= 128 else 2048


def _cudnn_usable(q: jax.Array, stride: int) -> bool:
    """`cudnn_flash_usable`, and enough query blocks to beat the Pallas kernel."""
    return cudnn_flash_usable(q) and cdiv(q.shape[1], stride) >= cudnn_min_query_blocks(q.shape[-1])


def block_causal_attention(
    q: jax.Array,  # [b, n, h, d]
    ck: jax.Array,  # [b, >= nb, kh, d]: the memory entry, then the compressed blocks (nb = ceil(n / stride))
    cv: jax.Array,  # [b, >= nb, kh, d]
    *,
    stride: int,
    scale: float,
    implementation: str | None = "cudnn",  # of jax.nn.dot_product_attention ("xla" on CPU)
) -> jax.Array:  # [b, n, h, d]
    """The causal compressed branch with one memory entry as plain causal attention: query t
    sees key j iff j * stride <= t, so the stride tokens of query block i = t // stride all see
    keys 0..i. Each block's tokens become heads, [b, nb, stride * h, d], a reshape that moves
    nothing; the keys and values are repeated per token, [b, nb, stride * kh, d] (n / stride
    keys: small), so that grouped-query attention maps folded head (token r, head j) to key
    head (r, j // g). Keys past nb are visible to no query. Lengths are padded to even ones
    (cuDNN's backward), invisible to real queries."""
    b, n, h, d = q.shape
    kh = ck.shape[2]
    nb = cdiv(n, stride)
    nbp = nb + nb % 2
    folded = pad_axis(q, 1, nbp * stride).reshape(b, nbp, stride * h, d)
    ck, cv = (jnp.broadcast_to(pad_axis(x[:, :nb], 1, nbp)[:, :, None], (b, nbp, stride, kh, d))
              .reshape(b, nbp, stride * kh, d).astype(q.dtype) for x in (ck, cv))
    out = jax.nn.dot_product_attention(folded, ck, cv, scale=scale, is_causal=True, implementation=implementation)
    return out.reshape(b, nbp * stride, h, d)[:, :n]


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

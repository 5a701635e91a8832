"""NSA as one function for any JAX model, with fla's `parallel_nsa` semantics.

    from nsa_jax.ops import native_sparse_attention
    o = native_sparse_attention(q, k, v, g_cmp=g_cmp, g_slc=g_slc, block_size=64, block_count=16)

Users with their own model code (Flax Linen or NNX, Equinox, MaxText-style layers) bring
their projections, rotary embedding and gates; this function is the attention core. It runs
the Pallas kernels on GPU and the pure-JAX reference elsewhere, and is differentiable in every
array input. `examples/` shows it inside a Flax NNX and a Flax Linen layer.
"""

from __future__ import annotations

import operator
from typing import Callable

import jax
import jax.numpy as jnp

import kernels
from nsa_jax import fla_reference as fla
from nsa_jax import reference
from nsa_jax import segments as seg
from nsa_jax.numerics import cdiv

__all__ = ["NSAInputError", "mean_pool", "native_sparse_attention"]

mean_pool = fla.mean_pool


class NSAInputError(ValueError):
    """A bad argument to `native_sparse_attention` (the message names it and the fix)."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise NSAInputError(message)


def _check_inputs(q, k, v, gates: dict, block_size, block_count, window_size, compress, segment_ids, backend):
    _check(q.ndim == 4 and k.ndim == 4 and v.ndim == 4,
           f"q, k, v must be [batch, seq_len, heads, head_dim]; got q{list(q.shape)} k{list(k.shape)} v{list(v.shape)}")
    b, n, h, d = q.shape
    _check(k.shape == v.shape, f"k and v must have the same shape; got k{list(k.shape)} v{list(v.shape)}")
    _check(k.shape[:2] == (b, n) and k.shape[3] == d,
           f"k must be [batch, seq_len, kv_heads, head_dim] = [{b}, {n}, kv_heads, {d}] like q; got {list(k.shape)} "
           "(queries and keys of the same tokens: no cached decoding here)")
    kh = k.shape[2]
    _check(kh > 0 and h % kh == 0, f"query heads ({h}) must be a multiple of kv heads ({kh})")
    for name, gate in gates.items():
        _check(gate is not None and tuple(jnp.shape(gate)) == (b, n, h),
               f"{name} must be [batch, seq_len, heads] = [{b}, {n}, {h}]; got "
               f"{None if gate is None else list(jnp.shape(gate))}")
    _check(block_size > 0, f"block_size must be a positive int; got {block_size!r}")
    _check(block_count > 0, f"block_count must be a positive int; got {block_count!r}")
    _check(window_size >= 0, f"window_size must be an int >= 0; got {window_size!r}")
    _check(compress == "mean" or callable(compress),
           f"compress must be 'mean' or a function of blocks [b, nc, block_size, kv_heads, d]; got {compress!r}")
    if segment_ids is not None:
        ids = jnp.asarray(segment_ids)
        _check(ids.shape == (b, n), f"segment_ids must be [batch, seq_len] = [{b}, {n}]; got {list(ids.shape)}")
        _check(jnp.issubdtype(ids.dtype, jnp.integer), f"segment_ids must be integers; got {ids.dtype}")
    _check(backend in (None, *kernels.BACKENDS),
           f"backend must be None, {' or '.join(repr(x) for x in kernels.BACKENDS)}; got {backend!r}")


def native_sparse_attention(
    q: jax.Array,  # [b, n, h, d]
    k: jax.Array,  # [b, n, kh, d]
    v: jax.Array,  # [b, n, kh, d]
    *,
    g_cmp: jax.Array,  # [b, n, h]
    g_slc: jax.Array,  # [b, n, h]
    g_swa: jax.Array | None = None,  # [b, n, h], with window_size > 0
    block_size: int = 64,
    block_count: int = 16,
    window_size: int = 0,
    compress: str | Callable[[jax.Array], jax.Array] = "mean",
    causal: bool = True,
    segment_ids: jax.Array | None = None,  # [b, n] int
    block_indices: jax.Array | None = None,  # [b, n, kv_heads, s] int
    scale: float | None = None,
    backend: str | None = None,
    kernel_settings: kernels.KernelSettings | None = None,
) -> jax.Array:  # [b, n, h, d]
    """Native Sparse Attention of q over k, v: o = g_cmp * o_cmp + g_slc * o_slc + g_swa * o_swa.

    Shapes: q [b, n, h, d]; k, v [b, n, kv_heads, d] (h a multiple of kv_heads; query head
    i uses kv head i // (h // kv_heads)); gates [b, n, h]; output [b, n, h, d] in q's dtype.
    Any float dtype; float32 and bfloat16 are tested. No projection, rotary embedding or gate
    activation happens here: pass q, k, v and the gates as your model computes them.

    Branches, for the query at position t (fla-core 0.6.0's `parallel_nsa`, documented in
    `nsa_jax.fla_reference`):
      o_cmp: attention over the compressed keys/values, one per complete block of `block_size`
          tokens (`compress`), block c visible iff (c + 1) * block_size <= t + 1; 0 before the
          first complete block.
      o_slc: attention over the tokens <= t of the `block_count` blocks with the highest
          importance (the compressed attention's probability summed over the kv group's query
          heads); the first block, the previous one and the query's own are always taken, and
          the query heads of a kv group share the blocks.
      o_swa: attention over the last `window_size` tokens (t - window_size < s <= t); off when 0
          (g_swa is then ignored).

    Arguments:
      compress: "mean" (mean-pooling, fla's) or a function blocks [b, nc, block_size, kv_heads, d]
          -> [b, nc, kv_heads, d], applied to keys and to values (close over your parameters:
          it is differentiated through).
      causal: False lets every query see every complete compressed block and all blocks of
          its document as candidates (the same forced three), with no causal mask in the
          selected blocks and a window of window_size - 1 tokens on both sides. fla has no
          non-causal mode; on the Pallas backend it needs seq_len a multiple of block_size
          and no segment_ids.
      segment_ids: packed documents as runs of equal ids (fla's cu_seqlens): each token gets
          what its document alone would give it, positions restarting at 0 (for your rotary
          embedding: `nsa_jax.segments.from_ids(segment_ids).positions`).
      block_indices: the blocks to attend instead of selecting them (fla's argument): distinct
          block indices within each query's document, -1 for none; blocks after the query's
          own are ignored (causal). The own block is always attended, up to the query; fla
          attends it only when listed (its own selection always lists it).
      scale: logit scale, default head_dim ** -0.5 (fla's default).
      backend: "pallas" (kernels, Triton on GPU; interpreted on CPU, for tests), "reference"
          (pure JAX, dense masks: short sequences), None: "pallas" on GPU, else "reference".
          Inside `jax.shard_map` the kernels need `check_vma=False` (JAX 0.11.2's pallas_call
          does not type varying mesh axes); a clear error says so otherwise.
      kernel_settings: `kernels.KernelSettings` tile sizes (speed only).

    Differences from fla's `parallel_nsa(q, k, v, g_cmp, g_slc, g_swa, block_indices,
    block_counts, block_size, window_size, scale, cu_seqlens)`, argument by argument:
      q, k, v: the same layout; fla also allows a value head dim != the key's (not here) and
          fewer queries than keys (decoding; not here). fla needs h // kv_heads to be a power
          of two >= 16; here any multiple works.
      g_cmp, g_slc: required here; fla skips the compressed branch when g_cmp is None (then
          block_indices must be given) and leaves o_slc ungated when g_slc is None.
      g_swa: required when window_size > 0 and ignored otherwise, as in fla.
      block_indices: the same, but the own block is attended even when not listed.
      block_counts -> block_count: an int here. fla rounds an int up to a power of two and
          selects that many blocks (12 selects 16); here exactly block_count (equal for powers
          of two). fla's per-query count tensor is not supported.
      block_size, window_size, scale: the same. The window runs fla's flash_attn call
          `window_size=(window_size - 1, 0)`.
      cu_seqlens -> segment_ids [b, n]; fla needs batch 1 with cu_seqlens, any batch works here.
      compress, causal, backend, kernel_settings: additions.
    Numerics: the logits are float32 products of the inputs (fla first rounds q * scale to the
    input dtype), so in bfloat16 a block whose importance ties another's within rounding may
    be picked by one and not the other; tests/test_ops_fla_parity.py measures how often.
    """
    try:  # static sizes: Python or numpy integers
        block_size, block_count, window_size = (operator.index(x) for x in (block_size, block_count, window_size))
    except TypeError:
        raise NSAInputError(f"block_size, block_count and window_size must be integers; got "
                            f"{block_size!r}, {block_count!r}, {window_size!r}") from None
    gates = {"g_cmp": g_cmp, "g_slc": g_slc}
    if window_size > 0:
        gates["g_swa"] = g_swa
    _check_inputs(q, k, v, gates, block_size, block_count, window_size, compress, segment_ids, backend)
    b, n, h, d = q.shape
    if block_indices is not None:
        shape, dtype = tuple(jnp.shape(block_indices)), jnp.asarray(block_indices).dtype
        _check(len(shape) == 4 and shape[:3] == (b, n, k.shape[2]) and jnp.issubdtype(dtype, jnp.integer),
               f"block_indices must be integers [batch, seq_len, kv_heads, count] = [{b}, {n}, {k.shape[2]}, count]; "
               f"got {dtype}{list(shape)}")
    scale = float(d**-0.5 if scale is None else scale)
    name = kernels.default_backend_name() if backend is None else backend
    if name == "pallas":
        varying = set().union(*(jax.typeof(x).manual_axis_type.varying for x in (q, k, v)))
        _check(not varying, f"inside jax.shard_map (axes {sorted(varying)}) the Pallas kernels need "
               "check_vma=False (JAX's pallas_call has no varying-axes types): pass it to jax.shard_map, "
               "or backend='reference'")
    settings = kernels.KernelSettings() if kernel_settings is None else kernel_settings
    core = kernels.get_backend(name, settings)

    packed = segment_ids is not None
    if not causal and name == "pallas":
        _check(not packed and n % block_size == 0,
               f"causal=False on the Pallas backend needs seq_len ({n}) a multiple of block_size ({block_size}) "
               "and no segment_ids; pad the sequence, or pass backend='reference'")
    segments = seg.from_ids(jnp.asarray(segment_ids)) if packed else fla.single_document(b, n)
    # Branch calls get segments for packed documents, and for non-causal reference calls (its
    # per-document path ignores the zero padding of a trailing partial block).
    branch_segments = segments if packed or (not causal and name == "reference") else None
    kw = {} if branch_segments is None else {"segments": branch_segments}

    pool = fla.mean_pool if compress == "mean" else compress
    ck = fla.compress(k, block_size, pool, branch_segments)  # [b, n // block_size, kh, d]
    cv = fla.compress(v, block_size, pool, branch_segments)

    if name == "pallas":
        from kernels.compressed_attention import entry_attention
        from kernels.fla_selection import select_blocks

        o_cmp = kernels.batch_parallel(entry_attention)(q, ck, cv, segments, block_size=block_size, causal=causal,
                                                        scale=scale, tiles=settings.flash)
        select = kernels.batch_parallel(select_blocks)
    else:
        first, count = fla.entry_bounds(segments.start, segments.positions, segments.lengths, block_size, causal)
        o_cmp = fla.compressed_attention(q, ck, cv, first, count, scale=scale)
        select = fla.select_blocks
    if block_indices is None:
        indices = select(q, ck, segments, block_size=block_size, block_count=block_count, causal=causal,
                         scale=scale)  # [b, n, kh, k]
    else:
        indices = jnp.asarray(block_indices).astype(jnp.int32)
    blocks_in_doc = cdiv(segments.lengths, block_size)[:, :, None, None]
    valid = (indices >= 0) & (indices < blocks_in_doc)
    if causal:  # the own block is the selected branch's own rule (tokens <= t); later blocks are not seen
        own = (segments.positions // block_size)[:, :, None, None]
        valid = valid & (indices < own)
    indices = jnp.where(valid, indices, reference.NO_PICK if branch_segments is not None else 0)
    o_slc = core.selected_attention(q, k, v, indices, valid, None, block_size=block_size, causal=causal,
                                    scale=scale, **kw)
    out = o_cmp.astype(jnp.float32) * g_cmp[..., None] + o_slc.astype(jnp.float32) * g_slc[..., None]
    if window_size > 0:
        o_swa = core.sliding_window_attention(q, k, v, window=window_size - 1, causal=causal, scale=scale,
                                              mask_padding=True, **kw)
        out = out + o_swa.astype(jnp.float32) * g_swa[..., None]
    return out.astype(q.dtype)

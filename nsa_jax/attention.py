"""SparseAttention (NSA) and the dense baseline Attention, as Flax NNX modules.

The modules own the parameters (projections, compress networks, memory kv, gates) and
nothing else: the attention math runs in the backend that `kernels.get_backend` returns
(the pure-JAX reference, or Pallas kernels), with the signatures of `nsa_jax.reference`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

import kernels
from kernels import shard_attention
from kernels.selection import select_blocks as select_blocks_kernel
from nsa_jax import context, reference
from nsa_jax.cache import (
    DenseCache,
    SparseCache,
    dense_attention_one,
    dense_cache_from_prompt,
    push_tail,
    selected_attention_one,
    sliding_window_one,
    sparse_cache_from_prompt,
    write_at,
)
from nsa_jax.compress_networks import CompressMLP, GroupedMLP, build_compress_network
from nsa_jax.layers import Linear, RMSNorm
from nsa_jax.rotary import apply_rotary
from nsa_jax.segments import Segments, same_document
from nsa_jax.segments import from_ids as segments_from_ids


# Initial bias of the branch gates, per head: sigmoid(-2) = 0.12 for the compressed and fine
# branches, sigmoid(2) = 0.88 for the sliding window (the PyTorch package's init: training
# starts close to local attention and learns to open the sparse branches).
STRATEGY_GATE_BIAS = (-2.0, -2.0, 2.0)  # compressed, fine, sliding

# The branches, in the order of their gates.
BRANCHES = ("compressed", "selected", "sliding")


def parse_branches(branches) -> tuple[str, ...]:
    """Branch names (a sequence, or one comma-separated string) -> a tuple in gate order, after
    checking them (one-line errors)."""
    names = [n.strip() for n in branches.split(",") if n.strip()] if isinstance(branches, str) else list(branches)
    allowed = "'compressed', 'selected', 'sliding'"
    _check(len(names) > 0, f"branches must name at least one of {allowed}, got none")
    for name in names:
        _check(name in BRANCHES, f"unknown branch {name!r} in branches: use {allowed}")
        _check(names.count(name) == 1, f"branch {name!r} is named twice in branches: name each branch once")
    return tuple(b for b in BRANCHES if b in names)


def _segments(segment_ids: jax.Array, shape: tuple[int, int]) -> Segments:
    """segment_ids [b, n] -> Segments, after checking the shape and dtype (one-line errors)."""
    ids = jnp.asarray(segment_ids)
    _check(ids.shape == tuple(shape), f"segment_ids must have shape [batch, seq_len] = {list(shape)}, got {list(ids.shape)}")
    _check(jnp.issubdtype(ids.dtype, jnp.integer), f"segment_ids must be integers, got {ids.dtype}")
    return segments_from_ids(ids)


def _packed(segments: Segments | None) -> dict:
    """Keyword arguments of a backend call: segments only when given (kernels without them stay
    called as before)."""
    return {} if segments is None else {"segments": segments}


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


class SparseAttention(nnx.Module):
    """Native Sparse Attention: compressed, selected and sliding-window branches, gated.

    Arguments, names and defaults are those of `native_sparse_attention_pytorch.SparseAttention`
    (0.2.3); `compress_block_sliding_stride` defaults to `compress_block_size`. Additions:
      interpolated_importance_score: token-level linear interpolation of the compressed
          scores before averaging per selection block (the seed's option); lets the
          selection block be any size, not only a multiple of the stride.
      use_pallas_nsa: True for the Pallas kernels, False for the pure-JAX reference,
          None (default) for kernels on GPU and the reference elsewhere.
          `use_triton_kernel=True` (the PyTorch name) means the same as True.
      mask_sliding_window_padding: mask the zero padding that the package's non-causal
          sliding window lets queries near the end see (off: reproduce the package).
      kernel_settings: `kernels.KernelSettings` for the Pallas backend (tile sizes, kernel
          families); speed only, never the result. None: the measured defaults.
      branches: the branches that run, a subset of ("compressed", "selected", "sliding") (all by
          default), for ablation studies of what each branch contributes: a branch that is off
          gets gate 0 (the others' gates unchanged) and its work is skipped.
    """

    def __init__(
        self,
        dim: int,
        dim_head: int,
        heads: int,
        sliding_window_size: int,
        compress_block_size: int,
        compress_block_sliding_stride: int | None = None,
        selection_block_size: int | None = None,
        num_selected_blocks: int | None = None,
        kv_heads: int | None = None,
        num_compressed_mem_kv: int = 1,
        causal: bool = False,
        norm: bool = True,
        use_diff_topk: bool = False,
        use_triton_kernel: bool = False,
        query_heads_share_selected_kv: bool = True,
        compress_mlp: nnx.Module | str | None = None,
        compress_mlp_expand_factor: float = 1.0,
        strategy_combine_mlp: nnx.Module | None = None,
        *,
        interpolated_importance_score: bool = False,
        use_pallas_nsa: bool | None = None,
        mask_sliding_window_padding: bool = False,
        kernel_settings: kernels.KernelSettings | None = None,
        branches: tuple[str, ...] | str = BRANCHES,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        kv_heads = heads if kv_heads is None else kv_heads
        stride = compress_block_size if compress_block_sliding_stride is None else compress_block_sliding_stride
        _check(selection_block_size is not None, "selection_block_size is required")
        _check(num_selected_blocks is not None, "num_selected_blocks is required")
        _check(heads > 0 and kv_heads > 0 and heads % kv_heads == 0,
               f"heads ({heads}) must be a positive multiple of kv_heads ({kv_heads})")
        _check(dim_head > 0 and dim_head % 2 == 0, f"dim_head ({dim_head}) must be even (rotary embedding)")
        _check(compress_block_size > 0, f"compress_block_size ({compress_block_size}) must be > 0")
        _check(0 < stride <= compress_block_size,
               f"compress_block_sliding_stride ({stride}) must be in 1..compress_block_size ({compress_block_size})")
        _check(selection_block_size > 0, f"selection_block_size ({selection_block_size}) must be > 0")
        _check(interpolated_importance_score or selection_block_size % stride == 0,
               f"selection_block_size ({selection_block_size}) must be a multiple of the compress stride "
               f"({stride}), or set interpolated_importance_score=True")
        _check(num_selected_blocks >= 0, f"num_selected_blocks ({num_selected_blocks}) must be >= 0")
        _check(sliding_window_size >= 0, f"sliding_window_size ({sliding_window_size}) must be >= 0")
        _check(num_compressed_mem_kv > 0, f"num_compressed_mem_kv ({num_compressed_mem_kv}) must be > 0")
        self.branches = parse_branches(branches)

        self.dim, self.dim_head, self.heads, self.kv_heads = dim, dim_head, heads, kv_heads
        self.num_grouped_queries = heads // kv_heads
        self.scale = dim_head**-0.5
        self.causal = causal
        self.sliding_window_size = sliding_window_size
        self.compress_block_size = compress_block_size
        self.compress_block_sliding_stride = stride
        self.selection_block_size = selection_block_size
        self.num_selected_blocks = num_selected_blocks
        self.num_mem_compress_kv = num_compressed_mem_kv
        self.use_diff_topk = use_diff_topk
        self.query_heads_share_selected_kv = query_heads_share_selected_kv
        self.interpolated_importance_score = interpolated_importance_score
        self.mask_sliding_window_padding = mask_sliding_window_padding
        self.use_pallas_nsa = True if use_triton_kernel and use_pallas_nsa is None else use_pallas_nsa
        self.kernel_settings = kernels.KernelSettings() if kernel_settings is None else kernel_settings
        # This module's place in a Transformer's layers (set there): the train step's kernels read
        # its compress networks' weights in place in the stacked parameters (`GroupedMLP.pair`).
        self.layer_index: int | None = None

        self.norm = nnx.data(RMSNorm(dim, param_dtype=param_dtype) if norm else None)
        self.to_qkv = Linear(dim, (heads + 2 * kv_heads) * dim_head, use_bias=False,
                             param_dtype=param_dtype, rngs=rngs)

        zeros = lambda *shape: nnx.Param(jnp.zeros(shape, param_dtype))
        self.compress_mem_kv = zeros(2, kv_heads, num_compressed_mem_kv, dim_head)
        self.k_intrablock_positions = zeros(kv_heads, compress_block_size, dim_head)
        self.v_intrablock_positions = zeros(kv_heads, compress_block_size, dim_head)

        if compress_mlp is None:
            compress_mlp = CompressMLP(dim_head, compress_block_size, compress_mlp_expand_factor, rngs=rngs)
        elif isinstance(compress_mlp, str):
            compress_mlp = build_compress_network(
                compress_mlp, dim_head=dim_head, compress_block_size=compress_block_size,
                kv_heads=kv_heads, expand_factor=compress_mlp_expand_factor, rngs=rngs)
        self.k_compress = nnx.clone(compress_mlp, arrays=True)  # own buffers: donation-safe
        self.v_compress = nnx.clone(compress_mlp, arrays=True)

        if strategy_combine_mlp is None:
            bias = jnp.tile(jnp.array(STRATEGY_GATE_BIAS, param_dtype), heads)
            strategy_combine_mlp = Linear(
                dim, 3 * heads, kernel_init=lambda key, shape, dtype=param_dtype: jnp.zeros(shape, dtype),
                bias_init=lambda key, shape, dtype=param_dtype: bias, param_dtype=param_dtype, rngs=rngs)
        self.to_strategy_combine = strategy_combine_mlp
        self.combine_heads = Linear(heads * dim_head, dim, use_bias=False, param_dtype=param_dtype, rngs=rngs)

    # -- pieces shared by the parallel forward and (later) cached decoding ---------------

    @property
    def backend(self) -> kernels.AttentionBackend:
        """The attention core this module runs (`kernels.get_backend` caches it)."""
        return kernels.get_backend(kernels.backend_name(self.use_pallas_nsa), self.kernel_settings)

    def project(self, inp: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """inp [b, n, dim] -> (normed inp, q [b, n, h, d], k [b, n, kh, d], v [b, n, kh, d])."""
        x = self.norm(inp) if self.norm is not None else inp
        b, n, _ = x.shape
        h, kh, d = self.heads, self.kv_heads, self.dim_head
        split = self.kernel_settings.split_qkv_from_rows
        if split and b * n >= split:  # long inputs: one product per output, q, k, v contiguous (no slice copies)
            w = self.to_qkv.kernel[...].astype(x.dtype)
            bounds = ((0, h * d), (h * d, (h + kh) * d), ((h + kh) * d, (h + 2 * kh) * d))
            q, k, v = (x @ w[:, lo:hi] for lo, hi in bounds)
        else:
            q, k, v = jnp.split(self.to_qkv(x), [h * d, (h + kh) * d], axis=-1)
        return x, q.reshape(b, n, h, d), k.reshape(b, n, kh, d), v.reshape(b, n, kh, d)

    def compress(self, k: jax.Array, v: jax.Array, segments: Segments | None = None) -> tuple[jax.Array, jax.Array]:
        """Un-rotated k, v [b, n, kh, d] -> compressed ck, cv [b, n // stride, kh, d] (no memory);
        with segments, each document's entries in its own slots (`nsa_jax.segments`)."""
        cb, cs = self.compress_block_size, self.compress_block_sliding_stride
        b, n, kh, d = k.shape
        if n // cs == 0:
            empty = jnp.zeros((b, 0, kh, d), k.dtype)
            return empty, empty
        return self.compress_windows(reference.compression_windows(k, cb, cs, segments),
                                     reference.compression_windows(v, cb, cs, segments))

    def compress_windows(self, kw: jax.Array, vw: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Windows [b, kh, w, cb, d] (+ intra-block positions) -> ck, cv [b, w, kh, d] (no memory)."""
        kw = kw + self.k_intrablock_positions[...].astype(kw.dtype)[:, None]
        vw = vw + self.v_intrablock_positions[...].astype(vw.dtype)[:, None]
        if isinstance(self.k_compress, GroupedMLP) and isinstance(self.v_compress, GroupedMLP):
            settings = self.kernel_settings
            impl = settings.compress_impl if kernels.backend_name(self.use_pallas_nsa) == "pallas" else "xla"
            both = GroupedMLP.pair(self.k_compress, self.v_compress, kw, vw, settings.compress_split_k,
                                   layer=self.layer_index, impl=impl, tiles=settings.compress_tiles)
            ck, cv = jnp.split(both.transpose(0, 2, 1, 3), 2, axis=2)
            return ck, cv
        ck = self.k_compress(kw).transpose(0, 2, 1, 3)  # [b, kh, w, d] -> [b, w, kh, d]
        cv = self.v_compress(vw).transpose(0, 2, 1, 3)
        return ck, cv

    def with_memory(self, ck: jax.Array, cv: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Prepend the learned memory entries: [b, nc, kh, d] -> [b, m + nc, kh, d]."""
        b = ck.shape[0]
        mem = jnp.broadcast_to(self.compress_mem_kv[...].astype(ck.dtype).transpose(0, 2, 1, 3)[:, None],
                               (2, b, self.num_mem_compress_kv, self.kv_heads, self.dim_head))
        return jnp.concatenate([mem[0], ck], axis=1), jnp.concatenate([mem[1], cv], axis=1)

    def combine(self, x: jax.Array, compressed: jax.Array | None, fine: jax.Array | None,
                sliding: jax.Array | None) -> jax.Array:
        """Gate the three branches [b, n, h, d] per head with sigmoid(Linear(x)); merge heads.

        A branch that is off (`branches`) has gate 0: it is left out of the sum, whatever is
        passed for it (None where it was not computed); the other gates stay as they are."""
        b, n = x.shape[:2]
        gates = jax.nn.sigmoid(self.to_strategy_combine(x)).reshape(b, n, self.heads, 3, 1)
        if self.branches == BRANCHES:
            out = gates[..., 0, :] * compressed + gates[..., 1, :] * fine + gates[..., 2, :] * sliding
        else:
            outputs = dict(zip(BRANCHES, (compressed, fine, sliding)))
            terms = [gates[..., i, :] * outputs[name] for i, name in enumerate(BRANCHES) if name in self.branches]
            out = terms[0]
            for term in terms[1:]:
                out = out + term
        return self.combine_heads(out.reshape(b, n, self.heads * self.dim_head))

    def has(self, branch: str) -> bool:
        """Whether `branch` ("compressed", "selected" or "sliding") is on."""
        return branch in self.branches

    def select(self, q: jax.Array, ck: jax.Array, q_positions=None, segments=None,
               q_offset=None) -> tuple[jax.Array, jax.Array]:
        """Top-k selection blocks from the compressed keys (with memory): (probabilities, indices).
        q_offset: the kernels' form of consecutive q_positions (a sequence shard's, from q_offset)."""
        if q_offset is not None:
            return select_blocks_kernel(
                q, ck, q_offset=q_offset, num_mem=self.num_mem_compress_kv, stride=self.compress_block_sliding_stride,
                causal=self.causal, share_heads=self.query_heads_share_selected_kv,
                num_selected=self.num_selected_blocks, selection_block_size=self.selection_block_size,
                interpolated=self.interpolated_importance_score, scale=self.scale,
                settings=self.kernel_settings.selection)
        return self.backend.select_blocks(
            q, ck, num_mem=self.num_mem_compress_kv, stride=self.compress_block_sliding_stride,
            causal=self.causal, share_heads=self.query_heads_share_selected_kv,
            num_selected=self.num_selected_blocks, selection_block_size=self.selection_block_size,
            interpolated=self.interpolated_importance_score, scale=self.scale, q_positions=q_positions,
            **_packed(segments))

    def fine(self, q_rot, k_rot, v, values, indices, q_positions=None, segments=None) -> jax.Array:
        """Selected-block attention (rotated q, k) with validity mask and diff-top-k gates."""
        gates = reference.straight_through_gates(values) if self.use_diff_topk else None
        return self.backend.selected_attention(
            q_rot, k_rot, v, indices, reference.valid_selection(values), gates,
            block_size=self.selection_block_size, causal=self.causal, scale=self.scale, q_positions=q_positions,
            **_packed(segments))

    def sliding(self, q_rot, k_rot, v, q_positions=None, segments=None) -> jax.Array:
        return self.backend.sliding_window_attention(
            q_rot, k_rot, v, window=self.sliding_window_size, causal=self.causal, scale=self.scale,
            q_positions=q_positions, mask_padding=self.mask_sliding_window_padding, **_packed(segments))

    # -- parallel forward ------------------------------------------------------------------

    def __call__(self, inp: jax.Array, *, segment_ids: jax.Array | None = None,
                 context_axis: str | None = None) -> jax.Array:
        """inp [b, n, dim] -> [b, n, dim]. segment_ids [b, n] (int): packed documents, runs of
        equal ids; every token then gets what its document alone would give it (positions
        restarting at 0, `nsa_jax.segments`). context_axis: inside `jax.shard_map`, inp is one
        shard of the sequence over this mesh axis (the zig-zag split of `nsa_jax.context`)."""
        if context_axis is not None:
            _check(segment_ids is None, "context parallelism does not take packed documents (segment_ids) yet")
            return self._context_forward(inp, context_axis)
        # Each phase in its own named scope: the compiled step's kernels carry it in their op_name
        # (bench/profile_step.py counts kernels per scope).
        # A branch that is off (`branches`) is skipped: None for its output, which `combine`
        # leaves out. Selection reads the compressed keys, so compression runs for either.
        segments = None if segment_ids is None else _segments(segment_ids, inp.shape[:2])
        compressed = fine = sliding = None
        with jax.named_scope("project"):
            x, q, k, v = self.project(inp)
        if self.has("compressed") or self.has("selected"):
            with jax.named_scope("compress"):
                ck, cv = self.with_memory(*self.compress(k, v, segments))
        if self.has("compressed"):
            with jax.named_scope("compressed_attention"):
                compressed = self.backend.compressed_attention(
                    q, ck, cv, num_mem=self.num_mem_compress_kv, stride=self.compress_block_sliding_stride,
                    causal=self.causal, scale=self.scale, **_packed(segments))
        if self.has("selected"):
            with jax.named_scope("selection"):
                values, indices = self.select(q, ck, segments=segments)
        if self.has("selected") or self.has("sliding"):
            with jax.named_scope("rotary"):
                positions = jnp.arange(inp.shape[1]) if segments is None else segments.positions
                q_rot, k_rot = apply_rotary(q, positions), apply_rotary(k, positions)
        if self.has("selected"):
            with jax.named_scope("selected_attention"):
                fine = self.fine(q_rot, k_rot, v, values, indices, segments=segments)
        if self.has("sliding"):
            with jax.named_scope("sliding_window"):
                sliding = self.sliding(q_rot, k_rot, v, segments=segments)
        with jax.named_scope("combine"):
            return self.combine(x, compressed, fine, sliding)

    def _context_forward(self, inp: jax.Array, axis: str) -> jax.Array:
        """The parallel forward of one sequence shard inp [b, n / c, dim] (shard i of c over mesh
        axis `axis`, inside `jax.shard_map`; the zig-zag split of `nsa_jax.context`): its queries
        at their global positions against the whole sequence's keys and values, all-gathered.
        Every branch reads the gathered keys as the one-device forward reads its own, so the
        outputs are that forward's rows of this shard."""
        positions = context.positions(inp.shape[1], axis)
        x, q, k, v = self.project(inp)
        # The kernels serve every branch of a causal shard: chunk by chunk (each a run of
        # consecutive positions), selected attention for both chunks at once (when a chunk is a
        # whole number of selection blocks); the reference backend runs the reference for queries
        # at positions.
        kernels_here = self.backend.name == "pallas" and self.causal
        tiles = self.kernel_settings.flash
        offsets = (positions[0], positions[inp.shape[1] // 2])  # each chunk's first position
        compressed = fine = sliding = None
        if self.has("compressed") or self.has("selected"):
            ck, cv = self.with_memory(*self._compress_shard(k, v, axis))
            if kernels_here and self.has("compressed"):
                compressed = jnp.concatenate([shard_attention.compressed_attention_shard(
                    q_, ck, cv, off, num_mem=self.num_mem_compress_kv, stride=self.compress_block_sliding_stride,
                    scale=self.scale, tiles=tiles) for q_, off in zip(context.halves(q), offsets)], axis=1)
            elif self.has("compressed"):
                compressed = self.backend.compressed_attention(
                    q, ck, cv, num_mem=self.num_mem_compress_kv, stride=self.compress_block_sliding_stride,
                    causal=self.causal, scale=self.scale, q_positions=positions)
            if self.has("selected") and kernels_here:
                picks = [self.select(q_, ck, q_offset=off) for q_, off in zip(context.halves(q), offsets)]
                values, indices = (jnp.concatenate(p, axis=1) for p in zip(*picks))
            elif self.has("selected"):
                values, indices = self.select(q, ck, positions)
        if self.has("selected") or self.has("sliding"):
            q_rot, k_rot = apply_rotary(q, positions), apply_rotary(k, positions)
        if self.has("selected") or (self.has("sliding") and not kernels_here):  # the whole sequence's, once
            k_all, v_all = context.gather(k_rot, axis), context.gather(v, axis)
        if self.has("selected") and kernels_here and (inp.shape[1] // 2) % self.selection_block_size == 0:
            gates = reference.straight_through_gates(values) if self.use_diff_topk else None
            # One call for both chunks: each row's own block is among the shard's own keys at its
            # index, whichever chunk it is in (the whole sequence's keys are walked once, not twice).
            fine = shard_attention.selected_attention_shard(
                q_rot, k_rot, v, k_all, v_all, indices, reference.valid_selection(values), gates,
                block_size=self.selection_block_size, scale=self.scale,
                settings=self.kernel_settings.selected)
        elif self.has("selected"):
            fine = self.fine(q_rot, k_all, v_all, values, indices, positions)
        if self.has("sliding"):
            if kernels_here:
                w = self.sliding_window_size
                halos_k, halos_v = context.halos(k_rot, w, axis), context.halos(v, w, axis)
                starts = (jax.lax.axis_index(axis) > 0, True)  # only shard 0's early chunk starts the sequence
                sliding = jnp.concatenate([
                    shard_attention.sliding_window_shard(q_, k_, v_, hk, hv, has, window=w, scale=self.scale,
                                                         tiles=tiles)
                    for q_, k_, v_, hk, hv, has in zip(context.halves(q_rot), context.halves(k_rot),
                                                       context.halves(v), halos_k, halos_v, starts)], axis=1)
            else:
                sliding = self.sliding(q_rot, k_all, v_all, positions)
        return self.combine(x, compressed, fine, sliding)

    def _compress_shard(self, k: jax.Array, v: jax.Array, axis: str) -> tuple[jax.Array, jax.Array]:
        """The whole sequence's compressed keys and values (no memory), each shard compressing its
        chunks' windows, then all-gathered; when a chunk is not a whole number of windows (or
        shorter than their overlap), compressed from the all-gathered keys and values."""
        cb, cs = self.compress_block_size, self.compress_block_sliding_stride
        m = k.shape[1] // 2
        if m % cs or cb - cs > m:
            return self.compress(context.gather(k, axis), context.gather(v, axis))
        windows = lambda x: context.compression_windows(x, cb, cs, axis)  # noqa: E731
        ck, cv = self.compress_windows(windows(k), windows(v))
        return context.gather(ck, axis), context.gather(cv, axis)

    # -- cached generation (caches: nsa_jax.cache; the loop: nsa_jax.sampling) ---------------
    # The branches take queries at `q_positions` against fixed-length caches; every backend
    # serves such calls with the reference core.

    def _compressed_at(self, q: jax.Array, cache: SparseCache, positions: jax.Array):
        """Compressed branch and selection for queries at `positions` (memory always visible);
        None for what a branch that is off would need. (The caches keep the compressed
        entries whatever the branches, so that their layout never changes.)"""
        ck, cv = self.with_memory(cache.ck, cache.cv)
        compressed = values = indices = None
        if self.has("compressed"):
            compressed = self.backend.compressed_attention(
                q, ck, cv, num_mem=self.num_mem_compress_kv, stride=self.compress_block_sliding_stride,
                causal=True, scale=self.scale, q_positions=positions)
        if self.has("selected"):
            values, indices = self.select(q, ck, positions)
        return compressed, values, indices

    def prefill(self, inp: jax.Array, max_len: int) -> tuple[jax.Array, SparseCache]:
        """Parallel forward over a prompt [b, P, dim] -> (out [b, P, dim], cache of length max_len).

        The branches read the max_len caches, so every output equals the parallel forward's
        over max_len tokens (of which the prompt is the start) at that position; this matters
        only for interpolated importance scores, whose edge clamp depends on the length.
        """
        _check(self.causal, "cached decoding needs a causal SparseAttention (causal=True)")
        x, q, k, v = self.project(inp)
        positions = jnp.arange(inp.shape[1])
        q_rot, k_rot = apply_rotary(q, positions), apply_rotary(k, positions)
        cache = sparse_cache_from_prompt(
            k_rot, v, k, *self.compress(k, v), max_len=max_len, stride=self.compress_block_sliding_stride,
            compress_block_size=self.compress_block_size, selection_block_size=self.selection_block_size)
        compressed, values, indices = self._compressed_at(q, cache, positions)
        fine = self.fine(q_rot, cache.k, cache.v, values, indices, positions) if self.has("selected") else None
        sliding = self.sliding(q_rot, cache.k, cache.v, positions) if self.has("sliding") else None
        return self.combine(x, compressed, fine, sliding), cache

    def compress_tail(self, cache: SparseCache) -> SparseCache:
        """Compress the tail (positions length - cb .. length - 1) into entry length // stride - 1.

        Valid when length % stride == 0: the tail then is exactly that entry's window."""
        window = lambda tail: tail.transpose(0, 2, 1, 3)[:, :, None]  # [b, cb, kh, d] -> [b, kh, 1, cb, d]
        new_k, new_v = self.compress_windows(window(cache.tail_k), window(cache.tail_v))  # [b, 1, kh, d]
        entry = cache.length // self.compress_block_sliding_stride - 1
        return cache._replace(ck=write_at(cache.ck, new_k, entry), cv=write_at(cache.cv, new_v, entry))

    def window_complete(self, cache: SparseCache) -> jax.Array:
        """bool []: the last token completed a compression window (compress_tail is due)."""
        return (cache.length % self.compress_block_sliding_stride == 0) & (cache.ck.shape[1] > 0)

    def decode(self, inp: jax.Array, cache: SparseCache, *, compress: bool = True) -> tuple[jax.Array, SparseCache]:
        """One token [b, 1, dim] at position t = cache.length -> (out [b, 1, dim], cache after t).

        Writes k/v at t and shifts the un-rotated token into the tail; when that completes a
        window ((t + 1) % stride == 0) compresses it into entry (t + 1) // stride - 1, which
        the compressed mask hides from t and shows from t + 1, as in the parallel forward.
        compress=False leaves that to the caller (`compress_tail` when `window_complete`), so
        that a model compresses all its layers under one `lax.cond` per step.
        The caller keeps t < max_len.
        """
        t = cache.length
        positions = t[None]  # [1]
        x, q, k, v = self.project(inp)
        q_rot, k_rot = apply_rotary(q, positions), apply_rotary(k, positions)
        cache = SparseCache(write_at(cache.k, k_rot, t), write_at(cache.v, v, t), cache.ck, cache.cv,
                            push_tail(cache.tail_k, k), push_tail(cache.tail_v, v), t + 1)  # tail: t + 1 - cb .. t

        compressed, values, indices = self._compressed_at(q, cache, positions)
        fine = sliding = None
        if self.has("selected"):
            gates = reference.straight_through_gates(values) if self.use_diff_topk else None
            fine = selected_attention_one(q_rot, cache.k, cache.v, indices, reference.valid_selection(values),
                                          gates, t, block_size=self.selection_block_size, scale=self.scale)
        if self.has("sliding"):
            sliding = sliding_window_one(q_rot, cache.k, cache.v, t, window=self.sliding_window_size,
                                         scale=self.scale)
        if compress and cache.ck.shape[1] > 0:
            cache = jax.lax.cond(self.window_complete(cache), self.compress_tail, lambda c: c, cache)
        return self.combine(x, compressed, fine, sliding), cache


class Attention(nnx.Module):
    """The dense baseline: RMSNorm, bias-free q/k/v/out projections, rotary, GQA, softmax attention.

    As in the PyTorch package, query head i reads kv head i % kv_heads. implementation: as
    `jax.nn.dot_product_attention`'s (None: XLA, which writes the [n, n] logits; "cudnn": cuDNN's
    flash attention, memory linear in n, bf16 or f16 on an NVIDIA GPU), for inputs without
    packed documents (those take XLA's masked path).
    """

    def __init__(self, dim: int, dim_head: int = 64, heads: int = 8, causal: bool = True,
                 kv_heads: int | None = None, *, implementation: str | None = None, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        _check(implementation in (None, "xla", "cudnn"),
               f"implementation must be None, 'xla' or 'cudnn', got {implementation!r}")
        kv_heads = heads if kv_heads is None else kv_heads
        _check(heads > 0 and kv_heads > 0 and heads % kv_heads == 0,
               f"heads ({heads}) must be a positive multiple of kv_heads ({kv_heads})")
        _check(dim_head % 2 == 0, f"dim_head ({dim_head}) must be even (rotary embedding)")
        self.heads, self.kv_heads, self.dim_head, self.causal = heads, kv_heads, dim_head, causal
        self.implementation = implementation
        self.norm = RMSNorm(dim, param_dtype=param_dtype)
        linear = lambda i, o: Linear(i, o, use_bias=False, param_dtype=param_dtype, rngs=rngs)
        self.to_q = linear(dim, heads * dim_head)
        self.to_k = linear(dim, kv_heads * dim_head)
        self.to_v = linear(dim, kv_heads * dim_head)
        self.to_out = linear(heads * dim_head, dim)

    def project(self, inp: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """inp [b, n, dim] at positions [n] -> rotated q [b, n, h, d], rotated k and v [b, n, kh, d]."""
        x = self.norm(inp)
        b, n, _ = x.shape
        h, kh, d = self.heads, self.kv_heads, self.dim_head
        q = apply_rotary(self.to_q(x).reshape(b, n, h, d), positions)
        k = apply_rotary(self.to_k(x).reshape(b, n, kh, d), positions)
        v = self.to_v(x).reshape(b, n, kh, d)
        return q, k, v

    def __call__(self, inp: jax.Array, *, segment_ids: jax.Array | None = None,
                 context_axis: str | None = None) -> jax.Array:
        """inp [b, n, dim] -> [b, n, dim]; segment_ids [b, n]: packed documents (runs of equal
        ids), each attending only within itself, positions restarting at 0. context_axis: inp is
        one shard of the sequence over this mesh axis (inside `jax.shard_map`, `nsa_jax.context`):
        its queries attend the all-gathered keys and values."""
        if context_axis is not None:
            _check(segment_ids is None, "context parallelism does not take packed documents (segment_ids) yet")
            positions = context.positions(inp.shape[1], context_axis)
            q, k, v = self.project(inp, positions)
            k, v = context.gather(k, context_axis), context.gather(v, context_axis)
            mask = None
            if self.causal:
                mask = (positions[:, None] >= jnp.arange(k.shape[1])[None, :])[None, None]
            return self._attend(q, k, v, mask=mask, causal=False)
        if segment_ids is None:
            return self._attend(*self.project(inp, jnp.arange(inp.shape[1])))
        segments = _segments(segment_ids, inp.shape[:2])
        return self._attend(*self.project(inp, segments.positions), mask=same_document(segments)[:, None])

    def _attend(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None,
                causal: bool | None = None) -> jax.Array:
        """q [b, n, h, d], k and v [b, nk, kh, d] -> [b, n, dim]; `causal` (default: the module's)
        is the lower-left triangle, for queries at the keys' positions."""
        causal = self.causal if causal is None else causal
        b, n, h, d = q.shape
        kh = self.kv_heads
        g = h // kh
        # head i = j * kh + c reads kv head c; JAX groups query heads as c * g + j.
        q = q.reshape(b, n, g, kh, d).transpose(0, 1, 3, 2, 4).reshape(b, n, h, d)
        impl = self.implementation if mask is None else None
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation=impl)
        out = out.reshape(b, n, kh, g, d).transpose(0, 1, 3, 2, 4).reshape(b, n, h * d)
        return self.to_out(out)

    def prefill(self, inp: jax.Array, max_len: int) -> tuple[jax.Array, DenseCache]:
        """The parallel forward over a prompt [b, P, dim] -> (out [b, P, dim], cache of length max_len)."""
        _check(self.causal, "cached decoding needs a causal Attention (causal=True)")
        q, k, v = self.project(inp, jnp.arange(inp.shape[1]))
        return self._attend(q, k, v), dense_cache_from_prompt(k, v, max_len=max_len)

    def decode(self, inp: jax.Array, cache: DenseCache) -> tuple[jax.Array, DenseCache]:
        """One token [b, 1, dim] at position cache.length -> (out [b, 1, dim], updated cache)."""
        t = cache.length
        q, k, v = self.project(inp, t[None])
        cache = DenseCache(write_at(cache.k, k, t), write_at(cache.v, v, t), t + 1)
        out = dense_attention_one(q, cache.k, cache.v, t)
        return self.to_out(out.reshape(*inp.shape[:2], self.heads * self.dim_head)), cache

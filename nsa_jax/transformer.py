"""Transformer language model with NSA or dense attention (the PyTorch package's `Transformer`)."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from nsa_jax import sampling
from nsa_jax.attention import Attention, SparseAttention
from nsa_jax.layers import Embedding, FeedForward, Linear, RMSNorm

DEFAULT_SPARSE_ATTN_KWARGS = dict(
    sliding_window_size=32,
    compress_block_size=4,
    selection_block_size=4,
    num_selected_blocks=4,
)


REMAT_MODES = ("none", "block")


@nnx.remat
def _call_block(block: "Block", x: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
    """A block whose activations are recomputed in the backward pass (only x is kept)."""
    return block(x, segment_ids=segment_ids)


@functools.partial(nnx.remat, static_argnums=(2,))
def _call_block_context(block: "Block", x: jax.Array, context_axis: str) -> jax.Array:
    """`_call_block` for a sequence shard (context parallelism)."""
    return block(x, context_axis=context_axis)


class Block(nnx.Module):
    """attention + residual, then feedforward + residual (both pre-norm).

    `prefill` and `decode` are the same block over the attention's cached paths (generation).
    """

    def __init__(self, attn: nnx.Module, ff: FeedForward):
        self.attn = attn
        self.ff = ff

    def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None,
                 context_axis: str | None = None) -> jax.Array:  # [b, n, dim]
        with jax.named_scope("attention"):
            if context_axis is not None:
                attn = self.attn(x, context_axis=context_axis)
            else:
                attn = self.attn(x) if segment_ids is None else self.attn(x, segment_ids=segment_ids)
        with jax.named_scope("feedforward"):
            return self._feedforward(attn + x)

    def prefill(self, x: jax.Array, max_len: int) -> tuple[jax.Array, Any]:
        """x [b, P, dim] -> (out [b, P, dim], the attention's cache of length max_len)."""
        out, cache = self.attn.prefill(x, max_len)
        return self._feedforward(out + x), cache

    def decode(self, x: jax.Array, cache: Any, **kwargs) -> tuple[jax.Array, Any]:
        """One token x [b, 1, dim] through the attention's cache -> (out [b, 1, dim], cache)."""
        out, cache = self.attn.decode(x, cache, **kwargs)
        return self._feedforward(out + x), cache

    def _feedforward(self, x: jax.Array) -> jax.Array:
        return self.ff(x) + x


def counted_targets(segment_ids: jax.Array | None, loss_mask: jax.Array | None) -> jax.Array | None:
    """The targets ids[:, 1:] that the loss counts (bool [b, n - 1]), or None for all of them:
    not the first token of a packed document (its segment id differs from its input's), and
    among loss_mask's tokens when given."""
    counted = None
    if segment_ids is not None:
        counted = segment_ids[:, 1:] == segment_ids[:, :-1]
    if loss_mask is not None:
        wanted = loss_mask[:, 1:].astype(bool)
        counted = wanted if counted is None else counted & wanted
    return counted


class Transformer(nnx.Module):
    """Token embedding -> depth x (attention, feedforward) -> RMSNorm -> logits.

    Arguments as in `native_sparse_attention_pytorch.transformer.Transformer`. The flex and
    Triton switches of the PyTorch class (`use_flex_sliding_window`, `use_flex_fine_selection`,
    `use_triton_fine_selection`) are accepted for porting; they choose implementations, not
    math. `use_triton_fine_selection=True` selects the Pallas kernels, as `use_pallas_nsa=True`.
    `dtype` is the activation dtype (e.g. jnp.bfloat16); parameters stay in `param_dtype`.
    `kernel_settings` (a `kernels.KernelSettings`) goes to every SparseAttention.
    `remat`: "none" keeps every layer's activations for the backward pass; "block" keeps only
    each block's input and recomputes the block in the backward (`nnx.remat`): memory per layer
    falls to one [b, n, dim] array, for about one more forward pass of compute (README, "Long
    context"). Neither changes the result.
    """

    def __init__(
        self,
        num_tokens: int,
        dim: int,
        depth: int,
        dim_head: int = 64,
        heads: int = 8,
        kv_heads: int | None = None,
        ff_expansion_factor: float = 4.0,
        use_sparse_attn: bool = False,
        causal: bool = True,
        use_flex_sliding_window: bool = False,
        use_flex_fine_selection: bool = False,
        use_triton_fine_selection: bool = False,
        sparse_attn_kwargs: dict[str, Any] | None = None,
        *,
        use_pallas_nsa: bool | None = None,
        kernel_settings=None,
        remat: str = "none",
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        sparse_attn_kwargs = dict(DEFAULT_SPARSE_ATTN_KWARGS if sparse_attn_kwargs is None else sparse_attn_kwargs)
        if use_pallas_nsa is None and use_triton_fine_selection:
            use_pallas_nsa = True
        sparse_attn_kwargs.setdefault("use_pallas_nsa", use_pallas_nsa)
        sparse_attn_kwargs.setdefault("kernel_settings", kernel_settings)

        if remat not in REMAT_MODES:
            raise ValueError(f"remat must be one of {', '.join(REMAT_MODES)}, got {remat!r}")
        self.remat = remat
        self.num_tokens = num_tokens
        self.causal = causal
        self.use_sparse_attn = use_sparse_attn
        self.dtype = dtype
        self.token_emb = Embedding(num_tokens, dim, param_dtype=param_dtype, rngs=rngs)

        def attention():
            if use_sparse_attn:
                return SparseAttention(dim=dim, dim_head=dim_head, heads=heads, kv_heads=kv_heads, causal=causal,
                                       param_dtype=param_dtype, rngs=rngs, **sparse_attn_kwargs)
            return Attention(dim=dim, dim_head=dim_head, heads=heads, causal=causal, kv_heads=kv_heads,
                             param_dtype=param_dtype, rngs=rngs)

        self.layers = nnx.List([
            Block(attention(), FeedForward(dim, ff_expansion_factor, param_dtype=param_dtype, rngs=rngs))
            for _ in range(depth)
        ])
        for i, layer in enumerate(self.layers):
            if isinstance(layer.attn, SparseAttention):
                layer.attn.layer_index = i
        self.norm = RMSNorm(dim, param_dtype=param_dtype)
        self.to_logits = Linear(dim, num_tokens, use_bias=False, param_dtype=param_dtype, rngs=rngs)

    def hidden(self, ids: jax.Array, segment_ids: jax.Array | None = None, *,
               context_axis: str | None = None) -> jax.Array:
        """ids [b, n] -> [b, n, dim], before the final norm. context_axis: ids is one shard of
        each sequence over this mesh axis, inside `jax.shard_map` (`nsa_jax.context`)."""
        with jax.named_scope("embedding"):
            x = self.token_emb(ids, dtype=self.dtype)
        for layer in self.layers:
            if context_axis is not None:
                x = _call_block_context(layer, x, context_axis) if self.remat == "block" else layer(
                    x, context_axis=context_axis)
            else:
                x = _call_block(layer, x, segment_ids) if self.remat == "block" else layer(x, segment_ids=segment_ids)
        return x

    def selections(self, ids: jax.Array) -> list[tuple[jax.Array, jax.Array] | None]:
        """ids [b, n] -> per layer, the blocks each query selected: (probabilities, indices), both
        [b, n, selection heads, num_selected] (`SparseAttention.select`; `reference.valid_selection`
        of the probabilities marks the valid picks), or None for a layer without the selected
        branch. One forward pass, for analysis (which blocks selection reads, and from where)."""
        x = self.token_emb(ids, dtype=self.dtype)
        picks = []
        for layer in self.layers:
            attn = layer.attn
            if isinstance(attn, SparseAttention) and attn.has("selected"):
                _, q, k, v = attn.project(x)
                picks.append(attn.select(q, attn.with_memory(*attn.compress(k, v))[0]))
            else:
                picks.append(None)
            x = layer(x)
        return picks

    def token_losses(self, ids: jax.Array, labels: jax.Array, segment_ids: jax.Array | None = None, *,
                     context_axis: str | None = None) -> jax.Array:
        """ids, labels [b, n] -> next-token cross entropies [b, n] (float32) of ids predicting
        labels (the targets, already shifted). With context_axis, both are one sequence shard."""
        x = self.hidden(ids, segment_ids, context_axis=context_axis)
        with jax.named_scope("logits"):
            logits = self.to_logits(self.norm(x))
            return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)

    def __call__(self, ids: jax.Array, return_loss: bool = False, *, segment_ids: jax.Array | None = None,
                 loss_mask: jax.Array | None = None) -> jax.Array:
        """ids [b, n] -> logits [b, n, num_tokens]; or, with return_loss, the mean next-token
        cross entropy of ids[:, :-1] predicting ids[:, 1:] (a float32 scalar).

        segment_ids (int, the shape of ids): packed documents, runs of equal ids; each token's
        logits are those of its document alone (positions restart at 0 per document). With
        return_loss, a target whose segment id differs from its input's (the first token of
        the next document) does not count; the loss is the mean over the targets that do.
        loss_mask (bool, the shape of ids; with return_loss): the tokens that count as targets
        (e.g. only a task's answer bytes); ids[:, 0] is never a target."""
        for name, extra in (("segment_ids", segment_ids), ("loss_mask", loss_mask)):
            if extra is not None and jnp.shape(extra) != ids.shape:
                raise ValueError(f"{name} must have the shape of ids {list(ids.shape)}, got {list(jnp.shape(extra))}")
        if not return_loss:
            x = self.hidden(ids, segment_ids)
            with jax.named_scope("logits"):
                return self.to_logits(self.norm(x))
        counted = counted_targets(segment_ids, loss_mask)
        losses = self.token_losses(ids[:, :-1], ids[:, 1:], None if segment_ids is None else segment_ids[:, :-1])
        if counted is None:
            return losses.mean()
        return jnp.sum(jnp.where(counted, losses, 0.0)) / jnp.maximum(jnp.sum(counted), 1)

    def sample(
        self,
        prompt: jax.Array,
        seq_len: int,
        *,
        temperature: float = 1.0,
        filter_thres: float = 0.9,
        use_cache_kv: bool = True,
        rng: jax.Array | int | None = None,
    ) -> jax.Array:
        """Generate the seq_len - P tokens after prompt [b, P] (or [P]) as one compiled program.

        As the PyTorch package's `sample`: seq_len is the total length; top-k filter
        (ceil((1 - filter_thres) * vocab) logits) plus Gumbel sampling at `temperature`,
        greedy when temperature <= 0. With use_cache_kv, a prefill then a `lax` loop of cached
        decode steps; without, the parallel forward is rerun each step. `rng`: a `jax.random`
        key or int seed (default key 0). See nsa_jax/sampling.py.
        """
        return sampling.sample(self, prompt, seq_len, temperature=temperature, filter_thres=filter_thres,
                               use_cache_kv=use_cache_kv, rng=rng)

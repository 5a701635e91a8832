"""Load weights of `native-sparse-attention-pytorch` (0.2.3) modules into nsa-jax modules.

    import torch
    from nsa_jax.convert import transformer_from_torch
    model = transformer_from_torch(torch.load("model.pt"), num_tokens=256, dim=512, depth=6, ...)

`state_dict` maps the PyTorch parameter names to arrays (numpy arrays or torch tensors);
the keyword arguments are the PyTorch constructor's. A PyTorch `compress_mlp` module in the
arguments is not needed: the compress network is recognised from the state dict's keys.
Torch is not required by this module.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping

import numpy as np
import jax.numpy as jnp
from flax import nnx

from nsa_jax.attention import Attention, SparseAttention
from nsa_jax.compress_networks import AttentionPool, CompressMLP, ConvLinearCompress, GroupedMLP, SingleProjection
from nsa_jax.layers import FeedForward, Linear
from nsa_jax.transformer import DEFAULT_SPARSE_ATTN_KWARGS, Transformer

# (our variable, torch key, transform of the torch array into our layout)
Mapping_ = tuple[nnx.Variable, str, Callable[[np.ndarray], np.ndarray]]
_same = lambda x: x
_transpose = lambda x: x.T
_IGNORED_SUFFIXES = ("rotary_emb.freqs", "rotary_embed.freqs")  # fixed buffers, recomputed here


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor; bfloat16 has no numpy dtype
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        x = x.numpy()
    return np.asarray(x)


def _linear(layer: Linear, prefix: str) -> Iterator[Mapping_]:
    yield layer.kernel, f"{prefix}.weight", _transpose
    if layer.bias is not None:
        yield layer.bias, f"{prefix}.bias", _same


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _compress_network(net: nnx.Module, prefix: str) -> Iterator[Mapping_]:
    if isinstance(net, CompressMLP):
        yield from _linear(net.proj_in, _join(prefix, "1"))
        yield from _linear(net.proj_out, _join(prefix, "3"))
    elif isinstance(net, GroupedMLP):
        h = net.heads
        yield net.kernel_in, _join(prefix, "net.0.weight"), _same
        yield net.bias_in, _join(prefix, "net.0.bias"), lambda x: x.reshape(h, -1)
        yield net.kernel_out, _join(prefix, "net.2.weight"), _same
        yield net.bias_out, _join(prefix, "net.2.bias"), lambda x: x.reshape(h, -1)
    elif isinstance(net, ConvLinearCompress):
        h = net.heads
        # Conv1d weight [h * d_out, d_in, n] -> [h, n, d_in, d_out]
        yield net.kernel, _join(prefix, "conv.weight"), lambda x: x.reshape(h, -1, x.shape[1], x.shape[2]).transpose(0, 3, 2, 1)
        yield net.bias, _join(prefix, "conv.bias"), lambda x: x.reshape(h, -1)
    elif isinstance(net, AttentionPool):
        yield from _linear(net.to_attn_logits, _join(prefix, "to_attn_logits"))
    elif isinstance(net, SingleProjection):
        if net.proj is not None:
            yield from _linear(net.proj, _join(prefix, "compress.1"))
        else:
            yield net.kernel, _join(prefix, "compress.weight"), _same
    else:
        raise TypeError(f"cannot convert weights into a {type(net).__name__}")


def _sparse_attention(attn: SparseAttention, prefix: str) -> Iterator[Mapping_]:
    if attn.norm is not None:
        yield attn.norm.scale, f"{prefix}norm.weight", _same
    yield from _linear(attn.to_qkv, f"{prefix}to_qkv")
    yield attn.compress_mem_kv, f"{prefix}compress_mem_kv", _same
    yield attn.k_intrablock_positions, f"{prefix}k_intrablock_positions", _same
    yield attn.v_intrablock_positions, f"{prefix}v_intrablock_positions", _same
    yield from _compress_network(attn.k_compress, f"{prefix}k_compress")
    yield from _compress_network(attn.v_compress, f"{prefix}v_compress")
    if not isinstance(attn.to_strategy_combine, Linear):
        raise TypeError("only the default (Linear) strategy_combine_mlp can be converted")
    yield from _linear(attn.to_strategy_combine, f"{prefix}to_strategy_combine.0")
    yield from _linear(attn.combine_heads, f"{prefix}combine_heads")


def _dense_attention(attn: Attention, prefix: str) -> Iterator[Mapping_]:
    yield attn.norm.scale, f"{prefix}norm.weight", _same
    for name in ("to_q", "to_k", "to_v", "to_out"):
        yield from _linear(getattr(attn, name), f"{prefix}{name}")


def _feedforward(ff: FeedForward, prefix: str) -> Iterator[Mapping_]:
    yield ff.norm.scale, f"{prefix}0.weight", _same
    yield from _linear(ff.proj_in, f"{prefix}1")
    yield from _linear(ff.proj_out, f"{prefix}3")


def _transformer(model: Transformer) -> Iterator[Mapping_]:
    yield model.token_emb.embedding, "token_emb.weight", _same
    for i, layer in enumerate(model.layers):
        if isinstance(layer.attn, SparseAttention):
            yield from _sparse_attention(layer.attn, f"layers.{i}.0.")
        else:
            yield from _dense_attention(layer.attn, f"layers.{i}.0.")
        yield from _feedforward(layer.ff, f"layers.{i}.1.")
    yield model.norm.scale, "norm.weight", _same
    yield from _linear(model.to_logits, "to_logits")


def parameter_map(module: nnx.Module, prefix: str = "") -> Iterator[Mapping_]:
    """(our variable, PyTorch state_dict key, torch-to-ours layout transform) for every parameter.

    Also works on a module holding gradients (nnx.merge of a grad state), which is how the
    parity tests compare gradients with the PyTorch package's.
    """
    if isinstance(module, Transformer):
        return _transformer(module)
    if isinstance(module, SparseAttention):
        return _sparse_attention(module, prefix)
    return _compress_network(module, prefix.rstrip("."))


def _load(mappings: Iterator[Mapping_], state_dict: Mapping[str, Any], what: str) -> None:
    used = set()
    for variable, key, transform in mappings:
        if key not in state_dict:
            raise KeyError(f"{what}: state_dict has no {key!r}; do the constructor arguments match the checkpoint?")
        value = transform(_to_numpy(state_dict[key]))
        expected = variable[...].shape
        if value.shape != expected:
            raise ValueError(f"{what}: {key!r} has shape {tuple(value.shape)} but this configuration expects "
                             f"{tuple(expected)}; do the constructor arguments match the checkpoint?")
        variable[...] = jnp.asarray(value, dtype=variable[...].dtype)
        used.add(key)
    unused = sorted(k for k in state_dict if k not in used and not k.endswith(_IGNORED_SUFFIXES))
    if unused:
        raise ValueError(f"{what}: state_dict entries not used by this configuration: {', '.join(unused[:8])}"
                         + (" ..." if len(unused) > 8 else ""))


def _expand(hidden: int, flat: int) -> float:
    """An expand factor f with int(flat * f) == hidden despite rounding."""
    return (hidden + 0.5) / flat


def compress_network_from_state_dict(state_dict: Mapping[str, Any], prefix: str, *, dim_head: int,
                                     compress_block_size: int, rngs: nnx.Rngs) -> nnx.Module:
    """Recognise the compress network under `prefix` (e.g. 'k_compress') by its parameter names."""
    shape = lambda key: tuple(_to_numpy(state_dict[_join(prefix, key)]).shape)
    has = lambda key: _join(prefix, key) in state_dict
    flat = compress_block_size * dim_head
    if has("1.weight"):
        return CompressMLP(dim_head, compress_block_size, _expand(shape("1.weight")[0], flat), rngs=rngs)
    if has("net.0.weight"):
        heads, _, hidden = shape("net.0.weight")
        return GroupedMLP(dim_head, compress_block_size, heads, _expand(hidden, flat), rngs=rngs)
    if has("conv.weight"):
        return ConvLinearCompress(shape("conv.weight")[0] // dim_head, dim_head, compress_block_size, rngs=rngs)
    if has("to_attn_logits.weight"):
        return AttentionPool(dim_head, compress_block_size, rngs=rngs)
    if has("compress.1.weight"):
        return SingleProjection(dim_head, compress_block_size, rngs=rngs)
    if has("compress.weight"):
        return SingleProjection(dim_head, compress_block_size, shape("compress.weight")[0], rngs=rngs)
    raise ValueError(f"no known compress network under {prefix!r} in the state_dict")


def load_torch_state_dict(module: nnx.Module, state_dict: Mapping[str, Any]) -> nnx.Module:
    """Copy a PyTorch state_dict into `module` (a Transformer, SparseAttention or compress
    network built with matching arguments), checking names and shapes; returns the module."""
    _load(parameter_map(module), state_dict, type(module).__name__)
    return module


def _sparse_kwargs(kwargs: dict[str, Any], state_dict, prefix: str, dim_head: int, rngs) -> dict[str, Any]:
    kwargs = dict(kwargs)
    if not isinstance(kwargs.get("compress_mlp"), (nnx.Module, str)):
        kwargs["compress_mlp"] = compress_network_from_state_dict(
            state_dict, f"{prefix}k_compress", dim_head=dim_head,
            compress_block_size=kwargs["compress_block_size"], rngs=rngs)
    return kwargs


def sparse_attention_from_torch(state_dict: Mapping[str, Any], *, rngs: nnx.Rngs | None = None,
                                **kwargs) -> SparseAttention:
    """A SparseAttention built with the PyTorch constructor's `kwargs`, holding `state_dict`'s weights."""
    rngs = rngs or nnx.Rngs(0)
    kwargs = _sparse_kwargs(kwargs, state_dict, "", kwargs["dim_head"], rngs)
    return load_torch_state_dict(SparseAttention(**kwargs, rngs=rngs), state_dict)


def transformer_from_torch(state_dict: Mapping[str, Any], *, rngs: nnx.Rngs | None = None,
                           **kwargs) -> Transformer:
    """A Transformer built with the PyTorch constructor's `kwargs`, holding `state_dict`'s weights."""
    rngs = rngs or nnx.Rngs(0)
    kwargs = dict(kwargs)
    if kwargs.get("use_sparse_attn", False):
        kwargs["sparse_attn_kwargs"] = _sparse_kwargs(
            kwargs.get("sparse_attn_kwargs") or DEFAULT_SPARSE_ATTN_KWARGS, state_dict, "layers.0.0.", kwargs.get("dim_head", 64), rngs)
    return load_torch_state_dict(Transformer(**kwargs, rngs=rngs), state_dict)

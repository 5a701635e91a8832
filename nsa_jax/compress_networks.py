"""Compress networks: each maps key or value windows [b, kh, w, cb, d] to one vector [b, kh, w, d].

Same classes, argument names and initialisation as
`native_sparse_attention_pytorch.compress_networks`. Pass an instance as
`SparseAttention(..., compress_mlp=...)` (it is cloned for keys and for values), or
pass one of the names in `COMPRESS_NETWORKS` to have the module build it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from kernels import compress_matmul
from kernels.compress_matmul import GroupedMatmulTiles
from nsa_jax.layers import Linear, torch_uniform_init


def _window_size(compress_window_size: int | None, compress_block_size: int | None) -> int:
    # The seed's train.py spells the argument `compress_block_size`; the package, `compress_window_size`.
    size = compress_window_size if compress_window_size is not None else compress_block_size
    if size is None:
        raise TypeError("compress_window_size is required")
    return size


class CompressMLP(nnx.Module):
    """The default network: flatten the window -> Linear -> ReLU -> Linear, shared by all heads."""

    def __init__(self, dim_head: int, compress_window_size: int | None = None, expand_factor: float = 1.0,
                 *, compress_block_size: int | None = None, rngs: nnx.Rngs):
        window = _window_size(compress_window_size, compress_block_size)
        dim = window * dim_head
        hidden = int(expand_factor * dim)
        self.proj_in = Linear(dim, hidden, rngs=rngs)
        self.proj_out = Linear(hidden, dim_head, rngs=rngs)

    def __call__(self, kv: jax.Array) -> jax.Array:  # [b, h, w, n, d] -> [b, h, w, d]
        x = kv.reshape(*kv.shape[:3], kv.shape[3] * kv.shape[4])
        return self.proj_out(jax.nn.relu(self.proj_in(x)))


class GroupedMLP(nnx.Module):
    """CompressMLP with separate weights per kv head."""

    def __init__(self, dim_head: int, compress_window_size: int | None = None, heads: int | None = None,
                 expand_factor: float = 1.0, *, compress_block_size: int | None = None, rngs: nnx.Rngs):
        if heads is None:
            raise TypeError("GroupedMLP needs heads (the number of kv heads)")
        window = _window_size(compress_window_size, compress_block_size)
        dim = window * dim_head
        hidden = int(dim * expand_factor)
        self.heads = heads
        init_in, init_out = torch_uniform_init(dim), torch_uniform_init(hidden)
        self.kernel_in = nnx.Param(init_in(rngs.params(), (heads, dim, hidden)))
        self.bias_in = nnx.Param(init_in(rngs.params(), (heads, hidden)))
        self.kernel_out = nnx.Param(init_out(rngs.params(), (heads, hidden, dim_head)))
        self.bias_out = nnx.Param(init_out(rngs.params(), (heads, dim_head)))

    def __call__(self, kv: jax.Array) -> jax.Array:  # [b, h, w, n, d] -> [b, h, w, d]
        return _grouped_mlp(kv, self.kernel_in[...], self.bias_in[...], self.kernel_out[...], self.bias_out[...])

    @staticmethod
    def pair(first: "GroupedMLP", second: "GroupedMLP", kv1: jax.Array, kv2: jax.Array,
             split_k: int = 1, *, layer: int | None = None, impl: str = "xla",
             tiles: GroupedMatmulTiles = GroupedMatmulTiles()) -> jax.Array:
        """Both networks: kv1 [b, h1, w, n, d], kv2 [b, h2, w, n, d] -> [b, h1 + h2, w, d].

        As the train step hands them (`nsa_jax.stacking.JOINED`), `first` holds both networks'
        parameters, each one array [h1 + h2, ...], and `second` empty ones: both networks run as
        one. Otherwise the small output layers run as one and the large input layers apart, each
        reading its own weights in place (joined here, they would be copied together in every
        layer, forward and backward, and the copy kept for the backward: 32 MiB a layer in the
        seed model).
        `split_k` > 1 splits the input layers' contraction (window x head dim) into that many
        partial products summed after (`_input_layer`): a speed setting, the same sums reassociated.
        Joined, `second` holds the whole layer stacks of the joined parameters, and the input layer
        may run as kernels that read layer `layer` of them in place (`impl`: `KernelSettings.
        compress_impl`; `kernels.compress_matmul`).
        """
        if first.kernel_in[...].shape[0] == first.heads + second.heads:  # joined
            kv = jnp.concatenate([kv1, kv2], axis=1)
            kernel_in, bias_in = first.kernel_in[...], first.bias_in[...]
            stack = (second.kernel_in[...], second.bias_in[...])
            b, h, w = kv.shape[:3]
            if (split_k == 1 and layer is not None and stack[0].ndim == kernel_in.ndim + 1
                    and kernel_in.dtype == kv.dtype
                    and compress_matmul.use_kernels(impl, b * w, *kernel_in.shape[1:], kv.dtype, tiles)):
                x = kv.reshape(b, h, w, -1).transpose(1, 0, 2, 3).reshape(h, b * w, -1)  # [h, rows, n * d]
                hidden = compress_matmul.relu_linear(x, kernel_in, bias_in, stack, layer, tiles)  # after the ReLU
                out = jnp.einsum("hri,hio->hro", hidden, first.kernel_out[...]) + first.bias_out[...][:, None]
                return out.reshape(h, b, w, -1).transpose(1, 0, 2, 3)
            return _grouped_mlp(kv, kernel_in, bias_in, first.kernel_out[...], first.bias_out[...], split_k)
        hidden = jnp.concatenate([_input_layer(kv1, first.kernel_in[...], first.bias_in[...], split_k),
                                  _input_layer(kv2, second.kernel_in[...], second.bias_in[...], split_k)], axis=1)
        cat = lambda a, b: jnp.concatenate([a[...], b[...]], axis=0).astype(kv1.dtype)  # noqa: E731
        return _output_layer(hidden, cat(first.kernel_out, second.kernel_out), cat(first.bias_out, second.bias_out))


def _grouped_mlp(kv, kernel_in, bias_in, kernel_out, bias_out, split_k: int = 1):
    return _output_layer(_input_layer(kv, kernel_in, bias_in, split_k), kernel_out.astype(kv.dtype),
                         bias_out.astype(kv.dtype))


def _input_layer(kv, kernel, bias, split_k: int = 1):  # [b, h, w, n, d] -> [b, h, w, hidden], before the ReLU
    dt = kv.dtype
    x = kv.reshape(*kv.shape[:3], kv.shape[3] * kv.shape[4])
    if split_k == 1:
        return jnp.einsum("bhwi,hio->bhwo", x, kernel.astype(dt)) + bias.astype(dt)[:, None]
    if x.shape[-1] % split_k or kernel.shape[-1] % split_k:
        raise ValueError(f"compress_split_k={split_k} must divide the compress window's size x head dim "
                         f"({x.shape[-1]}) and the hidden size ({kernel.shape[-1]})")
    return _split_matmul(x, kernel.astype(dt), split_k) + bias.astype(dt)[:, None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _split_matmul(x: jax.Array, kernel: jax.Array, split_k: int) -> jax.Array:
    """x [b, h, w, i] @ kernel [h, i, o] per head, the contraction as split_k partial products (a
    batch axis of the matmul) summed after; its backward splits dx's contraction (o) the same way.
    With few windows (B=4, T=512: 128 rows per head against 1024 x 1024 weights) the one matmul
    is short and wide, and XLA tiles it into fewer blocks than the GPU has SMs."""
    xs = x.reshape(*x.shape[:3], split_k, x.shape[-1] // split_k)
    ks = kernel.reshape(kernel.shape[0], split_k, kernel.shape[1] // split_k, kernel.shape[2])
    return jnp.einsum("bhwsi,hsio->bhswo", xs, ks).sum(axis=2)


def _split_matmul_fwd(x, kernel, split_k):
    return _split_matmul(x, kernel, split_k), (x, kernel)


def _split_matmul_bwd(split_k, res, dy):  # dy [b, h, w, o]
    x, kernel = res
    dys = dy.reshape(*dy.shape[:3], split_k, dy.shape[-1] // split_k)
    ks = kernel.reshape(*kernel.shape[:2], split_k, kernel.shape[2] // split_k)
    dx = jnp.einsum("bhwso,hiso->bhswi", dys, ks).sum(axis=2)
    return dx, jnp.einsum("bhwi,bhwo->hio", x, dy)


_split_matmul.defvjp(_split_matmul_fwd, _split_matmul_bwd)


def _output_layer(hidden, kernel, bias):  # [b, h, w, hidden] -> [b, h, w, d]
    return jnp.einsum("bhwi,hio->bhwo", jax.nn.relu(hidden), kernel) + bias[:, None]


class ConvLinearCompress(nnx.Module):
    """Per-head linear map of each window (PyTorch: grouped Conv1d, kernel = stride = window)."""

    def __init__(self, heads: int, dim_head: int, compress_window_size: int | None = None,
                 *, compress_block_size: int | None = None, rngs: nnx.Rngs):
        window = _window_size(compress_window_size, compress_block_size)
        init = torch_uniform_init(dim_head * window)
        self.heads = heads
        self.kernel = nnx.Param(init(rngs.params(), (heads, window, dim_head, dim_head)))  # [h, n, d_in, d_out]
        self.bias = nnx.Param(init(rngs.params(), (heads, dim_head)))

    def __call__(self, kv: jax.Array) -> jax.Array:  # [b, h, w, n, d] -> [b, h, w, d]
        dt = kv.dtype
        out = jnp.einsum("bhwnd,hndo->bhwo", kv, self.kernel[...].astype(dt))
        return out + self.bias[...].astype(dt)[:, None]


class AttentionPool(nnx.Module):
    """Softmax-weighted sum over the window, weights per feature (Enformer's attention pool)."""

    def __init__(self, dim_head: int, compress_window_size: int | None = None,
                 *, compress_block_size: int | None = None, rngs: nnx.Rngs):
        self.to_attn_logits = Linear(dim_head, dim_head, use_bias=False,
                                     kernel_init=lambda key, shape, dtype=jnp.float32: jnp.eye(shape[0], dtype=dtype),
                                     rngs=rngs)

    def __call__(self, kv: jax.Array) -> jax.Array:  # [b, h, w, n, d] -> [b, h, w, d]
        logits = self.to_attn_logits(kv)
        attn = jax.nn.softmax(logits.astype(jnp.float32), axis=-2).astype(kv.dtype)
        return jnp.sum(kv * attn, axis=-2)


class SingleProjection(nnx.Module):
    """One bias-free projection of the flattened window (heads > 1: per-head [d, d], summed over the window)."""

    def __init__(self, dim_head: int, compress_window_size: int | None = None, heads: int = 1,
                 *, compress_block_size: int | None = None, rngs: nnx.Rngs):
        window = _window_size(compress_window_size, compress_block_size)
        self.heads = heads
        grouped = heads > 1
        self.kernel = nnx.data(
            nnx.Param(torch_uniform_init(dim_head)(rngs.params(), (heads, dim_head, dim_head))) if grouped else None)
        self.proj = nnx.data(None if grouped else Linear(window * dim_head, dim_head, use_bias=False, rngs=rngs))

    def __call__(self, kv: jax.Array) -> jax.Array:  # [b, h, w, n, d] -> [b, h, w, d]
        if self.proj is not None:
            return self.proj(kv.reshape(*kv.shape[:3], kv.shape[3] * kv.shape[4]))
        # As the package's EinMix 'b h w n i -> b h w o': the window axis is summed over.
        return jnp.einsum("bhwni,hio->bhwo", kv, self.kernel[...].astype(kv.dtype))


COMPRESS_NETWORKS = ("mlp", "grouped_mlp", "conv_linear", "attention_pool", "single_projection")


def build_compress_network(
    name: str,
    *,
    dim_head: int,
    compress_block_size: int,
    kv_heads: int,
    expand_factor: float = 1.0,
    rngs: nnx.Rngs,
) -> nnx.Module:
    """Build a compress network by name (used by configs and checkpoints, which store names)."""
    if name == "mlp":
        return CompressMLP(dim_head, compress_block_size, expand_factor, rngs=rngs)
    if name == "grouped_mlp":
        return GroupedMLP(dim_head, compress_block_size, kv_heads, expand_factor, rngs=rngs)
    if name == "conv_linear":
        return ConvLinearCompress(kv_heads, dim_head, compress_block_size, rngs=rngs)
    if name == "attention_pool":
        return AttentionPool(dim_head, compress_block_size, rngs=rngs)
    if name == "single_projection":
        return SingleProjection(dim_head, compress_block_size, rngs=rngs)
    raise ValueError(f"unknown compress network {name!r}; choose one of {', '.join(COMPRESS_NETWORKS)}")

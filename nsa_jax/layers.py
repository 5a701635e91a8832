"""Small NNX layers with PyTorch's conventions (init, RMSNorm epsilon, exact GELU).

Matching PyTorch's defaults keeps a model trained here comparable to one trained with the
PyTorch package, and makes checkpoint conversion a plain copy (plus a transpose).
Every layer computes in the dtype of its input: parameters are cast to it, so bfloat16
activations run bfloat16 matrix products against float32 master weights.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

Initializer = Callable[[jax.Array, tuple[int, ...], jnp.dtype], jax.Array]


def torch_uniform_init(fan_in: int) -> Initializer:
    """PyTorch's default Linear/Conv init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class Linear(nnx.Module):
    """y = x @ kernel (+ bias); kernel is [in, out] (PyTorch's weight transposed)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool = True,
        kernel_init: Initializer | None = None,
        bias_init: Initializer | None = None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.in_features = in_features
        self.out_features = out_features
        kernel_init = kernel_init or torch_uniform_init(in_features)
        self.kernel = nnx.Param(kernel_init(rngs.params(), (in_features, out_features), param_dtype))
        bias_init = bias_init or torch_uniform_init(in_features)
        self.bias = nnx.data(nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype)) if use_bias else None)

    def __call__(self, x: jax.Array) -> jax.Array:  # [..., in] -> [..., out]
        y = jnp.matmul(x, self.kernel[...].astype(x.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(x.dtype)
        return y


class RMSNorm(nnx.Module):
    """x / sqrt(mean(x^2) + eps) * scale, with PyTorch's default eps = finfo(x.dtype).eps."""

    def __init__(self, dim: int, *, eps: float | None = None, param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        self.dim = dim
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:  # [..., dim]
        eps = self.eps if self.eps is not None else float(jnp.finfo(x.dtype).eps)
        ms = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
        return x * jax.lax.rsqrt(ms + eps) * self.scale[...].astype(x.dtype)


class Embedding(nnx.Module):
    """Token embedding, N(0, 1) init as in torch.nn.Embedding."""

    def __init__(self, num_embeddings: int, features: int, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.num_embeddings = num_embeddings
        self.embedding = nnx.Param(jax.random.normal(rngs.params(), (num_embeddings, features), param_dtype))

    def __call__(self, ids: jax.Array, dtype=None) -> jax.Array:  # [b, n] -> [b, n, d]
        table = self.embedding[...]
        if dtype is not None:
            table = table.astype(dtype)
        return jnp.take(table, ids, axis=0)


class FeedForward(nnx.Module):
    """RMSNorm -> Linear(dim, dim * expansion) -> exact GELU -> Linear(-> dim)."""

    def __init__(self, dim: int, expansion_factor: float = 4.0, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        dim_hidden = int(dim * expansion_factor)
        self.norm = RMSNorm(dim, param_dtype=param_dtype)
        self.proj_in = Linear(dim, dim_hidden, param_dtype=param_dtype, rngs=rngs)
        self.proj_out = Linear(dim_hidden, dim, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:  # [b, n, dim]
        xn = self.norm(x)
        h = jnp.matmul(xn, self.proj_in.kernel[...].astype(xn.dtype))  # proj_in without its bias: added below
        bias = lambda linear: None if linear.bias is None else linear.bias[...].astype(h.dtype)  # noqa: E731
        return _gelu_linear(h, bias(self.proj_in), self.proj_out.kernel[...].astype(h.dtype), bias(self.proj_out))


@jax.custom_vjp
def _gelu_linear(h: jax.Array, bias_in: jax.Array | None, kernel: jax.Array, bias: jax.Array | None) -> jax.Array:
    # gelu(h + bias_in) @ kernel + bias, keeping only h (proj_in's matmul output) for the backward, as
    # a checkpoint would: autodiff would keep GELU's output and four intermediates of erf, each
    # [b, n, dim * 4] per layer, the model's largest activations at long context. Written by hand
    # because the checkpoint's backward took three passes more over that size per layer (it wrote
    # erf's term, then GELU's output and dh from it): here one fusion reads h and dg and writes GELU's
    # output (for kernel's gradient) and dh.
    return _gelu_linear_fwd(h, bias_in, kernel, bias)[0]


def _gelu_linear_fwd(h, bias_in, kernel, bias):
    y = jnp.matmul(gelu(h if bias_in is None else h + bias_in), kernel)
    return (y if bias is None else y + bias), (h, bias_in, kernel, bias)


def _gelu_linear_bwd(res, dy):  # dy [..., dim]
    h, bias_in, kernel, bias = res
    # The barrier keeps XLA from sharing GELU with the forward (common subexpressions: it would then
    # keep the forward's output alive instead of recomputing it), and bias's gradient (a column sum of
    # dy) out of the fusion that adds dy to the residual stream's gradient: fused there it took
    # 45 us per layer at B=4 T=512 (H200), several times its own kernel. h twice: GELU and its
    # derivative each compute erf, so that XLA fuses both into the kernel that reads dg rather than
    # writing erf's term out as an array of its own (compiled for an H200 offline).
    h, h_again, dy = lax.optimization_barrier((h, h, dy))
    a = h if bias_in is None else h + bias_in
    g = gelu(a)
    a = h_again if bias_in is None else h_again + bias_in
    cdf = _normal_cdf(a)  # GELU = a * cdf
    pdf = jnp.exp(-0.5 * jnp.square(a)) * (1 / np.sqrt(2 * np.pi)).astype(a.dtype)
    dh = jnp.matmul(dy, kernel.T) * (cdf + a * pdf)  # [..., dim * 4]; GELU' = cdf + a * pdf
    dkernel = jnp.einsum("...i,...o->io", g, dy)
    dbias = None if bias is None else dy.reshape(-1, dy.shape[-1]).sum(axis=0)
    dbias_in = None if bias_in is None else dh.reshape(-1, dh.shape[-1]).sum(axis=0)
    return dh, dbias_in, dkernel, dbias


_gelu_linear.defvjp(_gelu_linear_fwd, _gelu_linear_bwd)


def gelu(h: jax.Array) -> jax.Array:
    """Exact GELU (PyTorch's default), as PyTorch computes it: h * (1 + erf(h / sqrt(2))) / 2.

    Not `jax.nn.gelu(approximate=False)`, whose erfc evaluates two branches of rational
    approximations and an exp for every element: at T = 16384 its forward fusion took twice
    its memory traffic's time (H200). erf is one short rational approximation."""
    return h * _normal_cdf(h)


def _normal_cdf(x: jax.Array) -> jax.Array:
    """The standard normal's CDF, (1 + erf(x / sqrt(2))) / 2."""
    return 0.5 * (1 + lax.erf(x * np.sqrt(0.5).astype(x.dtype)))

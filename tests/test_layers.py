"""The layers' hand-written backward passes against autodiff of the plain expressions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nsa_jax import layers


def _plain_gelu_linear(h, bias_in, kernel, bias):
    y = jnp.matmul(layers.gelu(h if bias_in is None else h + bias_in), kernel)
    return y if bias is None else y + bias


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("biases", [True, False])
def test_gelu_linear_backward_matches_autodiff(dtype, tol, biases):
    keys = jax.random.split(jax.random.key(3), 5)
    h = jax.random.normal(keys[0], (2, 24, 64), dtype)  # [b, n, dim * 4]
    kernel = (jax.random.normal(keys[1], (64, 16)) / 8).astype(dtype)
    bias_in = jax.random.normal(keys[2], (64,), dtype) if biases else None
    bias = jax.random.normal(keys[3], (16,), dtype) if biases else None
    ct = jax.random.normal(keys[4], (2, 24, 16), dtype)
    got, got_vjp = jax.vjp(layers._gelu_linear, h, bias_in, kernel, bias)
    want, want_vjp = jax.vjp(_plain_gelu_linear, h, bias_in, kernel, bias)
    close = lambda a, b: np.testing.assert_allclose(  # noqa: E731
        np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol * float(jnp.abs(b).max()))
    close(got, want)
    for g, w in zip(got_vjp(ct), want_vjp(ct)):
        assert (g is None) == (w is None)
        if w is not None:
            assert g.dtype == w.dtype
            close(g, w)


def test_feedforward_gradients_match_autodiff():
    ff = layers.FeedForward(32, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 8, 32))

    def plain(module, x):
        h = module.proj_in(module.norm(x))
        return module.proj_out(layers.gelu(h))

    loss = lambda f: lambda m, x: (f(m, x) * jnp.arange(32.0)).sum()  # noqa: E731
    got = nnx.grad(loss(lambda m, x: m(x)), argnums=(0, 1))(ff, x)
    want = nnx.grad(loss(plain), argnums=(0, 1))(ff, x)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5 * float(jnp.abs(w).max()))

"""The compress networks' per-head products (`kernels.compress_matmul`) against plain einsums, and
the train step through them against the step through XLA's products."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_testing import check_vjp, randn
from kernels import KernelSettings
from kernels.compress_matmul import (GroupedMatmulTiles, MatmulTiles, batched_matmul, relu_linear,
                                     relu_linear_reference, use_kernels)

# Tiles small enough for test shapes, and more than one tile along every axis.
SMALL = GroupedMatmulTiles(fwd=MatmulTiles(block_m=16, block_n=16, block_k=32),
                           dx=MatmulTiles(block_m=16, block_n=32, block_k=16))


def _inputs(key, h=3, m=32, k=64, n=48, layers=3):
    kx, kw, kb, ks, kt = jax.random.split(key, 5)
    return (randn(kx, (h, m, k)), randn(kw, (h, k, n)) / 8, randn(kb, (h, n)),
            randn(ks, (layers, h, k, n)) / 8, randn(kt, (layers, h, n)))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("stacked", [False, True], ids=["weights", "layer-of-stack"])
def test_relu_linear_matches_reference(stacked, dtype):
    """Forward and the gradients of input, weights and bias; with a layer stack, the weights are
    its layer 1 and their gradient reaches them through the slice alone."""
    x, w, b, others, other_b = (a.astype(dtype) for a in _inputs(jax.random.key(0)))

    def kernel(x, w, b):
        if not stacked:
            return relu_linear(x, w, b, tiles=SMALL)
        stack = (others.at[1].set(w), other_b.at[1].set(b))
        return relu_linear(x, w, b, stack, 1, SMALL)

    check_vjp("compress_matmul", kernel, relu_linear_reference, (x, w, b), ("x", "w", "b"), dtype, jax.random.key(1))


def test_relu_linear_reads_the_layer_of_its_stack():
    """With a stack the kernels read its layer, not the stand-in weights (which only take the gradient)."""
    x, w, b, stack, stack_b = _inputs(jax.random.key(2))
    got = relu_linear(x, w, b, (stack, stack_b), 2, SMALL)
    np.testing.assert_allclose(np.asarray(got), np.asarray(relu_linear_reference(x, stack[2], stack_b[2])),
                               rtol=1e-5, atol=1e-5)
    dx = jax.grad(lambda x: relu_linear(x, w, b, (stack, stack_b), 2, SMALL).sum())(x)
    want = jax.grad(lambda x: relu_linear_reference(x, stack[2], stack_b[2]).sum())(x)
    np.testing.assert_allclose(np.asarray(dx), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_batched_matmul_transposed_operands():
    a, b = randn(jax.random.key(3), (2, 32, 64)), randn(jax.random.key(4), (2, 48, 64))
    got = batched_matmul(a, b, trans_b=True, tiles=MatmulTiles(16, 16, 32))
    np.testing.assert_allclose(np.asarray(got), np.asarray(jnp.einsum("hmk,hnk->hmn", a, b)), rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="not multiples of the tiles"):
        batched_matmul(a, b, trans_b=True, tiles=MatmulTiles(64, 16, 32))


def test_use_kernels_only_where_they_apply():
    assert use_kernels("pallas", 32, 64, 48, jnp.float32, SMALL)
    assert not use_kernels("xla", 32, 64, 48, jnp.float32, SMALL)
    assert not use_kernels("pallas", 24, 64, 48, jnp.float32, SMALL)  # rows the tiles do not divide
    assert not use_kernels("pallas", 32, 64, 48, jnp.bfloat16, SMALL)
    assert use_kernels("auto", 32, 64, 48, jnp.float32, SMALL) == (jax.default_backend() == "gpu")
    with pytest.raises(ValueError, match="compress_impl must be one of"):
        KernelSettings(compress_impl="cuda")


@pytest.mark.slow
def test_train_step_through_the_kernels_is_xlas(monkeypatch):
    """Two seed-layout train steps (compress networks joined, their weights read in the layer stack in
    place) with compress_impl="pallas" update every parameter as with XLA's products."""
    from flax import nnx

    from kernels import compress_matmul
    from nsa_jax.config import ModelConfig
    from nsa_jax.training import Trainer, make_optimizer

    calls = []
    real = compress_matmul.relu_linear
    monkeypatch.setattr(compress_matmul, "relu_linear", lambda *a: calls.append(a[4]) or real(*a))
    cfg = ModelConfig(dim=32, depth=2, heads=4, kv_heads=2, dim_head=8, sliding_window_size=8, compress_block_size=4,
                      compress_block_sliding_stride=4, selection_block_size=4, num_selected_blocks=2)
    batches = jnp.asarray(np.random.default_rng(5).integers(0, 256, (2, 4, 33)), jnp.int32)  # rows: 4 x 8 windows
    tiles = GroupedMatmulTiles(fwd=MatmulTiles(16, 16, 16), dx=MatmulTiles(16, 16, 16))
    results = []
    for impl in ("pallas", "xla"):
        settings = KernelSettings(compress_impl=impl, compress_tiles=tiles)
        trainer = Trainer(cfg.build(nnx.Rngs(0), use_pallas_nsa=True, kernel_settings=settings), make_optimizer(1e-2))
        state = trainer.init_state()
        for _ in range(2):
            state, metrics = trainer.train_step(state, batches)
        results.append((state.params, float(metrics["loss"])))
    assert sorted(set(calls)) == [0, 1]  # both layers' input layers ran through the kernels
    (got, loss), (want, want_loss) = results
    assert loss == pytest.approx(want_loss, rel=1e-5)
    for key in want:
        np.testing.assert_allclose(np.asarray(got[key]), np.asarray(want[key]), rtol=1e-4, atol=1e-5, err_msg=key)

"""Linear memory in T, and rematerialisation. The compiled forward + backward of a SparseAttention layer on the Pallas
path needs at most x2.15 temporary memory per doubling of the sequence length (4k -> 32k).

Compile-only (`memory_analysis` of the lowered program, nothing runs), so it is cheap on the
CPU, where the kernels compile in interpret mode; the quadratic [n, n / block] selection
logits the streaming selection kernel removed would show as x2.4 and more per doubling.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nsa_jax.attention import SparseAttention

LENGTHS = (4096, 8192, 16384, 32768)


def temp_bytes(use_pallas_nsa: bool) -> list[int]:
    attn = SparseAttention(dim=512, dim_head=64, heads=8, kv_heads=4, sliding_window_size=64, compress_block_size=16,
                           selection_block_size=16, num_selected_blocks=4, causal=True, use_diff_topk=True,
                           compress_mlp="grouped_mlp", use_pallas_nsa=use_pallas_nsa, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(attn)

    def loss(params, x):
        return jnp.sum(nnx.merge(graphdef, params)(x).astype(jnp.float32))

    step = jax.jit(jax.grad(loss, argnums=(0, 1)))
    return [step.lower(params, jax.ShapeDtypeStruct((1, n, 512), jnp.bfloat16)).compile().memory_analysis()
            .temp_size_in_bytes for n in LENGTHS]


@pytest.mark.slow  # four compilations of the interpreted kernels: ~40 s of the quick tier's 5 minutes
def test_sparse_attention_temp_memory_grows_linearly_with_length():
    temp = temp_bytes(use_pallas_nsa=True)
    growth = [b / a for a, b in zip(temp, temp[1:])]
    assert max(growth) <= 2.15, f"temp memory {[t >> 20 for t in temp]} MiB at T={LENGTHS}: growth {growth}"


@pytest.mark.slow
def test_the_measurement_sees_the_reference_quadratic_memory():
    """Control: the dense reference (full [n, n / stride] logits) shows x4 per doubling here."""
    temp = temp_bytes(use_pallas_nsa=False)
    assert min(b / a for a, b in zip(temp, temp[1:])) >= 3.0, [t >> 20 for t in temp]  # x3.25 at 4k on a GPU


@pytest.mark.slow  # moved from the quick tier to keep it under 5 minutes
def test_block_remat_same_gradients_less_memory():
    """Transformer(remat="block") keeps one array per layer: the same loss and gradients as
    remat="none" (float32, CPU: the same arithmetic, recomputed), less compiled temp memory."""
    from nsa_jax.config import ModelConfig

    config = ModelConfig(dim=64, depth=2, heads=4, kv_heads=2, dim_head=16, sliding_window_size=8,
                         compress_block_size=4, compress_block_sliding_stride=4, selection_block_size=4,
                         num_selected_blocks=2)
    ids = jax.random.randint(jax.random.key(0), (2, 129), 0, 256)
    results = {}
    for remat in ("none", "block"):
        graphdef, params = nnx.split(config.build(nnx.Rngs(0), use_pallas_nsa=False, remat=remat))
        step = jax.jit(jax.value_and_grad(lambda p, ids: nnx.merge(graphdef, p)(ids, return_loss=True)))
        temp = step.lower(params, ids).compile().memory_analysis().temp_size_in_bytes
        results[remat] = (step(params, ids), temp)
    (loss, grads), temp = results["none"]
    (loss_r, grads_r), temp_r = results["block"]
    np.testing.assert_allclose(float(loss_r), float(loss), rtol=1e-6)  # equal on the CPU; a GPU may fuse differently
    for g, g_r in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_r)):
        scale = float(jnp.max(jnp.abs(g)))
        assert float(jnp.max(jnp.abs(g_r - g))) <= 1e-5 * scale, "remat changed a gradient"
    assert temp_r < 0.7 * temp, (temp_r, temp)


def test_unknown_remat_mode_is_a_clear_error():
    from nsa_jax.transformer import Transformer

    with pytest.raises(ValueError, match="remat must be one of none, block"):
        Transformer(num_tokens=256, dim=32, depth=1, remat="all", rngs=nnx.Rngs(0))

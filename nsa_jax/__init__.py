"""nsa-jax: Native Sparse Attention (arXiv 2502.11089) for JAX and Flax NNX."""

from nsa_jax.attention import Attention, SparseAttention
from nsa_jax.compress_networks import (
    AttentionPool,
    CompressMLP,
    ConvLinearCompress,
    GroupedMLP,
    SingleProjection,
)
from nsa_jax.transformer import Transformer
from nsa_jax import convert, reference

__all__ = [
    "Attention",
    "AttentionPool",
    "CompressMLP",
    "ConvLinearCompress",
    "GroupedMLP",
    "SingleProjection",
    "SparseAttention",
    "Transformer",
    "convert",
    "reference",
]
__version__ = "0.1.0"

"""nsa-jax: Native Sparse Attention (arXiv 2502.11089) for JAX and Flax NNX.

The public names load on first use (PEP 562), so that `import nsa_jax.reference` or
`nsa_jax.numerics` (what the kernels import) does not pull in the NNX modules, which import
the kernels: no import cycle, and light imports for the command-line programs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "Attention": "nsa_jax.attention",
    "SparseAttention": "nsa_jax.attention",
    "AttentionPool": "nsa_jax.compress_networks",
    "CompressMLP": "nsa_jax.compress_networks",
    "ConvLinearCompress": "nsa_jax.compress_networks",
    "GroupedMLP": "nsa_jax.compress_networks",
    "SingleProjection": "nsa_jax.compress_networks",
    "Transformer": "nsa_jax.transformer",
    "native_sparse_attention": "nsa_jax.ops",
}
_SUBMODULES = {"convert", "ops", "reference"}
__all__ = ["Attention", "AttentionPool", "CompressMLP", "ConvLinearCompress", "GroupedMLP", "SingleProjection",
           "SparseAttention", "Transformer", "convert", "native_sparse_attention", "ops", "reference"]
assert set(__all__) == set(_EXPORTS) | _SUBMODULES

if TYPE_CHECKING:
    from nsa_jax import convert, ops, reference
    from nsa_jax.attention import Attention, SparseAttention
    from nsa_jax.compress_networks import AttentionPool, CompressMLP, ConvLinearCompress, GroupedMLP, SingleProjection
    from nsa_jax.ops import native_sparse_attention
    from nsa_jax.transformer import Transformer


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"nsa_jax.{name}")
    else:
        raise AttributeError(f"module 'nsa_jax' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])

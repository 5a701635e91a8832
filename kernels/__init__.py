"""Attention backends for NSA: the pure-JAX reference, or Pallas kernels.

A backend is four functions with the signatures of `nsa_jax.reference`:
`compressed_attention`, `select_blocks`, `selected_attention` and `sliding_window_attention`.
`SparseAttention` calls them through `get_backend`, so a kernel slots in without the
module changing.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax

BACKENDS = ("reference", "pallas")


class AttentionBackend(NamedTuple):
    name: str
    compressed_attention: Callable
    select_blocks: Callable
    selected_attention: Callable
    sliding_window_attention: Callable


def default_backend_name() -> str:
    """Kernels on GPU, the reference elsewhere (interpreted kernels are for tests, not speed)."""
    return "pallas" if jax.default_backend() == "gpu" and _pallas_available() else "reference"


def _pallas_available() -> bool:
    """The Pallas kernels import (Triton lowering on GPU, the interpreter on CPU)."""
    try:
        from jax.experimental import pallas  # noqa: F401
        from jax.experimental.pallas import triton  # noqa: F401
    except ImportError:
        return False
    return True


def get_backend(name: str | None = None) -> AttentionBackend:
    name = default_backend_name() if name is None else name
    if name == "reference":
        from nsa_jax import reference

        return AttentionBackend(
            "reference",
            reference.compressed_attention,
            reference.select_blocks,
            reference.selected_attention,
            reference.sliding_window_attention,
        )
    if name == "pallas":
        if not _pallas_available():
            raise RuntimeError("jax.experimental.pallas (Triton) is not available; use use_pallas_nsa=False")
        from kernels.compressed_attention import compressed_attention
        from kernels.selected_attention import selected_attention
        from kernels.selection import select_blocks
        from kernels.sliding_window import sliding_window_attention

        return AttentionBackend("pallas", compressed_attention, select_blocks, selected_attention,
                                sliding_window_attention)
    raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")

"""Attention backends for NSA: the pure-JAX reference, or Pallas kernels.

A backend is four functions with the signatures of `nsa_jax.reference`:
`compressed_attention`, `select_blocks`, `selected_attention` and `sliding_window_attention`.
`SparseAttention` calls them through `get_backend`, so a kernel slots in without the
module changing.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
from jax.sharding import PartitionSpec as P

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


def backend_name(use_pallas_nsa: bool | None = None) -> str:
    """The backend a `use_pallas_nsa` setting runs: True "pallas", False "reference",
    None the platform's default (`default_backend_name`)."""
    if use_pallas_nsa is None:
        return default_backend_name()
    return "pallas" if use_pallas_nsa else "reference"


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

        return AttentionBackend("pallas", batch_parallel(compressed_attention), select_blocks,
                                batch_parallel(selected_attention), batch_parallel(sliding_window_attention))
    raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")


def batch_parallel(fn: Callable, axis: str = "data") -> Callable:
    """Run a kernel-backed function per shard of the batch when a mesh is in context.

    XLA cannot partition a `pallas_call`: under a batch-sharded `jit` it would gather the
    whole batch onto every device and repeat the work there. Inside `jax.set_mesh(mesh)` with
    a `data` axis of size > 1 (the Trainer traces its steps so), the call goes through
    `jax.shard_map` instead, each device running the kernel on its own slice of the batch.
    Positional arguments are the batch-leading arrays; keyword arguments are static settings.
    Calls with array keyword arguments (cached decoding) or a batch the axis does not divide
    run unchanged.
    """

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        mesh = jax.sharding.get_abstract_mesh()
        shards = dict(zip(mesh.axis_names, mesh.axis_sizes)).get(axis, 1) if not mesh.empty else 1
        if (shards == 1 or any(isinstance(v, jax.Array) for v in kwargs.values())
                or any(a.shape[0] % shards for a in args)):
            return fn(*args, **kwargs)
        return jax.shard_map(functools.partial(fn, **kwargs), in_specs=P(axis), out_specs=P(axis),
                             check_vma=False)(*args)

    return wrapped


def set_selected_defaults(impl: str | None = None, tiled_dkv: str | None = None, tile_rows: int | None = None) -> None:
    """Change the selected-attention kernels' module defaults (None keeps one), e.g. to time
    variants: impl "auto" / "query" / "tiled"; tiled_dkv "kernel" / "atomic"; rows per tile."""
    import kernels.selected_attention as selected
    import kernels.selected_tiled as tiled

    if impl is not None:
        if impl not in ("auto", "query", "tiled"):
            raise ValueError(f"impl must be 'auto', 'query' or 'tiled', got {impl!r}")
        selected.IMPL = impl
    if tiled_dkv is not None:
        if tiled_dkv not in ("kernel", "atomic"):
            raise ValueError(f"tiled_dkv must be 'kernel' or 'atomic', got {tiled_dkv!r}")
        tiled.ATOMIC_DKV = tiled_dkv == "atomic"
    if tile_rows is not None:
        selected.TILE_ROWS = tile_rows

"""Attention backends for NSA: the pure-JAX reference, or Pallas kernels.

A backend is four functions with the signatures of `nsa_jax.reference`:
`compressed_attention`, `select_blocks`, `selected_attention` and `sliding_window_attention`.
`SparseAttention` calls them through `get_backend`, so a kernel slots in without the
module changing. The kernels serve the parallel forward; calls with `q_positions` (cached
decoding: a few queries against a longer cache) go to the reference in every backend.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.experimental.pallas.fuser  # noqa: F401  (see below)
from jax.sharding import PartitionSpec as P

from kernels.settings import KernelSettings, MosaicTiles, SelectedSettings, SelectionSettings, Tiles

# Importing Pallas's fuser registers a flag that is part of jit's cache key. Pallas imports it lazily,
# while lowering the first kernel; a jitted train step compiled before that import then misses the
# cache on its second call and compiles again (minutes at long context). Imported here, up front.

BACKENDS = ("reference", "pallas")

__all__ = ["AttentionBackend", "BACKENDS", "KernelSettings", "MosaicTiles", "SelectedSettings", "SelectionSettings",
           "Tiles", "backend_name", "batch_parallel", "default_backend_name", "get_backend"]


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


@functools.cache
def get_backend(name: str | None = None, settings: KernelSettings = KernelSettings()) -> AttentionBackend:
    """The backend `name` ("reference", "pallas", or None for the platform's default), its
    kernels bound to `settings`. Cached: the same arguments give the same functions."""
    name = default_backend_name() if name is None else name
    from nsa_jax import reference

    if name == "reference":
        return AttentionBackend("reference", reference.compressed_attention, reference.select_blocks,
                                reference.selected_attention, reference.sliding_window_attention)
    if name == "pallas":
        if not _pallas_available():
            raise RuntimeError("jax.experimental.pallas (Triton) is not available; use use_pallas_nsa=False")
        from kernels.compressed_attention import compressed_attention
        from kernels.selected_attention import selected_attention
        from kernels.selection import select_blocks
        from kernels.sliding_window import sliding_window_attention

        def kernel(fn, ref, **bound):
            return _decode_with(ref, functools.partial(batch_parallel(fn), **bound))

        return AttentionBackend(
            "pallas",
            kernel(compressed_attention, reference.compressed_attention, impl=settings.compressed_impl,
                   tiles=settings.flash, mosaic_tiles=settings.mosaic),
            kernel(select_blocks, reference.select_blocks, settings=settings.selection),
            kernel(selected_attention, reference.selected_attention, settings=settings.selected),
            kernel(sliding_window_attention, reference.sliding_window_attention,
                   impl=settings.sliding_impl, tiles=settings.flash))
    raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")


def _decode_with(reference_fn: Callable, kernel_fn: Callable) -> Callable:
    """kernel_fn for the parallel forward; reference_fn for calls with `q_positions` (decoding).
    `segments` (packed documents) go to kernel_fn as its last positional argument."""

    @functools.wraps(reference_fn)
    def call(*args, q_positions=None, segments=None, **kwargs):
        if q_positions is not None:
            return reference_fn(*args, q_positions=q_positions, segments=segments, **kwargs)
        if segments is not None:
            return kernel_fn(*args, segments, **kwargs)
        return kernel_fn(*args, **kwargs)

    return call


def batch_parallel(fn: Callable, axis: str = "data") -> Callable:
    """Run a kernel-backed function per shard of the batch when a mesh is in context.

    XLA cannot partition a `pallas_call`: under a batch-sharded `jit` it would gather the
    whole batch onto every device and repeat the work there. Inside `jax.set_mesh(mesh)` with
    a `data` axis of size > 1 (the Trainer traces its steps so), the call goes through
    `jax.shard_map` instead, each device running the kernel on its own slice of the batch.
    Positional arguments are the batch-leading arrays, or pytrees of them (or None); keyword
    arguments are static settings. A batch the axis does not divide runs unchanged.
    """

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        mesh = jax.sharding.get_abstract_mesh()
        shards = dict(zip(mesh.axis_names, mesh.axis_sizes)).get(axis, 1) if not mesh.empty else 1
        # Inside a shard_map over the axis (the Trainer's per-device gradients), the batch is already split.
        manual = not mesh.empty and axis in mesh.manual_axes
        if shards == 1 or manual or any(a.shape[0] % shards for a in jax.tree.leaves(args)):
            return fn(*args, **kwargs)
        return jax.shard_map(functools.partial(fn, **kwargs), in_specs=P(axis), out_specs=P(axis),
                             check_vma=False)(*args)

    return wrapped

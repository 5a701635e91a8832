"""Data parallelism on JAX's SPMD machinery: one mesh axis `data` over every device.

The batch is split over `data`; parameters and optimizer state are replicated, or, with
FSDP, each array is split along its largest axis that the device count divides (arrays with
no such axis stay replicated). XLA inserts the collectives; the train step stays one program.
With replicated state, each device sums its gradients over the micro-batches and the sum is
all-reduced once per step (`Trainer._device_grads`).
Multi-host runs call `initialize` first; every process then sees the global mesh.

Context parallelism adds a second axis, `context`: each sequence is split along its length over
it (`nsa_jax.context`), the batch over `data` as before (data x context devices in all).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA = "data"
CONTEXT = "context"


def initialize(coordinator_address: str | None, num_processes: int | None, process_id: int | None) -> None:
    """jax.distributed.initialize from flags, or from JAX's environment variables when set."""
    if coordinator_address:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    elif os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize()


def make_mesh(devices: list | None = None, context: int = 1) -> Mesh:
    """A (data, context) mesh over `devices` (default: all); context devices split each sequence."""
    devices = np.array(jax.devices() if devices is None else devices)
    if context < 1 or devices.size % context:
        raise ValueError(f"context parallelism ({context}) must divide the number of devices ({devices.size})")
    return Mesh(devices.reshape(devices.size // context, context), (DATA, CONTEXT))


def context_size(mesh: Mesh) -> int:
    """Devices each sequence is split over (1: no context parallelism)."""
    return mesh.shape.get(CONTEXT, 1)


def describe(mesh: Mesh) -> str:
    hosts = f", {jax.process_count()} processes" if jax.process_count() > 1 else ""
    context = f", {CONTEXT}={context_size(mesh)}" if context_size(mesh) > 1 else ""
    return f"mesh: {mesh.size} devices ({DATA}={mesh.shape[DATA]}{context}){hosts}"


def fsdp_spec(shape: tuple[int, ...], n: int) -> P:
    """Split along the largest axis that n divides (replicated when none does)."""
    candidates = [axis for axis, size in enumerate(shape) if size % n == 0 and size >= n]
    if n == 1 or not candidates:
        return P()
    axis = max(candidates, key=lambda a: shape[a])
    return P(*([None] * axis + [DATA]))


def state_sharding(tree: Any, mesh: Mesh, fsdp: bool) -> Any:
    """A NamedSharding per leaf: replicated, or split along one axis with FSDP."""
    n = mesh.shape[DATA]
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(np.shape(x), n) if fsdp else P()), tree)


def batch_sharding(mesh: Mesh, batch_axis: int) -> NamedSharding:
    """Split axis `batch_axis` of a batch over the `data` devices."""
    return NamedSharding(mesh, P(*([None] * batch_axis + [DATA])))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch(batch: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A device array from the host batch; every process holds the same global batch and
    contributes only the slices its own devices need."""
    return jax.make_array_from_callback(batch.shape, sharding, lambda index: batch[index])

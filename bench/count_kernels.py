"""How many kernels does one train step launch, and which part of the model launches them?

    python -m bench.count_kernels                               # on a GPU machine
    python -m bench.count_kernels --target h200 --flat_optimizer  # on a machine without one
    python -m bench.count_kernels --target h200 --kernel_settings compress_split_k=4  # other settings

Compiles the seed model's jitted train step (`nsa_jax.training.Trainer`, the Pallas kernels) and
counts the kernels its compiled HLO launches: every top-level instruction that runs on the device
(fusions, library calls, Pallas kernels, copies, sorts, ...), a while loop's body once per
iteration of its known trip count. Each is assigned to the named scope it was traced in
(`bench.profile_step.scope_of`: `fwd attention/selection`, `bwd feedforward`, `optimizer`, ...).
No kernel runs, so the count takes a compile's time and no GPU time; `bench.profile_step` measures
the same step on the device (its kernels per step come from the profiler's trace).

`--target h200` (or h100) compiles for that card on a machine without a GPU: XLA's deviceless
compilation for CUDA (`jax.experimental.topologies`), which needs jax's CUDA plugin installed
(`pip install "jax[cuda12]"`; the plugin's device checks are skipped). The kernels then take the
GPU code paths: this script tells them they are not interpreted and that cuDNN is there. XLA's
autotuning needs a device, so it is off: some matrix products may then take another kernel than
on the card (a cuBLAS call where the card would run an XLA Triton fusion, or the reverse), so the
count can differ a little from `--target`-less runs on the card itself.
"""

from __future__ import annotations

import os
import sys

if "--target" in " ".join(sys.argv):  # before jax starts: no CUDA device to initialise
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_gpu_autotune_level=0"

import argparse
import collections
import dataclasses
import importlib
import json
import re
import types
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from bench.kernel_flags import add_kernel_flags, kernel_settings_from
from bench.profile_step import VARIANTS, add_step_flags, hlo_op_names, scope_of
from nsa_jax.config import ModelConfig
from nsa_jax.training import STEP_COMPILER_OPTIONS, Trainer, make_optimizer

# Instructions that launch nothing (buffer bookkeeping).
NOT_KERNELS = frozenset({"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "opt-barrier",
                         "after-all", "partition-id", "replica-id", "add-dependency"})
_COMPUTATION = re.compile(r"^(ENTRY )?%?([\w.\-]+) .*\{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = .*? ([a-z][a-z\-]*)\(")

# Deviceless targets (XLA's GpuTargetConfig): what the compiler needs to know of the card.
_TARGET = """gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: {cores} fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: {bandwidth} l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: {memory} shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: 9 }} registers_per_core_limit: 65536 registers_per_block_limit: 65536
}}
platform_name: "CUDA" dnn_version_info {{ major: 9 minor: 8 }} runtime_version {{ major: 12 minor: 9 }}
device_description_str: "{name}"
"""
TARGETS = {
    "h100": _TARGET.format(cores=132, bandwidth=3352320000000, memory=84929347584, name="NVIDIA H100 80GB HBM3"),
    "h200": _TARGET.format(cores=132, bandwidth=4800000000000, memory=150000000000, name="NVIDIA H200"),
}


class Launch(NamedTuple):
    name: str  # HLO instruction
    opcode: str
    times: int  # per step (a while body's trip count)


def launches(hlo_text: str) -> list[Launch]:
    """The device work of a compiled module's ENTRY computation, while bodies expanded (a loop
    without a known trip count counts once)."""
    computations: dict[str, list[str]] = {}
    entry = current = None
    for line in hlo_text.splitlines():
        m = _COMPUTATION.match(line)
        if m and not line.startswith(" "):
            current = m.group(2)
            computations[current] = []
            entry = current if m.group(1) else entry
        elif line.startswith("}"):
            current = None
        elif current is not None and line.strip():
            computations[current].append(line)
    out: list[Launch] = []

    def walk(computation: str, times: int) -> None:
        for line in computations.get(computation, []):
            m = _INSTRUCTION.match(line)
            if not m or m.group(2) in NOT_KERNELS:
                continue
            if m.group(2) == "while":
                trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
                walk(re.search(r"body=%?([\w.\-]+)", line).group(1), times * (int(trips.group(1)) if trips else 1))
            else:
                out.append(Launch(m.group(1), m.group(2), times))

    if entry is None:
        raise ValueError("no ENTRY computation in this HLO text")
    walk(entry, 1)
    return out


def by_scope(hlo_text: str) -> dict[str, int]:
    """Kernels per step of each named scope (`scope_of` of the instruction's op_name), most first."""
    op_names = hlo_op_names(hlo_text)
    counts: collections.Counter = collections.Counter()
    for launch in launches(hlo_text):
        counts[scope_of(op_names.get(launch.name, ""))] += launch.times
    return dict(counts.most_common())


def pretend_gpu() -> None:
    """Make the kernels take their GPU paths while tracing on a machine without a GPU (deviceless
    compilation): not interpreted, cuDNN available, Pallas' Triton lowering and Mosaic GPU for compute
    capability 9.0."""
    from jax._src.pallas.triton import pallas_call_registration

    pallas_call_registration.gpu_info_lib = types.SimpleNamespace(
        get_gpu_info=lambda: types.SimpleNamespace(compute_capability="9.0"))

    def cudnn_usable(q):
        return q.dtype in (jnp.bfloat16, jnp.float16) and q.shape[-1] % 8 == 0 and q.shape[-1] <= 128

    for name in ("_common", "_flash", "compress_matmul", "compressed_attention", "fla_selection", "mosaic_compressed",
                 "selection", "selected_attention", "selected_query", "selected_tiled", "sliding_window"):
        module = importlib.import_module(f"kernels.{name}")
        if hasattr(module, "interpret_mode"):
            module.interpret_mode = lambda: False
        if hasattr(module, "hopper_gpu"):
            module.hopper_gpu = lambda: True
        if hasattr(module, "cudnn_flash_usable"):
            module.cudnn_flash_usable = cudnn_usable


def compiled_step(variant: str, seq_len: int, batch_size: int, accum: int, dtype: str, flat_optimizer: bool,
                  target: str | None, kernel_settings=None) -> str:
    """The compiled HLO text of the seed model's train step."""
    if target is not None:
        from jax.experimental import topologies

        pretend_gpu()
        topology = topologies.get_topology_desc(platform="cuda", target_config=TARGETS[target], topology="1x1x1")
        mesh = topologies.make_mesh(topology, (1,), ("data",))
    else:
        mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    sparse, pallas = VARIANTS[variant]
    config = dataclasses.replace(ModelConfig(), use_sparse_attn=sparse)
    trainer = Trainer(config.build(nnx.Rngs(0), use_pallas_nsa=pallas, dtype=dtype, kernel_settings=kernel_settings),
                      make_optimizer(1e-4, flat=flat_optimizer))  # its state on this host: only its shapes matter
    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, P())),
                         trainer.init_state())
    batch = jax.ShapeDtypeStruct((accum, batch_size, seq_len + 1), jnp.int32, sharding=NamedSharding(mesh, P()))
    step = jax.jit(trainer._train_step, donate_argnums=(0,), compiler_options=STEP_COMPILER_OPTIONS)
    with jax.set_mesh(mesh):
        return step.lower(state, batch).compile().as_text()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_flags(parser)
    add_kernel_flags(parser)
    parser.add_argument("--target", default=None, choices=list(TARGETS),
                        help="compile for this card without a GPU (needs jax's CUDA plugin)")
    parser.add_argument("--hlo", default=None, help="also write the compiled HLO text here")
    args = parser.parse_args()

    if args.target is None and jax.default_backend() != "gpu":
        raise SystemExit("error: no GPU here: pass --target h200 (or h100) to compile for one without it")
    try:
        text = compiled_step(args.variant, args.seq_len, args.batch_size, args.grad_accum_every, args.dtype,
                             args.flat_optimizer, args.target, kernel_settings_from(args))
    except (RuntimeError, NotImplementedError) as e:
        if args.target is None:
            raise
        raise SystemExit(f"error: cannot compile for {args.target} here ({str(e).splitlines()[0][:160]}); "
                         "install jax's CUDA plugin: pip install \"jax[cuda12]\"") from None
    if args.hlo:
        with open(args.hlo, "w") as f:
            f.write(text)
    scopes = by_scope(text)
    total = sum(scopes.values())
    card = args.target or jax.devices()[0].device_kind
    print(f"{args.variant} {args.batch_size}x{args.grad_accum_every}x{args.seq_len} {args.dtype}"
          f"{' flat optimizer' if args.flat_optimizer else ''}, compiled for {card}: {total} kernels per step")
    print(f"{'named scope (per step, all layers)':48} {'kernels':>8}")
    for scope, n in scopes.items():
        print(f"{scope[:48]:48} {n:>8}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(vars(args), card=card, jax=jax.__version__, kernels_per_step=total, scopes=scopes), f,
                      indent=2)


if __name__ == "__main__":
    main()

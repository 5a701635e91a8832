"""Where does a train step's GPU time go? Profile the seed model's jitted step and rank kernels.

    python -m bench.profile_step --variant pallas --seq_len 4096 --batch_size 1 --grad_accum_every 1
    python -m bench.profile_step --seq_len 262144 --batch_size 1 --dtype bfloat16 --context 2   # one sequence, 2 GPUs
    python -m bench.profile_step --detail 'compress|optimizer'   # and every kernel of the scopes this matches

Runs a few steps under `jax.profiler.trace`, reads the trace back with `jax.profiler.ProfileData`
and sums the device time of every GPU kernel by name (Pallas kernels are named `nsa_*`; XLA's
fusions keep their HLO names, with the JAX op that produced them where the trace records it).
Prints the top kernels per step, the share of the Pallas kernels, and GPU busy time against the
step's wall time (the gap is launch overhead and host work), and the kernels per named scope of
the model (attention/selection, feedforward, optimizer, ...; forward and backward apart), read from
the compiled step's HLO: where the kernels of a step come from (--detail REGEX lists each kernel of
the matching scopes; the JSON has them for every scope). With --context N, each sequence is
split over N GPUs (context parallelism) and the kernels are those of the first GPU. Writes JSON
with --json.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import json
import os
import re
import statistics
import tempfile
import time

import jax
import numpy as np
from flax import nnx

from bench.kernel_flags import add_kernel_flags, kernel_settings_from
from kernels import KernelSettings
from nsa_jax import sharding
from nsa_jax.config import ModelConfig
from nsa_jax.training import Trainer, make_optimizer

VARIANTS = {"reference": (True, False), "pallas": (True, True), "dense": (False, None)}
OP_STATS = ("tf_op", "long_name", "hlo_op")  # the first one present names the kernel's source op


def build(variant: str, seq_len: int, batch_size: int, accum: int, dtype: str,
          kernel_settings: KernelSettings | None = None, flat_optimizer: bool = False, context: int = 1):
    """The trainer and one batch; context > 1: each sequence split over the first `context` devices."""
    sparse, pallas = VARIANTS[variant]
    config = dataclasses.replace(ModelConfig(), use_sparse_attn=sparse)
    model = config.build(nnx.Rngs(0), use_pallas_nsa=pallas, dtype=dtype, kernel_settings=kernel_settings)
    trainer = Trainer(model, make_optimizer(1e-4, flat=flat_optimizer), sharding.make_mesh(jax.devices()[:context], context))
    rng = np.random.default_rng(0)
    batch = trainer.train_batches(rng.integers(0, 256, (accum, batch_size, seq_len + 1), dtype=np.int32))
    return trainer, batch


# The named scopes of the model and the train step (nsa_jax/attention.py, transformer.py, training.py):
# a kernel's op_name holds those it came from.
SCOPES = ("embedding", "attention", "feedforward", "project", "compress", "compressed_attention", "selection",
          "rotary", "selected_attention", "sliding_window", "combine", "logits", "optimizer")
_HLO_OP = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+) = .*?metadata=\{op_name="([^"]*)"')


def hlo_op_names(hlo_text: str) -> dict[str, str]:
    """Instruction name -> op_name (the JAX name stack it was traced under), from compiled HLO text.
    An XLA kernel is named after its instruction (a fusion, a custom call)."""
    return {m.group(1): m.group(2) for m in map(_HLO_OP.match, hlo_text.splitlines()) if m}


_PALLAS_OP = re.compile(r"/(nsa_\w+)/pallas_call")


def kernel_op_name(op_names: dict[str, str], kernel: str, hlo_op: str = "") -> str | None:
    """The op_name of a traced kernel. The trace names its HLO instruction (`hlo_op`) only when the
    kernel ran outside a command buffer; otherwise its name leads there: XLA names a fusion's kernel
    after the instruction with "_N" for ".N" (`loop_select_fusion_6` runs `loop_select_fusion.6`), and
    a Pallas kernel after its pallas_call's name (`nsa_selected_dkdv`; every layer's call has the same
    scopes). Library kernels (cuBLAS, cuDNN) carry neither: None."""
    for name in (hlo_op, kernel, re.sub(r"_(\d+)$", r".\1", kernel)):
        if name and name in op_names:
            return op_names[name]
    if kernel.startswith("nsa_"):
        return next((op for op in op_names.values() if (m := _PALLAS_OP.search(op)) and m.group(1) == kernel), None)
    return None


def scope_of(op_name: str) -> str:
    """op_name -> "fwd|bwd scope/scope": the model's named scopes in it (outermost first), and
    bwd where it comes from a transposed (backward) computation."""
    # A transformation repeats the scopes it wraps ("transpose(jvp(attention/compress))/attention/compress"):
    # each scope once, in the order of first appearance.
    path = list(dict.fromkeys(w for w in re.findall(r"[A-Za-z_]+", op_name) if w in SCOPES))
    direction = "bwd" if "transpose(" in op_name else "fwd"
    if "optimizer" in path:
        return "optimizer"
    return f"{direction} {'/'.join(path) or '(no scope)'}"


def device_events(trace_dir: str, first_gpu_only: bool = False) -> list[tuple[str, str, float, str]]:
    """(kernel name, source op, microseconds, HLO instruction or "") of every event on a GPU
    plane's stream lines (first_gpu_only: GPU 0's)."""
    from jax.profiler import ProfileData

    events = []
    for path in glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True):
        for plane in ProfileData.from_file(path).planes:
            if not plane.name.startswith("/device:GPU") or (first_gpu_only and plane.name != "/device:GPU:0"):
                continue
            for line in plane.lines:
                if "stream" not in line.name.lower():
                    continue
                for ev in line.events:
                    stats = dict(ev.stats)
                    op = next((str(stats[k]) for k in OP_STATS if k in stats), "")
                    events.append((ev.name, op, ev.duration_ns / 1e3, str(stats.get("hlo_op", ""))))
    return events


def summarise(events, steps: int, top: int, op_names: dict[str, str] | None = None) -> dict:
    """Per-kernel and per-kind totals per step; with `op_names` (`hlo_op_names` of the compiled
    step), also kernels and time per named scope (`scope_of`)."""
    by_name: dict[str, float] = collections.defaultdict(float)
    calls: dict[str, int] = collections.Counter()
    ops: dict[str, str] = {}
    scopes: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])  # scope -> [kernels, us] per step
    scope_cache: dict[tuple[str, str], str] = {}  # (kernel, hlo_op) -> scope: each looked up once, not per event
    # scope -> kernel -> [calls, us] per step: which kernels a scope is made of
    detail: dict[str, dict[str, list[float]]] = collections.defaultdict(lambda: collections.defaultdict(lambda: [0.0, 0.0]))
    for name, op, us, hlo_op in events:
        by_name[name] += us / steps
        calls[name] += 1
        ops.setdefault(name, op)
        if op_names is not None:
            if (name, hlo_op) not in scope_cache:
                op_name = kernel_op_name(op_names, name, hlo_op)
                scope_cache[name, hlo_op] = scope_of(op_name) if op_name is not None else "(library kernels, copies)"
            for entry in (scopes[scope_cache[name, hlo_op]], detail[scope_cache[name, hlo_op]][name]):
                entry[0] += 1 / steps
                entry[1] += us / steps
    total = sum(by_name.values())
    pallas = sum(us for name, us in by_name.items() if name.startswith("nsa_"))
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1])
    rows = [dict(kernel=name, us_per_step=us, share=us / total if total else 0.0, calls_per_step=calls[name] / steps,
                 op=ops[name][:120]) for name, us in ranked[:top]]
    groups: dict[str, float] = collections.defaultdict(float)
    for name, us in by_name.items():
        groups[name.split("_")[0] if not name.startswith("nsa_") else "_".join(name.split("_")[:2])] += us
    by_scope = {k: dict(kernels_per_step=n, us_per_step=us) for k, (n, us) in sorted(scopes.items(), key=lambda kv: -kv[1][0])}
    by_scope_kernel = {scope: {name: dict(calls_per_step=n, us_per_step=us)
                               for name, (n, us) in sorted(kernels.items(), key=lambda kv: -kv[1][1])}
                       for scope, kernels in detail.items()}
    return dict(gpu_us_per_step=total, pallas_us_per_step=pallas, kernels_per_step=len(events) / steps, top=rows,
                groups=dict(sorted(groups.items(), key=lambda kv: -kv[1])), scopes=by_scope,
                scope_kernels=by_scope_kernel)


def add_step_flags(parser: argparse.ArgumentParser) -> None:
    """The train step's settings (also bench.count_kernels')."""
    parser.add_argument("--variant", default="pallas", choices=list(VARIANTS))
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--grad_accum_every", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--flat_optimizer", action="store_true",
                        help="clip and Adam over one vector of all parameters (make_optimizer(flat=True))")
    parser.add_argument("--json", default=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_flags(parser)
    parser.add_argument("--steps", type=int, default=3, help="steps inside the trace")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--context", type=int, default=1, help="split each sequence over this many GPUs")
    parser.add_argument("--detail", default=None, metavar="REGEX",
                        help="also list every kernel of the named scopes this matches (e.g. 'compress$')")
    add_kernel_flags(parser)
    args = parser.parse_args()

    trainer, batch = build(args.variant, args.seq_len, args.batch_size, args.grad_accum_every, args.dtype,
                           kernel_settings_from(args), args.flat_optimizer, args.context)
    state = trainer.init_state()
    # Compiled once, ahead of time: the steps below run this executable, whose HLO names their kernels' scopes.
    step = trainer.lower_train_step(state, batch).compile()
    for _ in range(3):  # settle
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    walls = []
    for _ in range(5):
        start = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        walls.append(time.perf_counter() - start)
    wall_us = 1e6 * statistics.median(walls)
    # Host side: how long the call takes to return (dispatch), and steps issued back to back
    # (as train.py does) so that one step's dispatch overlaps the previous step's kernels.
    dispatch = []
    for _ in range(5):
        start = time.perf_counter()
        state, metrics = step(state, batch)
        dispatch.append(time.perf_counter() - start)
        jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(10):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    pipelined_us = 1e6 * (time.perf_counter() - start) / 10
    dispatch_us = 1e6 * statistics.median(dispatch)

    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            for _ in range(args.steps):
                state, metrics = step(state, batch)
            jax.block_until_ready(metrics)
        events = device_events(trace_dir, first_gpu_only=args.context > 1)
    op_names = hlo_op_names(step.as_text())
    summary = summarise(events, args.steps, args.top, op_names)

    shape = f"{args.batch_size}x{args.grad_accum_every}x{args.seq_len}" + (" flat optimizer" if args.flat_optimizer else "")
    shape += f", context {args.context} (GPU 0's kernels)" if args.context > 1 else ""
    print(f"{args.variant} {shape} {args.dtype} on {jax.devices()[0].device_kind}: wall {wall_us / 1e3:.2f} ms/step, "
          f"GPU busy {summary['gpu_us_per_step'] / 1e3:.2f} ms, Pallas kernels {summary['pallas_us_per_step'] / 1e3:.2f} ms, "
          f"{summary['kernels_per_step']:.0f} kernels/step; dispatch {dispatch_us / 1e3:.2f} ms, "
          f"back-to-back {pipelined_us / 1e3:.2f} ms/step")
    print(f"{'kernel':48} {'us/step':>9} {'share':>6} {'calls':>6}  op")
    for row in summary["top"]:
        print(f"{row['kernel'][:48]:48} {row['us_per_step']:>9.1f} {row['share']:>6.1%} {row['calls_per_step']:>6.0f}  "
              f"{row['op'][:70]}")
    print("by kind: " + ", ".join(f"{k} {v / 1e3:.2f} ms" for k, v in list(summary["groups"].items())[:10]))
    print(f"{'named scope (per step, all layers)':48} {'kernels':>9} {'us':>9}")
    for scope, row in summary["scopes"].items():
        print(f"{scope[:48]:48} {row['kernels_per_step']:>9.0f} {row['us_per_step']:>9.1f}")
        if args.detail and re.search(args.detail, scope):
            for name, k in summary["scope_kernels"][scope].items():
                print(f"    {name[:60]:60} {k['calls_per_step']:>5.0f} {k['us_per_step']:>9.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(vars(args), device=jax.devices()[0].device_kind, wall_us_per_step=wall_us,
                           dispatch_us=dispatch_us, pipelined_us_per_step=pipelined_us, **summary), f,
                      indent=2)


if __name__ == "__main__":
    main()

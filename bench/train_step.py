"""Time the jitted train step (forward, backward, accumulation, clipping, Adam) of the seed model.

    python -m bench.train_step                       # all variants this machine runs
    python -m bench.train_step --variants reference,dense --seq_lens 512,4096
    python -m bench.train_step --variants pallas --dtype bfloat16 --seq_lens 262144 --batch_size 1 \\
        --grad_accum_every 1 --devices 1,4 --context 4 --remat block    # one sequence over 4 GPUs
    python -m bench.train_step --variants pallas,dense --seq_lens 2048,4096 --batch_size 1 --grad_accum_every 1 \\
        --settings "default;selected.tile_rows=64" --rounds 2    # an A/B of kernel settings, in turn

Prints a table (ms per step, steps/s, tokens/s) and writes bench/results/train_step-<date>.json.
Each variant is timed after warm-up (compilation excluded): median of --repeats runs, each
ended by block_until_ready; then --repeats steps issued back to back, as train.py issues them
(the host's dispatch overlapping the GPU's work), whose mean is the last column. --settings
times the Pallas variant under several kernel settings and --rounds repeats the whole grid, so
that an A/B alternates within one process instead of comparing separate runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import statistics
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from bench.kernel_flags import add_kernel_flags, kernel_settings_from, parse_variant
from kernels import KernelSettings
from nsa_jax import sharding
from nsa_jax.config import ModelConfig
from nsa_jax.training import Trainer, make_optimizer

VARIANTS = {  # name -> (use_sparse_attn, use_pallas_nsa)
    "reference": (True, False),
    "pallas": (True, True),
    "dense": (False, None),
}


def time_variant(name: str, seq_len: int, batch_size: int, accum: int, repeats: int, dtype: str,
                 devices: int = 1, kernel_settings: KernelSettings | None = None, flat_optimizer: bool = False,
                 shard_optimizer: bool = False, context: int = 1, remat: str = "none", warmup: int = 3) -> dict:
    """batch_size is per data shard: the global batch is batch_size * devices / context, split over
    the `data` axis of a mesh of the first `devices` devices, each sequence over its `context`
    axis (context parallelism, `nsa_jax.context`)."""
    sparse, pallas = VARIANTS[name]
    config = dataclasses.replace(ModelConfig(), use_sparse_attn=sparse)
    mesh = sharding.make_mesh(jax.devices()[:devices], context)
    model = config.build(nnx.Rngs(0), use_pallas_nsa=pallas, dtype=dtype, kernel_settings=kernel_settings,
                         remat=remat)
    trainer = Trainer(model, make_optimizer(1e-4, flat=flat_optimizer), mesh, shard_optimizer=shard_optimizer)
    state = trainer.init_state()
    rng = np.random.default_rng(0)
    global_batch = batch_size * (devices // context)
    batches = [trainer.train_batches(rng.integers(0, 256, (accum, global_batch, seq_len + 1), dtype=np.int32))
               for _ in range(3)]
    for i in range(warmup):  # warm-up: compile, then settle
        state, metrics = trainer.train_step(state, batches[i % 3])
    jax.block_until_ready(metrics)
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        state, metrics = trainer.train_step(state, batches[i % 3])
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    ms = 1e3 * statistics.median(times)
    # Issued back to back, as train.py issues them: the host's dispatch of one step overlaps the
    # GPU's work on the previous one.
    start = time.perf_counter()
    for i in range(repeats):
        state, metrics = trainer.train_step(state, batches[i % 3])
    jax.block_until_ready(metrics)
    pipelined_ms = 1e3 * (time.perf_counter() - start) / repeats
    tokens = accum * global_batch * seq_len
    return dict(variant=name, seq_len=seq_len, batch_size=batch_size, devices=devices, context=context,
                global_batch=global_batch, grad_accum_every=accum, dtype=dtype, remat=remat,
                peak_gib_per_device=peak_memory_gib(mesh),
                optimizer="flat" if flat_optimizer else "zero1" if shard_optimizer else "tree",
                ms_per_step=ms, steps_per_s=1e3 / ms, tokens_per_s=tokens / (ms / 1e3), pipelined_ms_per_step=pipelined_ms,
                loss=float(metrics["loss"]), repeats=repeats)


def timing_grid(seq_lens: str, variants: str, settings: list[tuple[str, KernelSettings]]) -> list[tuple]:
    """(seq_len, variant, settings label, settings) in timing order: the pallas variant under each
    of `settings`, the others (whose steps run no kernel settings) once, under the first."""
    return [(seq_len, name, label if name == "pallas" else "-", kernel_settings)
            for seq_len in map(int, seq_lens.split(",")) for name in variants.split(",")
            for label, kernel_settings in (settings if name == "pallas" else settings[:1])]


def peak_memory_gib(mesh) -> float | None:
    """The largest peak of memory in use over the mesh's devices (GiB), where the platform counts it
    (GPUs; None on the CPU). The peak is the process's so far: time the smaller runs first."""
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in mesh.devices.flat]
    return max(peaks) / 2**30 if all(p is not None for p in peaks) else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="reference,pallas,dense")
    parser.add_argument("--seq_lens", default="512")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--grad_accum_every", type=int, default=4)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3, help="steps before timing (the first compiles); at least 1")
    parser.add_argument("--devices", default="1", help="device counts to time, e.g. 1,2 (--batch_size is per data "
                        "shard: per device without --context)")
    parser.add_argument("--context", type=int, default=1,
                        help="context parallelism for the device counts it divides (>= it): each sequence split over "
                             "this many devices (1: data parallel only)")
    parser.add_argument("--remat", default="none", choices=["none", "block"], help="recompute each block in the backward")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--name", default=None, help="JSON file stem (default train_step-<date>)")
    parser.add_argument("--optimizers", default="tree", help="optimizer layouts to time, comma-separated: tree (per "
                        "parameter array), flat (one vector: nsa_jax.training.make_optimizer(flat=True)), zero1 "
                        "(tree, its state split over the devices: Trainer(shard_optimizer=True))")
    parser.add_argument("--settings", default="default", metavar='"default;GROUP.FIELD=VALUE,...;..."',
                        help="kernel settings to time the pallas variant under, ';'-separated (each on top of the "
                             "kernel flags below; 'default': the flags' settings alone)")
    parser.add_argument("--rounds", type=int, default=1, help="time the whole grid this many times, in turn")
    add_kernel_flags(parser)
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds is a count, at least 1; got {args.rounds}")
    if args.warmup < 1 or args.repeats < 1:
        parser.error(f"--warmup and --repeats are step counts, at least 1; got {args.warmup} and {args.repeats}")
    if args.context < 1:
        parser.error(f"--context is a device count, at least 1; got {args.context}")
    base_settings = kernel_settings_from(args)
    settings = [(label.strip() or "default", parse_variant(label, base_settings)) for label in args.settings.split(";")]
    layouts = args.optimizers.split(",")
    if not set(layouts) <= {"tree", "flat", "zero1"}:
        parser.error(f"--optimizers takes a comma-separated list of tree, flat and zero1; got {args.optimizers!r}")

    device = jax.devices()[0]
    results = []
    counts = [int(c) for c in args.devices.split(",")]
    if max(counts) > jax.device_count():
        raise SystemExit(f"error: --devices asks for {max(counts)} devices, this machine has {jax.device_count()}")
    for round_ in range(args.rounds):
        for seq_len, name, label, kernel_settings in timing_grid(args.seq_lens, args.variants, settings):
            for count, layout in ((c, o) for c in counts for o in layouts):
                try:
                    context = args.context if count % args.context == 0 else 1
                    row = time_variant(name, seq_len, args.batch_size, args.grad_accum_every, args.repeats,
                                       args.dtype, count, kernel_settings, layout == "flat", layout == "zero1",
                                       context, args.remat, args.warmup)
                    results.append(dict(row, settings=label, round=round_))
                except NotImplementedError as e:  # a backend this version does not have
                    print(f"skipped {name}: {e}")
                except Exception as e:  # e.g. out of memory: report it and go on with the other variants
                    print(f"failed {name} at T={seq_len}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    print(f"\nseed model train step on {device.device_kind} ({jax.__version__}), {args.dtype}, "
          f"batch {args.batch_size} per data shard x accum {args.grad_accum_every}, remat {args.remat}")
    print(f"{'variant':<10} {'opt':>5} {'T':>8} {'devices':>7} {'context':>7} {'batch':>6} {'ms/step':>9} "
          f"{'steps/s':>8} {'tokens/s':>10} {'scaling':>8} {'back-to-back ms':>15} {'peak GiB':>8}  round  settings")
    for r in results:
        one = next((o for o in results if o["variant"] == r["variant"] and o["seq_len"] == r["seq_len"]
                    and o["optimizer"] == r["optimizer"] and o["settings"] == r["settings"]
                    and o["round"] == r["round"] and o["devices"] == 1), None)
        scaling = f"{r['tokens_per_s'] / one['tokens_per_s']:.2f}x" if one else "-"
        peak = "-" if r["peak_gib_per_device"] is None else f"{r['peak_gib_per_device']:.2f}"
        print(f"{r['variant']:<10} {r['optimizer']:>5} {r['seq_len']:>8} {r['devices']:>7} {r['context']:>7} "
              f"{r['global_batch']:>6} {r['ms_per_step']:>9.2f} {r['steps_per_s']:>8.2f} {r['tokens_per_s']:>10,.0f} "
              f"{scaling:>8} {r['pipelined_ms_per_step']:>15.2f} {peak:>8}  {r['round']:>5}  {r['settings']}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.date.today().isoformat()
    path = out / f"{args.name or 'train_step-' + stamp}.json"
    path.write_text(json.dumps(dict(device=device.device_kind, jax=jax.__version__, date=stamp,
                                    kernel_settings=repr(base_settings),
                                    settings={label: repr(ks) for label, ks in settings}, results=results), indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

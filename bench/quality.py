"""Does NSA match full attention? Train the seed model both ways on the same data and compare.

    python -m bench.quality --data_path ../shared/data/tinyshakespeare.txt --seq_len 512 --steps 2000

Both runs use the same model size, seed, initial data order, steps and optimizer; NSA runs on
the Pallas kernels where available (--nouse_pallas_nsa: the pure-JAX reference). Validation bits
per byte are the mean over the same fixed validation batches, recorded against steps and against
training wall-clock (evaluation time excluded). Writes a JSON of the points and a PNG of both
curves (bits per byte vs step, and vs seconds) to --out.

A variant may name its activation dtype and seed (default --dtype, --seed), e.g. bfloat16 against
float32, with a second float32 seed for the run-to-run noise:

    python -m bench.quality --data_path ../shared/data/tinyshakespeare.txt \
        --variants nsa,nsa:bfloat16,nsa:seed=1
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import time
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np
from flax import nnx

import kernels
from nsa_jax import data
from nsa_jax.config import ModelConfig
from nsa_jax.training import LN2, Trainer, make_optimizer


class Variant(NamedTuple):
    name: str  # as given: "nsa", "dense", "nsa:bfloat16", "nsa:seed=1", ...
    sparse: bool
    dtype: str
    seed: int


def parse_variants(text: str, dtype: str, seed: int) -> list[Variant]:
    """`kind[:dtype][:seed=N]`, comma-separated; kind nsa or dense."""
    variants = []
    for name in (v.strip() for v in text.split(",")):
        if not name:
            continue
        kind, *options = name.split(":")
        v_dtype, v_seed = dtype, seed
        for option in options:
            if option in ("float32", "bfloat16"):
                v_dtype = option
            elif option.startswith("seed=") and option[5:].isdigit():
                v_seed = int(option[5:])
            else:
                kind = "?"
        if kind not in ("nsa", "dense"):
            raise SystemExit(f"error: --variants takes nsa or dense, each optionally :float32 or :bfloat16 and "
                             f":seed=N, got {name!r}")
        variants.append(Variant(name, kind == "nsa", v_dtype, v_seed))
    if not variants or len({v.name for v in variants}) < len(variants):
        raise SystemExit(f"error: --variants needs at least one run, each named once, got {text!r}")
    return variants


def train_and_track(config: ModelConfig, args, use_pallas_nsa: bool | None, train_bytes, valid_batches,
                    on_point=lambda result: None, dtype: str | None = None, seed: int | None = None) -> dict:
    """Train and evaluate; `on_point` gets the partial result after every evaluation (so a run
    stopped early still leaves its curve on disk). dtype, seed: default --dtype, --seed."""
    dtype = args.dtype if dtype is None else dtype
    seed = args.seed if seed is None else seed
    trainer = Trainer(config.build(nnx.Rngs(seed), use_pallas_nsa=use_pallas_nsa, dtype=dtype),
                      make_optimizer(args.learning_rate))
    state = trainer.init_state()
    sampler = data.CropSampler(train_bytes, args.seq_len, seed=seed)  # same order for every variant of one seed
    valid = [trainer.eval_batch(b) for b in valid_batches]

    def evaluate(params) -> float:
        return float(np.mean([float(trainer.eval_step(params, b)) for b in valid])) / LN2

    # compile outside the clock
    warm_state = trainer.train_step(jax.tree.map(lambda x: x.copy(), state),
                                    trainer.train_batches(sampler.sample(args.grad_accum_every, args.batch_size)))
    jax.block_until_ready(warm_state)
    sampler = data.CropSampler(train_bytes, args.seq_len, seed=seed)
    evaluate(state.params)

    points = [dict(step=0, seconds=0.0, bits_per_byte=evaluate(state.params))]
    eval_seconds, start = 0.0, time.perf_counter()
    for step in range(1, args.steps + 1):
        state, metrics = trainer.train_step(
            state, trainer.train_batches(sampler.sample(args.grad_accum_every, args.batch_size)))
        if step % args.eval_every == 0 or step == args.steps:
            jax.block_until_ready(metrics)
            eval_start = time.perf_counter()
            train_seconds = eval_start - start - eval_seconds
            points.append(dict(step=step, seconds=train_seconds, bits_per_byte=evaluate(state.params)))
            eval_seconds += time.perf_counter() - eval_start
            print(f"  step {step}: valid {points[-1]['bits_per_byte']:.4f} bits/byte, {train_seconds:.1f} s",
                  flush=True)
            on_point(summary(points, args, dtype, seed))
    return summary(points, args, dtype, seed)


def summary(points: list[dict], args, dtype: str, seed: int) -> dict:
    last = points[-1]
    tokens = last["step"] * args.batch_size * args.grad_accum_every * args.seq_len
    return dict(points=points, dtype=dtype, seed=seed, steps=last["step"], final_bits_per_byte=last["bits_per_byte"],
                best_bits_per_byte=min(p["bits_per_byte"] for p in points), train_seconds=last["seconds"],
                tokens_per_s=tokens / last["seconds"] if last["seconds"] else 0.0)


def plot(results: dict, title: str, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in results.items():
        steps = [p["step"] for p in r["points"]]
        secs = [p["seconds"] for p in r["points"]]
        bpb = [p["bits_per_byte"] for p in r["points"]]
        axes[0].plot(steps, bpb, label=name)
        axes[1].plot(secs, bpb, label=name)
    axes[0].set_xlabel("step")
    axes[1].set_xlabel("training seconds")
    for ax in axes:
        ax.set_ylabel("validation bits per byte")
        ax.grid(alpha=0.3)
        ax.legend()
        low = min(p["bits_per_byte"] for r in results.values() for p in r["points"])
        ax.set_ylim(low * 0.95, low * 1.6)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_path", required=True)
    parser.add_argument("--valid_fraction", type=float, default=0.05)
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--eval_every", type=int, default=100)
    parser.add_argument("--eval_batches", type=int, default=8)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--grad_accum_every", type=int, default=4)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nouse_pallas_nsa", action="store_true", help="NSA on the pure-JAX reference")
    parser.add_argument("--model", default="seed", help="'seed' (the seed's model) or 'tiny' (for tests)")
    parser.add_argument("--out", default="docs")
    parser.add_argument("--name", default=None, help="file stem (default quality-T<seq_len>)")
    parser.add_argument("--variants", default="nsa,dense",
                        help="which runs, comma-separated: nsa or dense, optionally :float32 or :bfloat16 and "
                             ":seed=N (run them on two GPUs at once, then --merge)")
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                        help="combine the results of earlier runs (e.g. one per GPU) into one JSON + plot")
    args = parser.parse_args()
    if args.merge:
        return merge(args)

    base = ModelConfig()
    if args.model == "tiny":
        base = dataclasses.replace(base, dim=32, depth=1, heads=2, kv_heads=1, dim_head=16, sliding_window_size=8,
                                   compress_block_size=8, compress_block_sliding_stride=8, selection_block_size=8,
                                   num_selected_blocks=1)
    train_bytes, valid_bytes = data.load_corpus(args.data_path, args.valid_fraction)
    valid_sampler = data.CropSampler(valid_bytes, args.seq_len, seed=args.seed + 1)
    valid_batches = [valid_sampler.sample(args.batch_size) for _ in range(args.eval_batches)]

    variants = parse_variants(args.variants, args.dtype, args.seed)
    device = jax.devices()[0].device_kind
    stem = args.name or f"quality-T{args.seq_len}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(device=device, jax=jax.__version__, date=datetime.date.today().isoformat(), data=args.data_path,
                nsa_backend=kernels.backend_name(False if args.nouse_pallas_nsa else None),
                args=vars(args))
    results = {}

    def save(name=None, partial=None):
        if name is not None:
            results[name] = partial
        (out / f"{stem}.json").write_text(json.dumps(dict(meta, results=results), indent=2))

    for v in variants:
        print(f"{v.name}: training {args.steps} steps at seq_len {args.seq_len} on {device} ({v.dtype}, seed {v.seed})",
              flush=True)
        config = dataclasses.replace(base, use_sparse_attn=v.sparse)
        save(v.name, train_and_track(config, args, False if args.nouse_pallas_nsa else None, train_bytes,
                                     valid_batches, on_point=lambda r, name=v.name: save(name, r), dtype=v.dtype,
                                     seed=v.seed))
    report(dict(meta, results=results), out / stem)


def merge(args) -> None:
    """One JSON and plot from several runs' JSONs (same seq_len and steps)."""
    runs = [json.loads(Path(path).read_text()) for path in args.merge]
    combined = dict(runs[0], results={})
    for run in runs:
        combined["results"].update(run["results"])
    combined["merged_from"] = list(args.merge)
    stem = args.name or f"quality-T{combined['args']['seq_len']}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(combined, indent=2))
    report(combined, out / stem)


def report(run: dict, stem: Path) -> None:
    """Plot and print the table of a (possibly merged) run."""
    results, a = run["results"], run["args"]
    title = f"{a['model']} model, T={a['seq_len']}, {Path(a['data_path']).name}, {run['device']}"
    plotted = plot(results, title, stem.with_suffix(".png"))
    print(f"\n{title}")
    first = next(iter(results), None)
    print(f"{'':16} {'steps':>6} {'final bpb':>10} {'best bpb':>9} {'vs first':>9} {'tokens/s':>10} {'train s':>8}")
    for name, r in results.items():
        diff = r["final_bits_per_byte"] - results[first]["final_bits_per_byte"]
        print(f"{name:16} {r['steps']:>6} {r['final_bits_per_byte']:>10.4f} {r['best_bits_per_byte']:>9.4f} "
              f"{diff:>+9.4f} {r['tokens_per_s']:>10,.0f} {r['train_seconds']:>8.1f}")
    if {"nsa", "dense"} <= results.keys():
        nsa, dense = results["nsa"], results["dense"]
        print(f"NSA / dense bits per byte at equal steps: {nsa['final_bits_per_byte'] / dense['final_bits_per_byte']:.4f}")
        # at equal wall-clock: each curve at the time the faster run finished
        t = min(nsa["train_seconds"], dense["train_seconds"])
        at = {k: _at_seconds(r["points"], t) for k, r in (("nsa", nsa), ("dense", dense))}
        print(f"at {t:.0f} training seconds: NSA {at['nsa']:.4f}, dense {at['dense']:.4f} bits per byte")
    print(f"wrote {stem.with_suffix('.json')}" + (f" and {stem.with_suffix('.png')}" if plotted else ""))


def _at_seconds(points: list[dict], t: float) -> float:
    """The last evaluated bits per byte at or before training time t."""
    return [p["bits_per_byte"] for p in points if p["seconds"] <= t + 1e-9][-1]


if __name__ == "__main__":
    main()

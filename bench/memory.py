"""Peak device memory and time of one seed-model train step against the sequence length.

    python -m bench.memory                                   # 8k .. 1M, remat none and block
    python -m bench.memory --lengths 8192,65536 --remat none --repeats 3

The seed model (dim 512, depth 6, NSA as in configs/enwik8.flags) on the Pallas path, batch 1, no
gradient accumulation, bf16 activations (`--dtype`), one train step (forward, backward, clipping,
Adam) per length. Every (length, remat) point runs in a fresh process (in one process, the
allocator keeps the regions of the shorter lengths and a longer one fails for fragmentation),
lengths ascending; a length that does not fit ends that mode's series (the rows say "out of
memory"). The children may use 95% of the device memory (XLA_PYTHON_CLIENT_MEM_FRACTION). Peak
memory is the device allocator's `peak_bytes_in_use` after the length's steps. Time: median
of the timed steps after a warm-up step (compilation excluded), each ended by
`block_until_ready`. Prints a table, writes bench/results/memory-<date>.json and, with
--plot, a log-log PNG (GiB against T).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LENGTHS = (8192, 16384, 32768, 65536, 131072, 262144, 524288, 1048576)


def measure_one(n: int, remat: str, dtype: str, repeats: int, budget_s: float, batch: int) -> dict:
    """Peak memory and median time of the seed model's train step at length n (this process)."""
    import jax
    import numpy as np
    from flax import nnx

    from nsa_jax import sharding
    from nsa_jax.config import ModelConfig
    from nsa_jax.training import Trainer, make_optimizer

    row = dict(seq_len=n, batch_size=batch, remat=remat, dtype=dtype)
    try:
        model = ModelConfig().build(nnx.Rngs(0), use_pallas_nsa=True, dtype=dtype, remat=remat)
        trainer = Trainer(model, make_optimizer(1e-4), sharding.make_mesh(jax.devices()[:1]))
        state = trainer.init_state()
        rng = np.random.default_rng(0)
        batches = [trainer.train_batches(rng.integers(0, 256, (1, batch, n + 1), dtype=np.int32)) for _ in range(2)]
        state, metrics = trainer.train_step(state, batches[0])  # compile + warm-up
        jax.block_until_ready(metrics)
        times = []
        start = time.perf_counter()
        while len(times) < repeats and (len(times) < 2 or time.perf_counter() - start < budget_s):
            t0 = time.perf_counter()
            state, metrics = trainer.train_step(state, batches[len(times) % 2])
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t0)
        peak = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
        median = statistics.median(times)
        row.update(ms_per_step=1e3 * median, tokens_per_s=batch * n / median,
                   peak_gib=None if peak is None else peak / 2**30, loss=float(metrics["loss"]), timed_steps=len(times))
    except Exception as exc:  # out of memory (or a compile failure): recorded, and the series stops
        row.update(error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}",
                   out_of_memory="RESOURCE_EXHAUSTED" in str(exc) or "out of memory" in str(exc).lower())
    return row


def plot(rows: list[dict], meta: dict, path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", flush=True)
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for remat in sorted({r["remat"] for r in rows}):
        pts = [(r["seq_len"], r["peak_gib"]) for r in rows if r["remat"] == remat and r.get("peak_gib")]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=f"nsa-jax, remat={remat}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("sequence length T (tokens, batch 1)")
    ax.set_ylabel("peak device memory (GiB)")
    ax.set_title(f"seed model train step, {meta['dtype']}, {meta['device']}, {meta['date']}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def table(rows: list[dict], meta: dict) -> str:
    lines = [f"{meta['device']}, jax {meta['jax']}, {meta['date']}: seed model, batch 1, {meta['dtype']}, Pallas",
             "| T | remat | peak GiB | ms / step | tokens/s |", "|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["remat"], r["seq_len"])):
        if "error" in r:
            what = "out of memory" if r.get("out_of_memory") else r["error"]
            lines.append(f"| {r['seq_len']:,} | {r['remat']} | {what} | | |")
        else:
            peak = "n/a" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
            lines.append(f"| {r['seq_len']:,} | {r['remat']} | {peak} | {r['ms_per_step']:.0f} | "
                         f"{r['tokens_per_s']:,.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default=",".join(map(str, LENGTHS)), help="comma list of T")
    parser.add_argument("--remat", default="none,block", help="comma list of remat modes (one process each)")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per length (at least 2)")
    parser.add_argument("--budget_s", type=float, default=20.0, help="stop timing a length after this long")
    parser.add_argument("--max_length_no_remat", type=int, default=None,
                        help="skip lengths above this without remat (known not to fit)")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/memory-<date>.json)")
    parser.add_argument("--plot", default=None, help="PNG path for the GiB-vs-T plot")
    parser.add_argument("--point", default=None, help=argparse.SUPPRESS)  # child: "T,remat", a JSON row to stdout
    args = parser.parse_args()
    lengths = sorted(int(x) for x in args.lengths.split(",") if x)

    if args.point is not None:
        n, remat = args.point.split(",")
        row = measure_one(int(n), remat, args.dtype, max(2, args.repeats), args.budget_s, args.batch_size)
        print("ROW " + json.dumps(row), flush=True)
        return

    import jax

    device = jax.devices()[0]
    meta = dict(date=datetime.date.today().isoformat(), device=device.device_kind, platform=device.platform,
                jax=jax.__version__, dtype=args.dtype, batch_size=args.batch_size,
                model="seed (configs/enwik8.flags), Pallas path")
    del jax, device  # the children own the device
    out = args.out or str(ROOT / "bench" / "results" / f"memory-{meta['date']}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    rows: list[dict] = []
    env = dict(os.environ, XLA_PYTHON_CLIENT_MEM_FRACTION=os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", ".95"))
    for remat in args.remat.split(","):
        for n in lengths:
            if remat == "none" and args.max_length_no_remat is not None and n > args.max_length_no_remat:
                continue
            cmd = [sys.executable, "-m", "bench.memory", "--point", f"{n},{remat}", "--dtype", args.dtype,
                   "--batch_size", str(args.batch_size), "--repeats", str(args.repeats), "--budget_s", str(args.budget_s)]
            child = subprocess.run(cmd, cwd=ROOT, text=True, stdout=subprocess.PIPE, env=env)
            found = [line for line in child.stdout.splitlines() if line.startswith("ROW ")]
            row = json.loads(found[-1][4:]) if found else dict(
                seq_len=n, batch_size=args.batch_size, remat=remat, dtype=args.dtype,
                error=f"the child process exited {child.returncode} without a result")
            rows.append(row)
            print(json.dumps(row), flush=True)
            with open(out, "w") as f:
                json.dump(dict(meta=meta, rows=rows), f, indent=1)
            if "error" in row:
                break
    print("\n" + table(rows, meta))
    print(f"\nwrote {out}")
    if args.plot and plot(rows, meta, args.plot):
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()

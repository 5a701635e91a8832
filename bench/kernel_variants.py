"""Time a branch of the NSA core under several `KernelSettings`, side by side, with each kernel's GPU time.

    python -m bench.kernel_variants                      # selected attention, fla config, T = 65536
    python -m bench.kernel_variants --branch core --lengths 8192,65536 \\
        --variants "default;selected.dkv_chunk=2;flash.num_warps=8,flash.num_warps_fwd=8"

A variant is a comma list of `group.field=value` (group: selected, selection, flash; or
sliding_impl=...), variants separated by ";", "default" the library's settings. Per variant,
configuration (`bench.core.CONFIGS`, batch 1, bf16 or `--dtype float32`, causal) and length: the
branch's forward and forward+backward (`bench.core.branch_fns`; medians of --reps calls after a warm-up,
compilation excluded, ended by block_until_ready), then one more profiled forward+backward
whose GPU kernels (`jax.profiler`; Pallas kernels are named nsa_*) give the per-kernel
milliseconds (on a GPU only). Prints a table and writes
bench/results/kernel_variants-<date>.json. This is how the per-query selected-attention
settings were chosen (BENCHMARKS.md, "Selected attention at the paper's group size").
"""

from __future__ import annotations

import argparse
import collections
import datetime
import os
import tempfile

import jax
import jax.numpy as jnp

from bench.core import CONFIGS, branch_fns, fwd_and_bwd, make_inputs, measure_grid, timed
from bench.kernel_flags import parse_variant  # noqa: F401  (re-exported)
from bench.profile_step import device_events
from kernels.settings import KernelSettings

DEFAULT_VARIANTS = "default;selected.store_dlogits=0;selected.dkv_chunk=2"


def kernel_ms(fn, args, steps: int = 3) -> dict[str, float]:
    """GPU milliseconds per call of every kernel fn(*args) runs, largest first (empty without a GPU)."""
    jax.block_until_ready(fn(*args))
    trace_dir = tempfile.mkdtemp(prefix="kernel_variants_")
    with jax.profiler.trace(trace_dir):
        for _ in range(steps):
            jax.block_until_ready(fn(*args))
    per_kernel: dict[str, float] = collections.defaultdict(float)
    for name, _, us, _ in device_events(trace_dir):
        per_kernel[name] += us / steps / 1e3
    return dict(sorted(per_kernel.items(), key=lambda kv: -kv[1]))


def measure(name: str, n: int, branch: str, label: str, settings: KernelSettings, reps: int, budget_s: float,
            profile: bool, dtype: str = "bfloat16") -> dict:
    cfg = CONFIGS[name]
    inputs = make_inputs(cfg, n, dtype=jnp.dtype(dtype))
    fwd, grad, ct = fwd_and_bwd(branch_fns(cfg, settings)[branch], inputs)
    row = dict(config=name, T=n, branch=branch, variant=label,
               fwd_ms=timed(fwd, inputs, reps, budget_s), fwd_bwd_ms=timed(grad, (inputs, ct), reps, budget_s))
    if profile:
        kernels_ms = kernel_ms(grad, (inputs, ct))
        row["gpu_ms"] = sum(kernels_ms.values())
        row["kernels_ms"] = {k: round(v, 4) for k, v in kernels_ms.items() if v >= 0.01}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["fla"], choices=list(CONFIGS))
    parser.add_argument("--branch", default="selected",
                        choices=["core", "compressed", "selection", "selected", "selected_tiled", "sliding"])
    parser.add_argument("--lengths", default="65536", help="comma list of T")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help='";"-separated, e.g. "default;flash.num_warps=8"')
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                        help="q, k, v (float32: the seed's train step, its matmuls in TF32 on the GPU)")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--budget_s", type=float, default=2.0, help="stop repeating after this long (>= 3 runs)")
    parser.add_argument("--no_profile", action="store_true", help="skip the per-kernel profile")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/kernel_variants-<date>.json)")
    args = parser.parse_args()
    variants = {text.strip() or "default": parse_variant(text) for text in args.variants.split(";")}

    device = jax.devices()[0]
    profile = not args.no_profile and device.platform == "gpu"
    meta = dict(date=datetime.date.today().isoformat(), device=device.device_kind, jax=jax.__version__, batch=1,
                dtype=args.dtype, branch=args.branch, configs={k: CONFIGS[k] for k in args.configs})
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"kernel_variants-{meta['date']}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    rows = measure_grid(args.configs, [int(x) for x in args.lengths.split(",")], variants,
                        lambda name, n, label, settings: measure(name, n, args.branch, label, settings, args.reps,
                                                                 args.budget_s, profile, args.dtype),
                        out, meta, branch=args.branch)

    fmt = lambda r, key: f"{r[key]:.2f}" if key in r else "n/a"  # noqa: E731
    print(f"\n{meta['device']}, jax {meta['jax']}, {meta['date']}: {args.branch}, batch 1, {args.dtype}, causal "
          "(ms, median)")
    print("| config | T | variant | fwd | fwd+bwd | Pallas kernels (GPU ms, fwd+bwd) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        top = ", ".join(f"{k[4:]} {v:.2f}" for k, v in r.get("kernels_ms", {}).items() if k.startswith("nsa_"))
        print(f"| {r['config']} | {r['T']} | {r['variant']} | {fmt(r, 'fwd_ms')} | {fmt(r, 'fwd_bwd_ms')} | "
              f"{top or r.get('error', '')} |")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()

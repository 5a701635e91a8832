"""Time the selection kernels (`kernels.selection`) under several `SelectionSettings`, side by side.

    python -m bench.selection_variants                                   # fla and seed, T = 65536
    python -m bench.selection_variants --configs fla --lengths 16384,65536 \\
        --variants "default;num_warps_dbk=4;rows=128,num_warps=8"

Per variant and configuration (`bench.core.CONFIGS`, batch 1, bf16 inputs, causal): the forward
kernel alone, the backward kernels alone (bf16 operands, as training runs them), and the whole selection branch (its XLA glue included: the mean over a
group's heads, the block keys) forward and forward+backward. Each is the median of --reps calls
after a warm-up (compilation excluded), ended by block_until_ready. Prints a table and writes
bench/results/selection_variants-<date>.json. A variant is a comma list of SelectionSettings
fields (`name=value`); variants are separated by ";"; "default" is the library's settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import os

import jax
import jax.numpy as jnp

import kernels
from bench.core import CONFIGS, branch_fns, fwd_and_bwd, make_inputs, measure_grid, timed
from bench.kernel_flags import replace_fields
from kernels import selection
from kernels.settings import SelectionSettings
from nsa_jax import segments as seg

DEFAULT_VARIANTS = "default;num_warps_dbk=4;num_warps_dbk=8;block_keys=128;rows_dbk=32"


def parse_variant(text: str) -> SelectionSettings:
    """'name=value,...' -> SelectionSettings (ints where the default is an int)."""
    if text.strip() in ("", "default"):
        return SelectionSettings()
    return replace_fields(SelectionSettings(), text.split(","))


def kernel_inputs(cfg: dict, n: int, settings: SelectionSettings):
    """The selection kernels' static config and padded inputs (qs, bk) for the bench inputs."""
    q, k, _, ck, _ = make_inputs(cfg, n)
    b, _, h, d = q.shape
    kh = k.shape[2]
    if cfg.get("mean_pool"):  # fla: compressed keys are mean-pooled blocks (after the memory entry)
        ck = jnp.concatenate([ck[:, :1], k.reshape(b, n // cfg["stride"], cfg["stride"], kh, d).mean(axis=2)], axis=1)
    nc = ck.shape[1] - 1
    sb, stride = cfg["selection_block"], cfg["stride"]
    nb = seg.block_counts(nc, stride, sb, False)
    c = selection._config(n, nc, nb, 1, min(cfg["num_selected"], nc, nb), max(16, d), kh, b, stride=stride, sb=sb,
                          causal=True, interpolated=False, scale=d**-0.5, settings=settings)
    qs = selection.pad_axis(q.astype(jnp.float32).reshape(b, n, kh, h // kh, d).mean(axis=3, keepdims=True),
                            1, c.n_pad)
    bk = selection.pad_axis(selection._block_keys(ck[:, 1:], nc, stride, sb, False), 1, c.nb_pad)
    return c, selection._static_layout(c, b), qs, bk


def measure(name: str, n: int, label: str, settings: SelectionSettings, reps: int, budget_s: float) -> dict:
    cfg = CONFIGS[name]
    c, layout, qs, bk = kernel_inputs(cfg, n, settings)
    forward = jax.jit(functools.partial(selection._forward, c, layout))
    values, indices, lse = forward(qs, bk)
    dvalues = jax.random.normal(jax.random.key(2), values.shape, jnp.float32)
    backward = jax.jit(functools.partial(selection._backward, c, layout))
    residuals = (qs, bk, values, indices, lse, dvalues)  # float32, as the forward's (`selection._select_fwd`)
    branch = branch_fns(cfg, kernels.KernelSettings(selection=settings))["selection"]
    inputs = make_inputs(cfg, n)
    fwd, grad, ct = fwd_and_bwd(branch, inputs)
    return dict(config=name, T=n, variant=label, settings=dataclasses.asdict(settings),
                kernel_fwd_ms=timed(forward, (qs, bk), reps, budget_s),
                kernel_bwd_ms=timed(backward, residuals, reps, budget_s),
                fwd_ms=timed(fwd, inputs, reps, budget_s), fwd_bwd_ms=timed(grad, (inputs, ct), reps, budget_s))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["fla", "seed"], choices=list(CONFIGS))
    parser.add_argument("--lengths", default="65536", help="comma list of T")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help='";"-separated, e.g. "default;num_warps=8"')
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--budget_s", type=float, default=2.0, help="stop repeating after this long (>= 3 runs)")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/selection_variants-<date>.json)")
    args = parser.parse_args()
    variants = {text.strip() or "default": parse_variant(text) for text in args.variants.split(";")}

    device = jax.devices()[0]
    meta = dict(date=datetime.date.today().isoformat(), device=device.device_kind, jax=jax.__version__, batch=1,
                dtype="bfloat16", configs={k: CONFIGS[k] for k in args.configs})
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"selection_variants-{meta['date']}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    rows = measure_grid(args.configs, [int(x) for x in args.lengths.split(",")], variants,
                        lambda name, n, label, settings: measure(name, n, label, settings, args.reps, args.budget_s),
                        out, meta)

    fmt = lambda r, key: f"{r[key]:.2f}" if key in r else "n/a"  # noqa: E731
    print(f"\n{meta['device']}, jax {meta['jax']}, {meta['date']}: selection, batch 1, bf16, causal (ms, median)")
    print("| config | T | variant | kernel fwd | kernel bwd | selection fwd | selection fwd+bwd |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['T']} | {r['variant']} | {fmt(r, 'kernel_fwd_ms')} | {fmt(r, 'kernel_bwd_ms')} | "
              f"{fmt(r, 'fwd_ms')} | {fmt(r, 'fwd_bwd_ms')} |" + (f" {r['error']}" if "error" in r else ""))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()

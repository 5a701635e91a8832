"""Time the NSA attention core (Pallas backend) against dense causal cuDNN attention.

The core is what `SparseAttention` hands to the backend, given q, k, v and the compressed
ck, cv (with one memory entry): compressed attention + block selection (diff top-k gates)
+ selected attention + sliding window, summed. Forward, and forward + backward (gradients
of q, k, v, ck, cv), batch 1, bf16, causal, for two configurations:

  paper: 64 query heads, 4 kv heads, head dim 128, compress block 32 stride 16,
         selection block 64, 16 selected, window 512
  seed:  8 query heads, 4 kv heads, head dim 64, compress block 16 stride 16,
         selection block 16, 4 selected, window 64
  fla:   fla-core's NSA benchmark: 64 query heads, 4 kv heads, head dim 128, compression by
         mean-pooling k and v over blocks of 64 (inside the timed core, plus our one memory
         entry), selection block 64, 16 selected, compressed and selected branches gated per
         head (sigmoid gates, differentiated), no sliding window
  fla_nodiff: fla without the diff-top-k gates on the selected blocks, so no gradient flows
         through the selection: the gradients fla's parallel_nsa computes

Each branch is also timed alone (the sliding window with both the Pallas kernel and cuDNN;
"selected" includes the selection that produces its indices).
Median of repeated runs after warm-up, `block_until_ready` around each. Prints a table and
writes JSON to bench/results/ (or --out).

    python -m bench.core                 # all lengths 4k..64k, branches at 64k
    python -m bench.core --lengths 4096 --branch_lengths 4096 --reps 5
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import time
import traceback

import jax
import jax.numpy as jnp

import kernels
from nsa_jax import reference

CONFIGS = {
    "paper": dict(heads=64, kv_heads=4, dim_head=128, compress_block=32, stride=16, selection_block=64,
                  num_selected=16, window=512),
    "seed": dict(heads=8, kv_heads=4, dim_head=64, compress_block=16, stride=16, selection_block=16,
                 num_selected=4, window=64),
    "fla": dict(heads=64, kv_heads=4, dim_head=128, compress_block=64, stride=64, selection_block=64,
                num_selected=16, window=0, mean_pool=True, gates=True),
}
CONFIGS["fla_nodiff"] = dict(CONFIGS["fla"], diff_topk=False)
LENGTHS = [4096, 8192, 16384, 32768, 65536]


def make_inputs(cfg: dict, n: int, seed: int = 0, dtype=jnp.bfloat16):
    h, kh, d, cs = cfg["heads"], cfg["kv_heads"], cfg["dim_head"], cfg["stride"]
    keys = jax.random.split(jax.random.key(seed), 6)
    shapes = [(1, n, h, d), (1, n, kh, d), (1, n, kh, d), (1, 1 + n // cs, kh, d), (1, 1 + n // cs, kh, d)]
    return [jax.random.normal(key, s, jnp.float32).astype(dtype) for key, s in zip(keys, shapes)]


def branch_fns(cfg: dict, settings: kernels.KernelSettings = kernels.KernelSettings()):
    """The core's pieces as functions of (q, k, v, ck, cv), on the Pallas backend with `settings`."""
    backend = kernels.get_backend("pallas", settings)
    tiled = kernels.get_backend("pallas", dataclasses.replace(
        settings, selected=dataclasses.replace(settings.selected, impl="tiled")))
    d = cfg["dim_head"]
    scale = d**-0.5
    sel_kw = dict(num_mem=1, stride=cfg["stride"], causal=True, share_heads=True,
                  num_selected=cfg["num_selected"], selection_block_size=cfg["selection_block"], scale=scale)
    slide_kw = dict(window=cfg["window"], causal=True, scale=scale)

    def pooled(k, v, ck, cv):
        """fla's compression: the memory entry, then k and v averaged over blocks of `stride`."""
        if not cfg.get("mean_pool"):
            return ck, cv
        b, n, kh, _ = k.shape
        pool = lambda x: x.reshape(b, n // cfg["stride"], cfg["stride"], kh, d).mean(axis=2)  # noqa: E731
        return (jnp.concatenate([ck[:, :1], pool(k)], axis=1), jnp.concatenate([cv[:, :1], pool(v)], axis=1))

    def compressed(q, k, v, ck, cv):
        ck, cv = pooled(k, v, ck, cv)
        return backend.compressed_attention(q, ck, cv, num_mem=1, stride=cfg["stride"], causal=True, scale=scale)

    def selection(q, k, v, ck, cv):
        ck, _ = pooled(k, v, ck, cv)
        values, _ = backend.select_blocks(q, ck, **sel_kw)
        return values

    def selected(q, k, v, ck, cv, backend=backend):
        ck, _ = pooled(k, v, ck, cv)
        values, indices = backend.select_blocks(q, ck, **sel_kw)
        gates = reference.straight_through_gates(values) if cfg.get("diff_topk", True) else None
        return backend.selected_attention(q, k, v, indices, reference.valid_selection(values), gates,
                                          block_size=cfg["selection_block"], causal=True, scale=scale)

    def selected_tiled(q, k, v, ck, cv):
        return selected(q, k, v, ck, cv, backend=tiled)

    def sliding(q, k, v, ck, cv):
        return backend.sliding_window_attention(q, k, v, **slide_kw)

    def core(q, k, v, ck, cv):
        if cfg.get("gates"):  # per-head gates of the compressed and selected branches, as fla takes them
            g_cmp, g_slc = jax.nn.sigmoid(q[..., :1]), jax.nn.sigmoid(q[..., 1:2])
            out = g_cmp * compressed(q, k, v, ck, cv) + g_slc * selected(q, k, v, ck, cv)
        else:
            out = compressed(q, k, v, ck, cv) + selected(q, k, v, ck, cv)
        return out + sliding(q, k, v, ck, cv) if cfg["window"] > 0 else out

    return dict(core=core, compressed=compressed, selection=selection, selected=selected, sliding=sliding,
                selected_tiled=selected_tiled)


def dense(q, k, v, ck, cv):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")


def timed(fn, args, reps: int, budget_s: float) -> float:
    """Median milliseconds of fn(*args) after a warm-up (compilation) call."""
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    times = []
    start = time.perf_counter()
    while len(times) < reps and (len(times) < 3 or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure_grid(configs, lengths, variants: dict, measure, out: str, meta: dict, **error_fields) -> list[dict]:
    """Rows of measure(config name, T, variant label, settings) for every configuration, length and
    variant; one that raises (e.g. a tile over the shared-memory limit) becomes an error row and the
    run goes on. The JSON at `out` is rewritten after every row, so a killed run keeps its rows."""
    rows = []
    for name in configs:
        for n in lengths:
            for label, settings in variants.items():
                try:
                    row = measure(name, n, label, settings)
                except Exception as exc:
                    row = dict(config=name, T=n, **error_fields, variant=label,
                               error=f"{type(exc).__name__}: {str(exc)[:300]}")
                    traceback.print_exc(limit=2)
                rows.append(row)
                with open(out, "w") as f:
                    json.dump(dict(meta=meta, rows=rows), f, indent=1)
                print(json.dumps(row), flush=True)
    return rows


def fwd_and_bwd(fn, inputs):
    """(jitted forward, jitted gradient of <fn(inputs), ct> in all inputs, a random ct)."""
    forward = jax.jit(fn)
    out = jax.eval_shape(fn, *inputs)
    ct = jax.random.normal(jax.random.key(1), out.shape, jnp.float32).astype(out.dtype)

    def loss(args, ct):
        return jnp.sum(fn(*args).astype(jnp.float32) * ct.astype(jnp.float32))

    return forward, jax.jit(jax.grad(loss)), ct


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=LENGTHS)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS))
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--budget_s", type=float, default=3.0, help="stop repeating after this long (>= 3 runs)")
    parser.add_argument("--branch_lengths", type=int, nargs="*", default=[65536],
                        help="lengths at which each branch is also timed alone")
    parser.add_argument("--branches", nargs="*", default=None,
                        help="which branches to time alone (default all): compressed, selection, selected, "
                             "'selected tiled', 'sliding pallas', 'sliding cudnn'")
    parser.add_argument("--branch_configs", nargs="*", default=list(CONFIGS),
                        help="configurations whose branches are timed alone")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/kernels_<date>.json)")
    args = parser.parse_args()

    device = jax.devices()[0]
    meta = dict(date=datetime.date.today().isoformat(), device=device.device_kind, platform=device.platform,
                jax=jax.__version__, configs={k: CONFIGS[k] for k in args.configs}, batch=1, dtype="bfloat16")
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"kernels_{meta['date']}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    rows = []

    def save():
        with open(out, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)

    fmt = lambda x: "   n/a" if x is None else f"{x:8.2f}"

    def measure(name, n, label, fn, inputs):
        row = dict(config=name, T=n, what=label)
        for key in ("fwd_ms", "fwd_bwd_ms"):
            try:
                forward, backward, ct = fwd_and_bwd(fn, inputs)
                call, call_args = (forward, inputs) if key == "fwd_ms" else (backward, (inputs, ct))
                row[key] = timed(call, call_args, args.reps, args.budget_s)
            except Exception as exc:  # e.g. out of memory; record and go on
                row[key] = None
                row[key.replace("_ms", "_error")] = f"{type(exc).__name__}: {str(exc)[:300]}"
                traceback.print_exc(limit=2)
        rows.append(row)
        save()
        print(f"{name:6s} T={n:6d} {label:16s} fwd {fmt(row['fwd_ms'])} ms  fwd+bwd {fmt(row['fwd_bwd_ms'])} ms",
              flush=True)
        return row

    for n in args.lengths:  # the table first, then the branches
        for name in args.configs:
            fns = branch_fns(CONFIGS[name], kernels.KernelSettings())
            inputs = make_inputs(CONFIGS[name], n)
            measure(name, n, "nsa core", fns["core"], inputs)
            measure(name, n, "dense cudnn", dense, inputs)
    for n in args.branch_lengths:
        for name in args.branch_configs:
            cfg = CONFIGS[name]
            fns = branch_fns(cfg, kernels.KernelSettings())
            inputs = make_inputs(cfg, n)
            cases = {"compressed": fns["compressed"], "selection": fns["selection"], "selected": fns["selected"],
                     "selected tiled": fns["selected_tiled"],
                     "sliding pallas": branch_fns(cfg, kernels.KernelSettings(sliding_impl="pallas"))["sliding"],
                     "sliding cudnn": branch_fns(cfg, kernels.KernelSettings(sliding_impl="cudnn"))["sliding"]}
            if cfg["window"] == 0:
                cases = {k: v for k, v in cases.items() if not k.startswith("sliding")}
            for label, fn in cases.items():
                if args.branches and label not in args.branches:
                    continue
                measure(name, n, label, fn, inputs)

    print(f"\n{meta['device']}, jax {meta['jax']}, {meta['date']}, batch 1, bf16, causal (ms, median)")
    print("| config | T | NSA fwd | NSA fwd+bwd | dense fwd | dense fwd+bwd | speed-up fwd+bwd |")
    print("|---|---|---|---|---|---|---|")
    by = {(r["config"], r["T"], r["what"]): r for r in rows}
    for name in args.configs:
        for n in args.lengths:
            nsa, dn = by.get((name, n, "nsa core")), by.get((name, n, "dense cudnn"))
            if not nsa or not dn:
                continue
            fmt = lambda x: "n/a" if x is None else f"{x:.2f}"  # noqa: E731
            speed = (f"{dn['fwd_bwd_ms'] / nsa['fwd_bwd_ms']:.1f}x"
                     if nsa["fwd_bwd_ms"] and dn["fwd_bwd_ms"] else "n/a")
            print(f"| {name} | {n} | {fmt(nsa['fwd_ms'])} | {fmt(nsa['fwd_bwd_ms'])} | {fmt(dn['fwd_ms'])} | "
                  f"{fmt(dn['fwd_bwd_ms'])} | {speed} |")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

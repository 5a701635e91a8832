"""Time the NSA core on packed documents (segment ids) against one unpacked sequence.

The core of `bench.core` (compressed attention + block selection with diff top-k gates +
selected attention, + the sliding window where the configuration has one), on the Pallas
backend, batch 1, bf16, causal, in three layouts of the same T tokens:

  one sequence     no segment ids (today's path)
  one document     segment ids marking a single document: the packed kernels' cost on what the
                   unpacked path also computes (the two must time the same within noise)
  N documents      T / N tokens each, packed with segment ids (fla's varlen `cu_seqlens` case)

The compressed keys of the `fla` configuration are mean-pooled per document (fla's compression,
each document on its own grid). Forward and forward + backward (gradients of q, k, v, ck, cv),
and the selection + selected-attention branch alone; `--branches` also times each branch on its own
(selection; selected attention on fixed picks, gradients of q, k, v and the gates; compressed
attention on the given ck, cv). Median of repeated runs after warm-up,
`block_until_ready` around each. Prints a table and writes JSON (default
bench/results/packed-<date>.json). fla's own packed time comes from
`bench/peers_torch.py --what fla_packed` (its own process, no JAX).

    python -m bench.packed                                   # fla and seed, T = 65,536, 16 documents
    python -m bench.packed --configs seed --length 4096 --documents 4 --reps 3
    python -m bench.packed --branches                        # and a table per branch
"""

from __future__ import annotations

import argparse
import datetime
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

import kernels
from bench.core import CONFIGS, fwd_and_bwd, make_inputs, timed
from nsa_jax import reference
from nsa_jax import segments as seg


def packed_core(cfg: dict, segments: seg.Segments | None):
    """(core, selection + selected) as functions of (q, k, v, ck, cv) with these segments."""
    backend = kernels.get_backend("pallas")
    d, stride, sb = cfg["dim_head"], cfg["stride"], cfg["selection_block"]
    scale = d**-0.5
    packed = {} if segments is None else {"segments": segments}

    def pooled(k, v, ck, cv):
        """fla's compression: the memory entry, then k and v averaged over each document's blocks."""
        if not cfg.get("mean_pool"):
            return ck, cv

        def pool(x):  # [b, n, kh, d] -> [b, n // stride, kh, d]
            return reference.compression_windows(x, stride, stride, segments).mean(axis=3).transpose(0, 2, 1, 3)

        return jnp.concatenate([ck[:, :1], pool(k)], axis=1), jnp.concatenate([cv[:, :1], pool(v)], axis=1)

    def selected(q, k, v, ck):
        values, indices = backend.select_blocks(q, ck, num_mem=1, stride=stride, causal=True, share_heads=True,
                                                num_selected=cfg["num_selected"], selection_block_size=sb,
                                                scale=scale, **packed)
        gates = reference.straight_through_gates(values)
        return backend.selected_attention(q, k, v, indices, reference.valid_selection(values), gates, block_size=sb,
                                          causal=True, scale=scale, **packed)

    def core(q, k, v, ck, cv):
        ck, cv = pooled(k, v, ck, cv)
        cmp = backend.compressed_attention(q, ck, cv, num_mem=1, stride=stride, causal=True, scale=scale, **packed)
        sel = selected(q, k, v, ck)
        if cfg.get("gates"):  # per-head gates, as fla takes them
            out = jax.nn.sigmoid(q[..., :1]) * cmp + jax.nn.sigmoid(q[..., 1:2]) * sel
        else:
            out = cmp + sel
        if cfg["window"] > 0:
            out = out + backend.sliding_window_attention(q, k, v, window=cfg["window"], causal=True, scale=scale,
                                                         **packed)
        return out

    def selection_and_selected(q, k, v, ck, cv):
        return selected(q, k, v, pooled(k, v, ck, cv)[0])

    return core, selection_and_selected


def branch_fns(cfg: dict, inputs, segments: seg.Segments | None) -> dict:
    """Each branch alone: {name: (fn, args)}; the picks of selected attention are fixed (made once)."""
    backend = kernels.get_backend("pallas")
    q, k, v, ck, cv = inputs
    d, stride, sb = cfg["dim_head"], cfg["stride"], cfg["selection_block"]
    scale = d**-0.5
    packed = {} if segments is None else {"segments": segments}
    sel_kw = dict(num_mem=1, stride=stride, causal=True, share_heads=True, num_selected=cfg["num_selected"],
                  selection_block_size=sb, scale=scale, **packed)
    values, indices = jax.jit(lambda q, ck: backend.select_blocks(q, ck, **sel_kw))(q, ck)
    valid, gates = reference.valid_selection(values), reference.straight_through_gates(values)
    return {
        "selection": (lambda q, ck: backend.select_blocks(q, ck, **sel_kw)[0], (q, ck)),
        "selected": (lambda q, k, v, g: backend.selected_attention(q, k, v, indices, valid, g, block_size=sb,
                                                                   causal=True, scale=scale, **packed),
                     (q, k, v, gates)),
        "compressed": (lambda q, ck, cv: backend.compressed_attention(q, ck, cv, num_mem=1, stride=stride,
                                                                      causal=True, scale=scale, **packed),
                       (q, ck, cv)),
    }


def layouts(n: int, documents: int) -> dict[str, seg.Segments | None]:
    ids = np.repeat(np.arange(documents), n // documents)[None]
    return {"one sequence": None, "one document": seg.from_ids(np.zeros((1, n), np.int32)),
            f"{documents} documents": seg.from_ids(ids)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["fla", "seed"], choices=list(CONFIGS))
    parser.add_argument("--length", type=int, default=65536)
    parser.add_argument("--documents", type=int, default=16, help="equal documents packed into --length")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--budget_s", type=float, default=3.0, help="stop repeating after this long (>= 3 runs)")
    parser.add_argument("--branches", action="store_true", help="also time each branch alone")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/packed-<date>.json)")
    args = parser.parse_args()
    if args.length % args.documents:
        parser.error(f"--documents ({args.documents}) must divide --length ({args.length})")

    device = jax.devices()[0]
    meta = dict(date=datetime.date.today().isoformat(), device=device.device_kind, jax=jax.__version__,
                T=args.length, documents=args.documents, batch=1, dtype="bfloat16",
                configs={k: CONFIGS[k] for k in args.configs})
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"packed-{meta['date']}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    rows, branch_rows = [], []

    def save():
        with open(out, "w") as f:
            json.dump(dict(meta=meta, rows=rows, branches=branch_rows), f, indent=1)

    for name in args.configs:
        inputs = make_inputs(CONFIGS[name], args.length)
        for layout, segments in layouts(args.length, args.documents).items():
            core, branch = packed_core(CONFIGS[name], segments)
            row = dict(config=name, layout=layout)
            for label, fn in (("core", core), ("selected", branch)):
                forward, backward, ct = fwd_and_bwd(fn, inputs)
                row[f"{label}_fwd_ms"] = timed(forward, inputs, args.reps, args.budget_s)
                row[f"{label}_fwd_bwd_ms"] = timed(backward, (inputs, ct), args.reps, args.budget_s)
            rows.append(row)
            save()
            print(f"{name} {layout}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items() if k.endswith("_ms")),
                  flush=True)
            for branch, (fn, fn_args) in (branch_fns(CONFIGS[name], inputs, segments) if args.branches else {}).items():
                forward, backward, ct = fwd_and_bwd(fn, fn_args)
                branch_rows.append(dict(config=name, layout=layout, branch=branch,
                                        fwd_ms=timed(forward, fn_args, args.reps, args.budget_s),
                                        fwd_bwd_ms=timed(backward, (fn_args, ct), args.reps, args.budget_s)))
                save()

    print(f"\nNSA core on packed documents, T={args.length}, batch 1, bf16, causal, {device.device_kind}, "
          f"{meta['date']} (ms)")
    print("| config | layout | core fwd | core fwd+bwd | selection+selected fwd | selection+selected fwd+bwd |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['layout']} | {r['core_fwd_ms']:.2f} | {r['core_fwd_bwd_ms']:.2f} | "
              f"{r['selected_fwd_ms']:.2f} | {r['selected_fwd_bwd_ms']:.2f} |")
    if branch_rows:
        print("\n| config | layout | branch | fwd | fwd+bwd |")
        print("|---|---|---|---|---|")
        for r in branch_rows:
            print(f"| {r['config']} | {r['layout']} | {r['branch']} | {r['fwd_ms']:.2f} | {r['fwd_bwd_ms']:.2f} |")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

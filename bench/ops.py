"""Time `nsa_jax.ops.native_sparse_attention` in fla's benchmark configuration.

The same call as `bench/peers_torch.py --what fla` makes of fla's `parallel_nsa`: batch 1, 64
query heads, 4 kv heads, head dim 128, bf16, blocks of 64, 16 selected, no window, random
sigmoid gates; forward, and forward + backward (gradients of q, k, v, g_cmp, g_slc). Median
of repeated runs after warm-up, `block_until_ready` around each. `--documents N` packs the T
tokens from N equal documents (`segment_ids`; fla's `cu_seqlens`). `--peers FILE` reads a
`bench/peers_torch.py` JSON of the same card and prints fla's time and the ratio beside ours.
Prints a table and writes JSON (default bench/results/ops-<date>.json).

    python -m bench.ops                                  # T = 4k .. 64k
    python -m bench.ops --lengths 65536 --documents 16 --peers bench/results/peers_fla.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os

import jax
import jax.numpy as jnp

from bench.core import fwd_and_bwd, timed
from nsa_jax.ops import native_sparse_attention

FLA_CONFIG = dict(batch=1, query_heads=64, kv_heads=4, head_dim=128, dtype="bfloat16", block_size=64,
                  block_count=16, window_size=0)


def inputs(n: int, c: dict = FLA_CONFIG, seed: int = 0) -> tuple:
    keys = jax.random.split(jax.random.key(seed), 5)
    b, h, kh, d = c["batch"], c["query_heads"], c["kv_heads"], c["head_dim"]
    dt = jnp.dtype(c["dtype"])
    normal = lambda key, shape: jax.random.normal(key, shape, jnp.float32).astype(dt)  # noqa: E731
    gate = lambda key: jax.nn.sigmoid(jax.random.normal(key, (b, n, h))).astype(dt)  # noqa: E731
    return normal(keys[0], (b, n, h, d)), normal(keys[1], (b, n, kh, d)), normal(keys[2], (b, n, kh, d)), \
        gate(keys[3]), gate(keys[4])


def op(n: int, documents: int, c: dict = FLA_CONFIG):
    ids = None if documents <= 1 else jnp.repeat(jnp.arange(documents), n // documents)[None]

    def fn(q, k, v, g_cmp, g_slc):
        return native_sparse_attention(q, k, v, g_cmp=g_cmp, g_slc=g_slc, block_size=c["block_size"],
                                       block_count=c["block_count"], window_size=c["window_size"], segment_ids=ids)

    return fn


def fla_times(path: str | None, documents: int) -> dict:
    """{T: (fwd ms, fwd+bwd ms)} from a peers_torch JSON (its fla or fla_packed section)."""
    if not path:
        return {}
    record = json.load(open(path))
    rows = record.get("fla_packed" if documents > 1 else "fla") or []
    out = {}
    for row in rows if isinstance(rows, list) else []:
        if documents > 1 and row.get("documents") != documents:
            continue
        out[row["seq_len"]] = tuple(row[k].get("median_ms") if isinstance(row.get(k), dict) else None
                                    for k in ("fwd", "fwd_bwd"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536])
    parser.add_argument("--documents", type=int, default=1, help="equal documents packed per sequence")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--budget_s", type=float, default=5.0)
    parser.add_argument("--peers", default=None, help="bench/peers_torch.py JSON of the same card (fla's times)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    device = jax.devices()[0]
    meta = dict(date=datetime.date.today().isoformat(), device=device.device_kind, jax=jax.__version__,
                config=FLA_CONFIG, documents=args.documents, peers=args.peers,
                call="native_sparse_attention(q, k, v, g_cmp=, g_slc=, block_size=64, block_count=16)")
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"ops-{meta['date']}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    fla = fla_times(args.peers, args.documents)
    rows = []
    for n in args.lengths:
        x = inputs(n)
        forward, backward, ct = fwd_and_bwd(op(n, args.documents), x)
        row = dict(T=n, fwd_ms=timed(forward, x, args.reps, args.budget_s),
                   fwd_bwd_ms=timed(backward, (x, ct), args.reps, args.budget_s))
        row["fla_fwd_ms"], row["fla_fwd_bwd_ms"] = fla.get(n, (None, None))
        rows.append(row)
        with open(out, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print(f"\nnative_sparse_attention, fla config, {args.documents} document(s), {meta['device']}, {meta['date']}")
    print(f"{'T':>7} {'fwd ms':>9} {'fla fwd':>9} {'ratio':>6} {'fwd+bwd':>9} {'fla':>9} {'ratio':>6}")
    ratio = lambda a, b: f"{b / a:6.2f}" if a and b else "     -"  # noqa: E731
    num = lambda x: f"{x:9.2f}" if x else "        -"  # noqa: E731
    for r in rows:
        print(f"{r['T']:7d} {num(r['fwd_ms'])} {num(r['fla_fwd_ms'])} {ratio(r['fwd_ms'], r['fla_fwd_ms'])} "
              f"{num(r['fwd_bwd_ms'])} {num(r['fla_fwd_bwd_ms'])} {ratio(r['fwd_bwd_ms'], r['fla_fwd_bwd_ms'])}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Time cached generation for the seed model: milliseconds per generated token.

Seed model (the seed's train.py): num_tokens 256, dim 512, depth 6, heads 8, kv_heads 4,
dim_head 64; NSA: sliding window 64, compress block 16 / stride 16, selection block 16,
4 selected, diff top-k, query heads share selection, GroupedMLP compress networks; float32.
Batch 1, a 64-token prime, 512 generated (seq_len 576), temperature 1, filter_thres 0.9.

What is timed: the jitted generation program (`nsa_jax.sampling._generate`, i.e. what
`Transformer.sample` runs after splitting the model), after one warm-up call so that
compilation is excluded; median of --repeats calls, each ended by block_until_ready, each
on a fresh random prime. Two figures per case:
  ms/token (all)    = whole program / tokens generated      (prefill included)
  ms/token (decode) = (whole program - prefill) / (tokens generated - 1)
where "prefill" is the jitted prefill + first-token sample, timed alone the same way.
Cases: sparse cached (the target), dense cached, sparse long context, and sparse without
cache (reruns the forward over the full buffer each step; fewer tokens, same buffer length).

  python -m bench.decode [--json bench/results/decode_h100.json] [--long 8192] [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from nsa_jax import Transformer, sampling

SEED_SPARSE = dict(sliding_window_size=64, compress_block_size=16, compress_block_sliding_stride=16,
                   selection_block_size=16, num_selected_blocks=4, use_diff_topk=True,
                   query_heads_share_selected_kv=True, compress_mlp="grouped_mlp")


def seed_model(sparse: bool) -> Transformer:
    return Transformer(num_tokens=256, dim=512, depth=6, dim_head=64, heads=8, kv_heads=4, use_sparse_attn=sparse,
                       sparse_attn_kwargs=SEED_SPARSE, use_pallas_nsa=False, rngs=nnx.Rngs(0))


def median_seconds(fn, make_args, repeats: int) -> tuple[float, list[float]]:
    jax.block_until_ready(fn(*make_args(0)))  # warm-up: compile
    times = []
    for r in range(repeats):
        args = make_args(r + 1)
        jax.block_until_ready(args)
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def time_case(name: str, sparse: bool, prime: int, seq_len: int, use_cache: bool, repeats: int) -> dict:
    model = seed_model(sparse)
    graphdef, state = nnx.split(model)
    generated = seq_len - prime
    top_k = sampling.filter_top_k(0.9, model.num_tokens)
    temperature = jnp.float32(1.0)

    def make_args(r):
        prompt = jax.random.randint(jax.random.key(1000 + r), (1, prime), 0, 256, dtype=jnp.int32)
        return prompt, jax.random.key(r)

    def generate(prompt, key):
        return sampling._generate(graphdef, state, prompt, key, temperature, seq_len=seq_len, greedy=False,
                                  top_k=top_k, use_cache_kv=use_cache)

    t0 = time.perf_counter()
    total, times = median_seconds(generate, make_args, repeats)
    compile_and_first = time.perf_counter() - t0 - sum(times)
    row = dict(case=name, sparse=sparse, cached=use_cache, batch=1, prime=prime, generated=generated,
               seq_len=seq_len, total_ms=total * 1e3, ms_per_token_all=total * 1e3 / generated,
               runs_ms=[t * 1e3 for t in times], warmup_s=compile_and_first)
    if use_cache:
        @jax.jit
        def prefill_first(state, prompt, key):
            m = nnx.merge(graphdef, state)
            logits, caches = sampling.prefill(m, prompt, seq_len)
            token = sampling.sample_logits(logits[:, -1], jax.random.fold_in(key, 0), temperature, greedy=False,
                                           top_k=top_k)
            return token, caches

        pre, _ = median_seconds(lambda p, k: prefill_first(state, p, k), make_args, repeats)
        row.update(prefill_ms=pre * 1e3, ms_per_token_decode=(total - pre) * 1e3 / max(generated - 1, 1))
    out = generate(*make_args(99))
    assert out.shape == (1, generated) and int(out.min()) >= 0 and int(out.max()) < 256
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None, help="output file (default bench/results/decode_<device>.json)")
    parser.add_argument("--prime", type=int, default=64)
    parser.add_argument("--generate", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--long", type=int, default=8192, help="tokens generated in the long-context case (0: skip)")
    parser.add_argument("--uncached", type=int, default=32, help="tokens generated without cache (0: skip)")
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: few tokens, one repeat")
    args = parser.parse_args()
    if args.quick:
        args.generate, args.repeats, args.long, args.uncached = 32, 1, 64, 4

    device = jax.devices()[0]
    card = getattr(device, "device_kind", device.platform)
    path = Path(args.json) if args.json else (
        Path(__file__).parent / "results" / f"decode_{card.replace(' ', '_').lower()}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    record = dict(benchmark="bench/decode.py", date=datetime.date.today().isoformat(), device=card,
                  platform=device.platform, jax=jax.__version__, model="seed (dim 512, depth 6, heads 8, kv 4, "
                  "dim_head 64; NSA w64 cb16 cs16 sb16 k4 diff-topk shared grouped_mlp), float32",
                  sampling="temperature 1.0, filter_thres 0.9", timing="median of repeats after warm-up; "
                  "ms_per_token_all includes prefill, ms_per_token_decode excludes it", results=[])
    seq_len = args.prime + args.generate
    cases = [("sparse cached", True, args.prime, seq_len, True),
             ("dense cached", False, args.prime, seq_len, True)]
    if args.long:
        cases.append(("sparse cached, long", True, args.prime, args.prime + args.long, True))
    if args.uncached:
        cases.append(("sparse uncached", True, seq_len - args.uncached, seq_len, False))
    for name, sparse, prime, length, cached in cases:
        repeats = args.repeats if length <= 4096 else min(args.repeats, 2)
        if not cached:
            repeats = min(args.repeats, 3)
        row = time_case(name, sparse, prime, length, cached, repeats)
        record["results"].append(row)
        path.write_text(json.dumps(record, indent=2) + "\n")
        print(json.dumps(row), flush=True)

    print(f"\n{card}, jax {jax.__version__}, batch 1, {record['date']}")
    print(f"{'case':<22}{'prime':>6}{'gen':>6}{'seq':>7}{'total ms':>10}{'prefill ms':>11}"
          f"{'ms/tok all':>11}{'ms/tok dec':>11}")
    for r in record["results"]:
        pre = f"{r['prefill_ms']:.2f}" if "prefill_ms" in r else "-"
        dec = f"{r['ms_per_token_decode']:.3f}" if "ms_per_token_decode" in r else "-"
        print(f"{r['case']:<22}{r['prime']:>6}{r['generated']:>6}{r['seq_len']:>7}{r['total_ms']:>10.1f}{pre:>11}"
              f"{r['ms_per_token_all']:>11.3f}{dec:>11}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""Context parallelism: would fetching only the selected blocks move less than all-gathering the keys?

    python -m bench.context_fetch --seq_lens 65536 --contexts 2,4          # seed model, random init, random bytes
    python -m bench.context_fetch --text data.txt --train_steps 1000 --seq_lens 262144,1048576

`nsa_jax.context` all-gathers every layer's keys and values: each of c shards receives the other
shards' (c - 1) / c of the sequence, whichever blocks its queries picked. Selected attention reads
only the picked blocks, so fetching just those would move, per shard, the distinct (kv head,
selection block) pairs that its queries picked validly and that another shard holds. This counts
them: one forward pass of the model over one sequence on one device (`Transformer.selections`),
the queries split as the zig-zag split splits them, the picks of each shard's queries gathered.
Per layer it prints the share of the other shards' blocks that the worst shard picked (a fetch
waits for the slowest shard) and the mean, and the megabytes per shard of both forms (keys and
values in --dtype); writes bench/results/context_fetch-<date>.json.

--text reads each sequence from a file (its first T bytes) instead of random bytes, and
--train_steps first trains the model on random crops of that file (--train_len bytes, Adam):
random-init selections are close to uniform over the past, trained ones are not.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nsa_jax import context, reference
from nsa_jax.config import ModelConfig
from nsa_jax.data import CropSampler, DataError, load_corpus
from nsa_jax.training import Trainer, make_optimizer


def zigzag_shard(n: int, shards: int) -> np.ndarray:  # [n] int
    """The shard that holds each token under `nsa_jax.context`'s split (`context.order` split in
    equal parts, in order)."""
    owner = np.empty(n, np.int64)
    owner[context.order(n, shards)] = np.arange(n) // (n // shards)
    return owner


def remote_picks(indices: np.ndarray, valid: np.ndarray, shards: int, block: int, kv_heads: int) -> np.ndarray:
    """indices, valid [n, sh, k] (one sequence's picks: selection blocks, and which are valid) ->
    [shards]: per shard, the distinct (kv head, block) pairs its queries picked validly that
    another shard holds. Selection heads map to kv heads h // (sh // kv_heads)."""
    n, sh, _ = indices.shape
    nb = n // block
    owner = zigzag_shard(n, shards)
    block_owner = owner[np.arange(nb) * block]
    kvh = np.arange(sh) // (sh // kv_heads)
    flat = (owner[:, None, None] * kv_heads + kvh[None, :, None]) * nb + np.clip(indices, 0, nb - 1)
    hit = np.zeros(shards * kv_heads * nb, bool)
    hit[flat[valid]] = True
    hit = hit.reshape(shards, kv_heads, nb)
    return (hit & (block_owner[None, None, :] != np.arange(shards)[:, None, None])).sum(axis=(1, 2))


def train(config: ModelConfig, data: np.ndarray, steps: int, train_len: int, batch_size: int, learning_rate: float,
          dtype: str, use_pallas_nsa: bool) -> nnx.Module:
    """The model after `steps` Adam steps on random crops of data (one device)."""
    trainer = Trainer(config.build(nnx.Rngs(0), use_pallas_nsa=use_pallas_nsa, dtype=dtype),
                      make_optimizer(learning_rate))
    state, crops = trainer.init_state(), CropSampler(data, train_len, seed=0, name="--text",
                                                    fixes="use a longer file or a smaller --train_len")
    start = time.perf_counter()
    for step in range(1, steps + 1):
        state, metrics = trainer.train_step(state, trainer.train_batches(crops.sample(1, batch_size)))
        if step % max(1, steps // 10) == 0 or step == steps:
            print(f"  train step {step}/{steps}: loss {float(metrics['loss']):.3f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    return trainer.model(state.params)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq_lens", default="65536", help="sequence lengths, comma-separated")
    parser.add_argument("--contexts", default="4", help="shard counts to split each sequence over, comma-separated")
    parser.add_argument("--text", default=None, help="read the sequence (and train) from this file")
    parser.add_argument("--train_steps", type=int, default=0, help="train this many steps on --text first")
    parser.add_argument("--train_len", type=int, default=2048)
    parser.add_argument("--batch_size", type=int, default=8, help="sequences per training step")
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--backend", default="pallas", choices=["pallas", "reference"])
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--name", default=None, help="JSON file stem (default context_fetch-<date>)")
    args = parser.parse_args()
    fail = lambda message: sys.exit(f"error: {message}")  # noqa: E731
    try:
        lengths = [int(x) for x in args.seq_lens.split(",")]
        contexts = [int(x) for x in args.contexts.split(",")]
    except ValueError:
        fail(f"--seq_lens and --contexts take comma-separated integers, got {args.seq_lens!r} and {args.contexts!r}")
    if min(contexts) < 2:
        fail(f"--contexts are shard counts, each >= 2; got {args.contexts}")
    if args.train_steps and not args.text:
        fail("--train_steps trains on --text: pass --text=FILE")
    config = ModelConfig()
    block = config.selection_block_size
    for n, c in ((n, c) for n in lengths for c in contexts):
        if n % (2 * c * block):
            fail(f"each of --seq_lens must be a multiple of 2 x context x the selection block ({2 * c * block} for "
                 f"context {c}), got {n}")

    if args.text:
        try:
            train_data, valid_data = load_corpus(args.text)
        except DataError as e:
            fail(str(e))
        whole = np.concatenate([train_data, valid_data])
        if len(whole) < max(lengths):
            fail(f"--text has {len(whole):,} bytes, fewer than the longest of --seq_lens ({max(lengths):,})")
    else:
        train_data, whole = None, np.random.default_rng(0).integers(0, 256, max(lengths), dtype=np.int32)
    pallas = args.backend == "pallas"
    if args.train_steps:
        print(f"training {args.train_steps} steps on {args.text} ({args.batch_size} x {args.train_len} bytes)", flush=True)
        try:
            model = train(config, train_data, args.train_steps, args.train_len, args.batch_size, args.learning_rate,
                          args.dtype, pallas)
        except DataError as e:  # a --train_len longer than the text
            fail(str(e))
    else:
        model = config.build(nnx.Rngs(0), use_pallas_nsa=pallas, dtype=args.dtype)

    graph, params = nnx.split(model)
    selections = jax.jit(lambda p, ids: nnx.merge(graph, p).selections(ids))
    kv_heads, d = config.kv_heads, config.dim_head
    to_mb = lambda blocks: blocks * block * d * 2 * jnp.dtype(args.dtype).itemsize / 2**20  # noqa: E731  (k and v)
    source = f"{args.text} (its first T bytes)" if args.text else "random bytes"
    trained = f"trained {args.train_steps} steps" if args.train_steps else "random init"
    print(f"\nseed model, {trained}, {source}, selection block {block}, {config.num_selected_blocks} picks per "
          f"query and kv head, {args.dtype}")
    print("| T | context | layer | other shards' blocks picked, worst shard | mean | all-gather MB per shard "
          "| fetch MB, worst shard |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for n in lengths:
        picks = selections(params, jnp.asarray(whole[:n], jnp.int32)[None])
        picks = [None if p is None else (np.asarray(reference.valid_selection(p[0][0])), np.asarray(p[1][0]))
                 for p in picks]
        nb = n // block
        for c in contexts:
            others = kv_heads * (nb - nb // c)  # blocks of the other shards, per shard: what all-gather moves
            for layer, pick in enumerate(picks):
                if pick is None:
                    continue
                remote = remote_picks(pick[1], pick[0], c, block, kv_heads)
                rows.append(dict(seq_len=n, context=c, layer=layer, remote_picked=remote.tolist(), other_blocks=others,
                                 worst_share=float(remote.max() / others), mean_share=float(remote.mean() / others),
                                 allgather_mb=to_mb(others), fetch_mb_worst=to_mb(int(remote.max()))))
                r = rows[-1]
                print(f"| {n:,} | {c} | {layer} | {r['worst_share']:.1%} | {r['mean_share']:.1%} | "
                      f"{r['allgather_mb']:.1f} | {r['fetch_mb_worst']:.1f} |", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.date.today().isoformat()
    path = out / f"{args.name or 'context_fetch-' + stamp}.json"
    path.write_text(json.dumps(dict(device=jax.devices()[0].device_kind, jax=jax.__version__, date=stamp,
                                    settings=vars(args), model=dataclasses.asdict(config), layers=rows), indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

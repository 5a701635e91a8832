"""Does selection find the needle? Passkey retrieval: train at one length, test at longer ones.

    python -m bench.retrieval --variants nsa --seed 2     # ~9 minutes on an H200 (6 training)
    python -m bench.retrieval --smoke          # a tiny model on the CPU: checks the pipeline

Each variant is the seed model (`nsa_jax.config.ModelConfig`) trained from scratch on the
passkey task (`nsa_jax.passkey`: a key line at a random depth of filler, the question at the
end, only the answer's bytes as targets), then evaluated without further
training at every --eval_lengths x --depths cell: exact match of the answer over --examples
examples per cell (teacher forced, which is greedy decoding's result: `nsa_jax.passkey`).

Training follows a curriculum: it starts at --start_len bytes and doubles the length each time
exact match at the current length reaches --advance_at, up to --train_len, at the same bytes per
step. Trained at 4096 bytes from the start, the seed model's answer loss stayed at chance
(ln 10 per digit) for 1,500 steps (H200, 2026-11-30): with the needle one byte in 4,096, the
gradient that would teach a head to find it is too faint; at 256 bytes the copy is learnt first,
then carried to longer contexts. With --mix_lengths (the default) each step draws its length
from the curriculum's lengths so far: reading the key does not depend on its distance, and the
shorter examples give more answers per step; trained on the current length alone, the good runs
ended at ~98% exact match, at their own training length as at 64k (H200, 2026-11-30), with the
mix three seeds of three held >= 95% in every cell to 64k. The defaults are that recipe. A variant that cannot retrieve (the sliding window beyond its
width) stays at the length it stalled at: the table's "trained at" column says where each stopped.

Variants: nsa (all three branches, Pallas kernels), nsa_no_selected (compressed + sliding
window: what selection adds), sliding (the sliding window alone: chance beyond its window),
dense (full causal attention: how it extrapolates past its training length).

For variants with a selected branch it also says where selection looked: per evaluated length
and layer, how often a selected block held a byte of the key at the query that predicts the
answer, and the exact match where no layer picked it (a miss there is selection's; a miss
where it did is the model's reading of what it selected). For every variant it then says what the
trained model reads the key through: exact match and right digits with each of its branches left
out in turn (its gate 0, the same parameters), and a few of its misses (key, answer given).

Prints a table (accuracy per variant and length, mean and worst depth), writes a JSON of the
training curve and the grid to --out, and with --plot_dir one heat map per variant (depth x
length) as PNG.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from nsa_jax import passkey, reference
from nsa_jax.attention import Attention, SparseAttention, parse_branches
from nsa_jax.config import ModelConfig
from nsa_jax.training import Trainer, make_optimizer

VARIANTS = {  # name -> ModelConfig changes, use_pallas_nsa
    "nsa": (dict(use_sparse_attn=True), True),
    "nsa_no_selected": (dict(use_sparse_attn=True, nsa_branches="compressed,sliding"), True),
    "sliding": (dict(use_sparse_attn=True, nsa_branches="sliding"), True),
    "dense": (dict(use_sparse_attn=False), None),
}
SMOKE_MODEL = dict(dim=32, depth=2, heads=4, kv_heads=2, dim_head=8, sliding_window_size=8, compress_block_size=4,
                   compress_block_sliding_stride=4, selection_block_size=4, num_selected_blocks=2)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="nsa,nsa_no_selected,sliding,dense",
                        help=f"comma list from {', '.join(VARIANTS)}")
    parser.add_argument("--train_len", type=int, default=2048, help="training sequence length (bytes)")
    parser.add_argument("--start_len", type=int, default=256,
                        help="curriculum: train at this length first; the length doubles each time exact match at "
                             "it reaches --advance_at, up to --train_len (set it to --train_len for no curriculum)")
    parser.add_argument("--advance_at", type=float, default=0.9, help="exact match that moves the curriculum on")
    parser.add_argument("--steps", type=int, default=13000)
    parser.add_argument("--batch_size", type=int, default=8,
                        help="sequences per step at --train_len (shorter lengths take more: the same bytes per step)")
    parser.add_argument("--learning_rate", type=float, default=1e-3, help="peak learning rate")
    parser.add_argument("--schedule", default="cosine", choices=["constant", "cosine"],
                        help="cosine: linear warm-up over --warmup_steps, then down to --final_lr at --steps")
    parser.add_argument("--warmup_steps", type=int, default=200)
    parser.add_argument("--final_lr", type=float, default=0.01,
                        help="with --schedule cosine: the learning rate it decays to, as a fraction of the peak")
    parser.add_argument("--mix_lengths", action=argparse.BooleanOptionalAction, default=True,
                        help="each step at a length drawn evenly from the curriculum's lengths so far, not only the "
                             "current one (same bytes per step: more, shorter examples on average)")
    parser.add_argument("--eval_lengths", default="4096,16384,65536", help="comma list of lengths to test")
    parser.add_argument("--depths", type=int, default=10, help="key depths per length, evenly from 0 to 1")
    parser.add_argument("--examples", type=int, default=20, help="examples per (length, depth) cell")
    parser.add_argument("--eval_tokens", type=int, default=65536, help="tokens per evaluation forward pass")
    parser.add_argument("--eval_every", type=int, default=250,
                        help="steps between accuracy checks at the length being trained")
    parser.add_argument("--digits", type=int, default=5,
                        help="digits of the key (one compressed token covers 16 bytes: longer keys span several)")
    parser.add_argument("--data_path", default=None, help="filler corpus (default: the usual repeated sentences)")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"],
                        help="activations (bfloat16: half the activation memory at the longest lengths; dense "
                             "attention's [n, n] logits still grow with the square of the length)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/retrieval-<date>.json)")
    parser.add_argument("--plot_dir", default=None, help="write one heat map PNG per variant here")
    parser.add_argument("--smoke", action="store_true", help="tiny model and lengths (a CPU check of the pipeline)")
    args = parser.parse_args(argv)
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    try:
        args.eval_lengths = [int(n) for n in args.eval_lengths.split(",")]
    except ValueError:
        parser.error(f"--eval_lengths takes a comma list of integers, got {args.eval_lengths!r}")
    if args.digits < 1:
        parser.error(f"--digits is the key's length, at least 1, got {args.digits}")
    if not 0.0 < args.advance_at <= 1.0:
        parser.error(f"--advance_at is an exact-match rate in (0, 1], got {args.advance_at}")
    if not 0.0 <= args.final_lr <= 1.0:
        parser.error(f"--final_lr is a fraction of the peak learning rate in [0, 1], got {args.final_lr}")
    if args.smoke:
        args.start_len, args.train_len, args.steps, args.batch_size, args.examples = 120, 160, 4, 2, 2
        args.eval_lengths, args.depths, args.eval_every, args.dtype = [160, 320], 3, 2, "float32"
    task = passkey.PasskeyTask(digits=args.digits)
    args.start_len = min(args.start_len, args.train_len)
    too_short = [n for n in [args.start_len, args.train_len, *args.eval_lengths] if n < task.min_length()]
    if too_short:
        parser.error(f"lengths {too_short} are shorter than the task's {task.min_length()} bytes")
    return args


def build(variant: str, args) -> Trainer:
    changes, pallas = VARIANTS[variant]
    config = dataclasses.replace(ModelConfig(**(SMOKE_MODEL if args.smoke else {})), **changes)
    model = config.build(nnx.Rngs(args.seed), use_pallas_nsa=pallas, dtype=args.dtype)
    if dense_flash(args.dtype):  # dense attention in linear memory: its 64k evaluation fits
        for _, module in nnx.iter_modules(model):
            if isinstance(module, Attention):
                module.implementation = "cudnn"
    return Trainer(model, make_optimizer(learning_rate(args)))


def learning_rate(args) -> float | optax.Schedule:
    if args.schedule == "constant":
        return args.learning_rate
    warmup = min(args.warmup_steps, max(args.steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(0.0, args.learning_rate, warmup, max(args.steps, warmup + 1),
                                              end_value=args.learning_rate * args.final_lr)


def dense_flash(dtype: str) -> bool:
    """Dense attention through cuDNN's flash attention: on a GPU, in bf16. (XLA's attention
    writes the [n, n] logits: at T=65536 its autotuner asked for 128 GiB on an H200.)"""
    return dtype == "bfloat16" and jax.default_backend() == "gpu"


def answer_hits(trainer: Trainer, digits: int):
    """A jitted (params, tokens [b, n + 1], answer_start [b]) -> bool [b]: exact match of each
    answer (`passkey.exact_match`), the model reading tokens[:, :-1]."""
    return jax.jit(lambda params, tokens, answer_start: passkey.exact_match(
        trainer.model(params)(tokens[:, :-1]), tokens, answer_start, digits))


def answers_fn(trainer: Trainer, digits: int, branches: tuple[str, ...] | None = None):
    """A jitted (params, tokens [b, n + 1], answer_start [b]) -> int [b, digits]: the answer the
    model gives (`passkey.predicted_answer`). branches: run every SparseAttention with only
    these (the others' gates 0, as `SparseAttention(branches=...)`): what the trained model
    reads the key through."""

    def run(params, tokens, answer_start):
        model = trainer.model(params)
        if branches is not None:
            for _, module in nnx.iter_modules(model):
                if isinstance(module, SparseAttention):
                    module.branches = branches
        return passkey.predicted_answer(model(tokens[:, :-1]), answer_start, digits)

    return jax.jit(run)


def variant_branches(variant: str) -> tuple[str, ...]:
    """The NSA branches a variant runs, in gate order (none for dense attention)."""
    config = ModelConfig(**VARIANTS[variant][0])
    return parse_branches(config.nsa_branches) if config.use_sparse_attn else ()


def ablations(variant: str) -> dict[str, tuple[str, ...] | None]:
    """name -> branches: the variant whole, then without each of its branches (with two or more)."""
    own = variant_branches(variant)
    return {"all": None, **({f"without {b}": tuple(o for o in own if o != b) for b in own} if len(own) > 1 else {})}


def reading(fns: dict, params, task: passkey.PasskeyTask, rng, length: int, examples: int, eval_tokens: int,
            shown: int = 3) -> dict:
    """Over `examples` examples at random depths, for each answers_fn in `fns` (`ablations`):
    exact match and the mean number of right digits; and a few of the whole model's misses
    (depth, key, answer given): a miss by one digit is a misread, a wholly other number a wrong
    place or none."""
    right = {name: [] for name in fns}
    misses = []
    for batch in eval_batches(task, rng, length, None, examples, eval_tokens):
        tokens, answer_start = jnp.asarray(batch.tokens), jnp.asarray(batch.answer_start)
        keys = np.array([[ord(c) for c in key] for key in batch.key])  # [b, digits]
        for name, fn in fns.items():
            given = np.asarray(fn(params, tokens, answer_start))
            right[name].append((given == keys).sum(axis=1))
            if name == "all":
                misses += [dict(depth=round(float(d), 3), key=str(k), given=bytes(g.astype(np.uint8)).decode("latin-1"))
                           for d, k, g, ok in zip(batch.depth, batch.key, given, (given == keys).all(axis=1))
                           if not ok]
    out = {}
    for name, counts in right.items():
        counts = np.concatenate(counts)
        out[name] = dict(exact_match=float((counts == task.digits).mean()), digits_right=float(counts.mean()))
    return dict(branches=out, misses=misses[:shown], missed=len(misses))


def accuracy(hits_fn, params, task: passkey.PasskeyTask, rng, length: int, depth: float | None, examples: int,
             eval_tokens: int) -> float:
    """Exact-match rate over `examples` examples of length + 1 bytes (key at `depth`, or random)."""
    hits = [np.asarray(hits_fn(params, jnp.asarray(batch.tokens), jnp.asarray(batch.answer_start)))
            for batch in eval_batches(task, rng, length, depth, examples, eval_tokens)]
    return float(np.concatenate(hits).mean())


def eval_batches(task: passkey.PasskeyTask, rng, length: int, depth: float | None, examples: int, eval_tokens: int):
    """`examples` examples of length + 1 bytes, in batches of at most `eval_tokens` tokens."""
    per_pass = max(1, min(examples, eval_tokens // length))
    for first in range(0, examples, per_pass):
        yield task.batch(rng, min(per_pass, examples - first), length + 1, depths=depth)


def selection_hits_fn(trainer: Trainer, digits: int):
    """A jitted (params, tokens [b, n], answer_start [b], key_starts [b, 2]) -> bool [layers, b]:
    whether any selection head of each layer with a selected branch picked (validly) a block
    holding a byte of the key, at the query that predicts the answer's first digit. Where NSA
    misses, this says whether selection failed to find the key or the model failed to read it."""

    def run(params, tokens, answer_start, key_starts):
        model = trainer.model(params)
        rows = jnp.arange(tokens.shape[0])
        found = []
        for layer, picks in zip(model.layers, model.selections(tokens)):
            if picks is None:
                continue
            values, indices = picks  # [b, n, sh, k]
            picked, probs = indices[rows, answer_start - 1], values[rows, answer_start - 1]  # [b, sh, k]
            block = layer.attn.selection_block_size
            lo, hi = picked * block, (picked + 1) * block
            covers = jnp.zeros(picked.shape, bool)
            for occurrence in range(key_starts.shape[1]):
                start = key_starts[:, occurrence, None, None]
                covers |= (lo < start + digits) & (hi > start)
            found.append(jnp.any(covers & reference.valid_selection(probs), axis=(1, 2)))
        return jnp.stack(found) if found else jnp.zeros((0, tokens.shape[0]), bool)

    return jax.jit(run)


def has_selection(variant: str) -> bool:
    return "selected" in variant_branches(variant)


def selection_found(hits_fn, found_fn, params, task: passkey.PasskeyTask, rng, length: int, examples: int,
                    eval_tokens: int) -> dict:
    """Over `examples` examples at random depths: per layer, how often selection picked the key
    at the answer; the exact match of the same examples, overall and where no layer picked it."""
    found, hits = [], []
    for batch in eval_batches(task, rng, length, None, examples, eval_tokens):
        starts = np.array([[a for a, _ in task.key_spans(length + 1, d)] for d in batch.depth], np.int32)
        tokens, answer_start = jnp.asarray(batch.tokens), jnp.asarray(batch.answer_start)
        hits.append(np.asarray(hits_fn(params, tokens, answer_start)))
        found.append(np.asarray(found_fn(params, tokens[:, :-1], answer_start, jnp.asarray(starts))))
    found, hits = np.concatenate(found, axis=1), np.concatenate(hits)  # [layers, examples], [examples]
    missed = ~found.any(axis=0)
    return dict(found_per_layer=[float(f) for f in found.mean(axis=1)], exact_match=float(hits.mean()),
                no_layer_found=float(missed.mean()),
                exact_match_where_none_found=float(hits[missed].mean()) if missed.any() else None)


def step_length(rng, start_len: int, length: int) -> int:
    """--mix_lengths: one of the curriculum's lengths so far (start_len, 2 start_len, ..., length),
    evenly. Reading the key does not depend on how far away it is, finding it does: the shorter
    examples give more answers per step at the same bytes, the longest keeps the distance trained."""
    lengths = [start_len]
    while lengths[-1] < length:
        lengths.append(min(2 * lengths[-1], length))
    return int(lengths[rng.integers(len(lengths))])


def run_variant(variant: str, args, task: passkey.PasskeyTask, report=None) -> dict:
    """Train one variant and score its grid. report(partial result): called after training and
    after each evaluated length, so a run cut short (a time limit) keeps what it measured."""
    report = report or (lambda partial: None)
    trainer = build(variant, args)
    hits_fn, found_fn = answer_hits(trainer, task.digits), selection_hits_fn(trainer, task.digits)
    read_fns = {name: answers_fn(trainer, task.digits, branches) for name, branches in ablations(variant).items()}
    state = trainer.init_state()
    rng, eval_rng = np.random.default_rng(args.seed), np.random.default_rng(args.seed + 1)
    curve, start, length = [], time.perf_counter(), args.start_len
    trained_len = length  # the length of the last training step (the curriculum may move on after it)
    for step in range(1, args.steps + 1):
        trained_len = length
        n = step_length(rng, args.start_len, length) if args.mix_lengths else length
        size = max(1, args.batch_size * args.train_len // n)  # the same bytes per step at every length
        batch = task.batch(rng, size, n + 1)
        host = dict(tokens=batch.tokens[None], loss_mask=batch.loss_mask[None])  # [accum = 1, b, n + 1]
        state, metrics = trainer.train_step(state, trainer.train_batches(host))
        if step % args.eval_every == 0 or step == args.steps:
            acc = accuracy(hits_fn, state.params, task, eval_rng, length, None, 2 * args.examples, args.eval_tokens)
            curve.append(dict(step=step, length=length, loss=float(metrics["loss"]),
                              grad_norm=float(metrics["grad_norm"]), accuracy=acc,
                              seconds=round(time.perf_counter() - start, 1)))
            print(f"{variant} step {step}/{args.steps}: T={length}, answer loss {curve[-1]['loss']:.3f}, "
                  f"gradient norm {curve[-1]['grad_norm']:.2f}, exact match {acc:.0%} ({curve[-1]['seconds']:.0f} s)",
                  flush=True)
            if acc >= args.advance_at and length < args.train_len:
                length = min(2 * length, args.train_len)
    if trained_len < args.train_len:
        print(f"{variant}: trained up to T={trained_len}, not --train_len={args.train_len}: more --steps",
              flush=True)
    depths = [float(d) for d in np.linspace(0.0, 1.0, args.depths)]
    grid = {}
    selection = {}  # length -> where selection looked (variants with a selected branch)
    read = {}  # length -> exact match with each branch left out, and the misses (`reading`)
    result = lambda: dict(variant=variant, trained_len=trained_len, curve=curve, depths=depths,  # noqa: E731
                          grid={str(k): v for k, v in grid.items()}, selection=selection, reading=read)
    report(result())
    for n in args.eval_lengths:
        try:
            grid[n] = [accuracy(hits_fn, state.params, task, eval_rng, n, d, args.examples, args.eval_tokens)
                       for d in depths]
        except Exception as exc:  # e.g. out of memory at the longest length: recorded, the rest goes on
            grid[n] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        row = grid[n]
        shown = f"mean {np.mean(row):.0%}, worst depth {min(row):.0%}" if isinstance(row, list) else row
        print(f"{variant} T={n}: {shown}", flush=True)
        if has_selection(variant) and isinstance(row, list):
            selection[str(n)] = looked = selection_found(hits_fn, found_fn, state.params, task, eval_rng, n,
                                                         args.examples, args.eval_tokens)
            print(f"{variant} T={n}: selection picked the key at the answer, by layer: "
                  f"{' '.join(f'{f:.0%}' for f in looked['found_per_layer'])}; no layer: "
                  f"{looked['no_layer_found']:.0%} (exact match there: {looked['exact_match_where_none_found']})",
                  flush=True)
        if isinstance(row, list):
            read[str(n)] = r = reading(read_fns, state.params, task, eval_rng, n, args.examples, args.eval_tokens)
            scores = ", ".join(f"{k} {v['exact_match']:.0%} ({v['digits_right']:.2f})"
                               for k, v in r["branches"].items())
            misses = ", ".join(f"{m['key']} -> {m['given']!r} at depth {m['depth']:.0%}" for m in r["misses"])
            print(f"{variant} T={n}: exact match (digits right of {task.digits}) {scores}; "
                  f"misses {r['missed']}: {misses or 'none'}", flush=True)
        report(result())
    return result()


def table(results: list[dict], lengths: list[int]) -> str:
    lines = ["| variant | trained at | " + " | ".join(f"T={n}" for n in lengths) + " |",
             "|---|---|" + "---|" * len(lengths)]
    for r in results:
        cells = [f"T={r['trained_len']}" if "trained_len" in r else "?"]
        for n in lengths:
            row = r["grid"].get(str(n))
            cells.append(f"{np.mean(row):.0%} (worst {min(row):.0%})" if isinstance(row, list) else "error")
        lines.append(f"| {r['variant']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def heat_map(result: dict, lengths: list[int], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no heat map")
        return False
    grid = np.array([result["grid"][str(n)] if isinstance(result["grid"][str(n)], list)
                     else [np.nan] * len(result["depths"]) for n in lengths]).T  # [depth, length]
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(lengths), 4))
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
    ax.set_xticks(range(len(lengths)), [f"{n // 1024}k" if n >= 1024 else str(n) for n in lengths])
    ax.set_yticks(range(len(result["depths"])), [f"{d:.0%}" for d in result["depths"]])
    ax.set_xlabel("context length (bytes)")
    ax.set_ylabel("key depth")
    ax.set_title(f"passkey exact match: {result['variant']}")
    for (i, j), value in np.ndenumerate(grid):
        if np.isfinite(value):
            ax.text(j, i, f"{value:.0%}", ha="center", va="center", fontsize=7)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None) -> None:
    args = parse_args(argv)
    filler = Path(args.data_path).read_bytes() if args.data_path else None
    task = passkey.PasskeyTask(filler, digits=args.digits)
    device = jax.devices()[0]
    meta = dict(date=datetime.date.today().isoformat(), device=device.device_kind, jax=jax.__version__,
                settings=dict(vars(args)))
    out = Path(args.out or Path(__file__).parent / "results" / f"retrieval-{meta['date']}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    results = []
    for variant in args.variants.split(","):
        def save(partial: dict) -> None:
            out.write_text(json.dumps(dict(meta, results=[*results, partial]), indent=1))

        results.append(run_variant(variant, args, task, report=save))
        out.write_text(json.dumps(dict(meta, results=results), indent=1))
        if args.plot_dir:
            Path(args.plot_dir).mkdir(parents=True, exist_ok=True)
            heat_map(results[-1], args.eval_lengths, Path(args.plot_dir) / f"retrieval-{variant}.png")
    print(f"\n{meta['device']}, jax {meta['jax']}, {meta['date']}: {args.steps} steps, lengths {args.start_len} to "
          f"{args.train_len} (curriculum); exact match over {args.depths} depths x {args.examples} examples per length")
    print(table(results, args.eval_lengths))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""nsa-jax against the PyTorch NSA implementations, on the same GPU in one invocation.

    python -m bench.compare_peers                      # everything (peers need torch + wheels)
    python -m bench.compare_peers --skip_peers --quick # ours only, few lengths
    python -m bench.compare_peers --what train,memory --train_shapes 1x16384 --skip_highest
                                                       # one train shape, both sides, within a GPU call

Rows (the performance issue's table):
  seed model train step (fwd + bwd + clip + Adam), B=4 T=512, B=1 T=4096, B=1 T=16384
      ours: the jitted step with the Pallas kernels (the GPU default) and with the pure-JAX
      reference; peer: native-sparse-attention-pytorch 0.2.3 with its Triton kernels
  NSA core fwd and fwd+bwd in fla-core's benchmark configuration (bench/core.py "fla"),
      T = 4k..64k, against fla-core's parallel_nsa and dense causal attention (cuDNN in JAX,
      SDPA in torch); the crossover length where our core beats dense cuDNN attention
  decode ms/token (seed model, batch 1, 64 prime + 512 generated, prefill included)
  peak GPU memory of the B=4 T=512 train step
  the card's measured peaks (bf16 and float32 matmul TFLOP/s, copy bandwidth) and, per row, the
      floor: max(FLOPs / peak FLOP/s, bytes / peak bandwidth) from the analytic counts below

Our train rows are saved as each finishes: a run stopped part way keeps them.
The peers run first, in a child process (`bench/peers_torch.py`), so that the two frameworks
never hold GPU memory at the same time; without torch they are skipped with a message.
Prints one table; writes JSON to bench/results/compare_peers-<date>.json (or --json).
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import datetime
import json
import subprocess
import tempfile
import time
from pathlib import Path

SEED = dict(dim=512, depth=6, heads=8, kv_heads=4, dim_head=64, window=64, stride=16, compress_block=16,
            selection_block=16, num_selected=4, ff_mult=4, vocab=256)
TRAIN_SHAPES = [(4, 512), (1, 4096), (1, 16384)]
FLA_LENGTHS = [4096, 8192, 16384, 32768, 65536]


# ---------------------------------------------------------------- analytic counts (floors)

def seed_train_flops(batch: int, n: int, sparse: bool = True) -> float:
    """FLOPs of one seed-model train step: 3x the forward (backward = 2x forward).

    Forward per token and layer: projections 2*dim*(h+2kh)*dh + out 2*h*dh*dim, feed-forward
    2*dim*4*dim twice, attention 4*h*dh*(keys seen); NSA keys seen per query:
    window + k*sb selected + n/2/stride compressed (causal average), plus the GroupedMLP
    compress networks (k and v, per kv head, per compressed block: 2*(cb*dh*cb*dh + cb*dh*dh))
    and the gate projection. Embedding/logits: 2*dim*vocab per token.
    """
    s = SEED
    dim, h, kh, dh = s["dim"], s["heads"], s["kv_heads"], s["dim_head"]
    proj = 2 * dim * (h + 2 * kh) * dh + 2 * h * dh * dim
    ff = 2 * 2 * s["ff_mult"] * dim * dim
    if sparse:
        keys = min(s["window"], n) + s["num_selected"] * s["selection_block"] + n / 2 / s["stride"]
        blk = s["compress_block"] * dh
        compress = 2 * kh * 2 * (blk * blk + blk * dh) / s["stride"]
        gates = 2 * dim * 3 * h
    else:
        keys, compress, gates = n / 2, 0.0, 0.0
    attn = 4 * h * dh * keys
    per_token = s["depth"] * (proj + ff + attn + compress + gates) + 2 * dim * s["vocab"]
    return 3.0 * per_token * batch * n


def seed_param_bytes() -> float:
    """Bytes of the seed model's float32 parameters (71.2M, counted by the model)."""
    return 71.2e6 * 4


def train_bytes_floor() -> float:
    """Adam step: read params, grads, m, v; write params, m, v (float32), once."""
    return 7 * seed_param_bytes()


def core_flops(n: int, fwd_only: bool, heads=64, dh=128, stride=64, sb=64, k=16) -> float:
    """fla config core: compressed (n/2/stride keys on average) + selected (k*sb keys) per query,
    4*dh FLOPs per query-key pair per head forward; fwd+bwd = 3.5x forward (flash backward)."""
    fwd = 4 * dh * heads * n * (n / 2 / stride + k * sb)
    return fwd if fwd_only else 3.5 * fwd


def core_bytes(n: int, fwd_only: bool, heads=64, kh=4, dh=128) -> float:
    """Compulsory bf16 traffic: q, k, v read and o written once (fwd); the backward also reads
    them and do, and writes dq, dk, dv. Re-reads of selected blocks (served mostly from L2)
    are not counted, so this is a lower bound."""
    fwd = 2 * (2 * n * heads * dh + 2 * n * kh * dh)
    return fwd if fwd_only else 3 * fwd


def dense_core_flops(n: int, fwd_only: bool, heads=64, dh=128) -> float:
    fwd = 4 * dh * heads * n * n / 2
    return fwd if fwd_only else 3.5 * fwd


# ---------------------------------------------------------------- measurements (ours)

def measure_peaks() -> dict:
    """Matmul TFLOP/s (bf16, and float32 at JAX's default precision) and copy bandwidth."""
    import jax
    import jax.numpy as jnp

    from bench.kernels import timed

    out = {}
    for dtype in ("bfloat16", "float32"):
        a = jax.random.normal(jax.random.key(0), (8192, 8192), jnp.float32).astype(dtype)
        ms = timed(jax.jit(lambda x: x @ x), (a,), 20, 2.0)
        out[f"matmul_tflops_{dtype}"] = 2 * 8192**3 / (ms / 1e3) / 1e12
    x = jnp.zeros((256 * 1024 * 1024,), jnp.float32)  # 1 GiB
    ms = timed(jax.jit(lambda x: x + 1), (x,), 20, 2.0)
    out["copy_tb_per_s"] = 2 * x.nbytes / (ms / 1e3) / 1e12
    return out


def measure_memory() -> dict:
    """Peak device memory of the seed model's B=4 T=512 step, as the peer measures its own: what
    the state holds before the step (parameters, Adam's moments), then the step's peak. This is
    the first thing the process runs on the device, so the allocator's peak covers everything
    since start-up (model set-up and compilation too): the step is compiled before it runs,
    and `compiled_temp_gib` (XLA's buffers for the step, from its compiled memory analysis)
    says how much of the peak is the step's own."""
    import jax
    import numpy as np
    from flax import nnx

    from nsa_jax import sharding
    from nsa_jax.config import ModelConfig
    from nsa_jax.training import Trainer, make_optimizer

    device = jax.devices()[0]
    trainer = Trainer(ModelConfig().build(nnx.Rngs(0), use_pallas_nsa=True, dtype="float32"),
                      make_optimizer(1e-4), sharding.make_mesh([device]))
    state = trainer.init_state()
    batch = trainer.train_batches(np.random.default_rng(0).integers(0, 256, (1, 4, 513), dtype=np.int32))
    jax.block_until_ready(state)
    resident = (device.memory_stats() or {}).get("bytes_in_use")
    step = trainer.lower_train_step(state, batch).compile()  # the step that runs: compiled once
    temp = step.memory_analysis().temp_size_in_bytes
    with jax.set_mesh(trainer.mesh):
        for _ in range(2):
            state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    peak = (device.memory_stats() or {}).get("peak_bytes_in_use")
    gib = lambda x: x / 2**30 if x else None  # noqa: E731
    return dict(peak_gib=gib(peak), resident_before_step_gib=gib(resident), compiled_temp_gib=gib(temp))


def measure_train(shapes, repeats: int, variants=("pallas", "reference"), highest: bool = True,
                  rows: list | None = None, on_row=None) -> list[dict]:
    """Our train-step rows, appended to `rows` (a new list by default); `on_row()` after each row
    (the caller saves its JSON then, so that a run stopped part way keeps the rows it finished)."""
    from bench.train_step import time_variant

    import jax

    rows = [] if rows is None else rows

    def add(row: dict) -> None:
        rows.append(row)
        if on_row is not None:
            on_row()

    if highest:
        batch, n = shapes[0]
        with jax.default_matmul_precision("highest"):  # torch's float32 matmul default: no TF32
            row = time_variant("pallas", n, batch, 1, repeats, "float32")
        add(dict(row, variant="pallas, highest precision"))
        print(f"ours train pallas (highest precision) B={batch} T={n}: {row['ms_per_step']:.2f} ms", flush=True)
    for batch, n in shapes:
        for variant in variants:
            try:
                row = time_variant(variant, n, batch, 1, repeats, "float32")
            except Exception as exc:  # e.g. the reference's dense masks out of memory at long T
                row = dict(variant=variant, seq_len=n, batch_size=batch, error=f"{type(exc).__name__}: {str(exc)[:200]}")
            add(row)
            print(f"ours train {variant} B={batch} T={n}: "
                  f"{row.get('ms_per_step', float('nan')):.2f} ms {row.get('error', '')}", flush=True)
    return rows


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """"4x512,1x4096" -> [(4, 512), (1, 4096)] (batch x length); ValueError naming the bad item."""
    shapes = []
    for item in text.split(","):
        try:
            batch, n = (int(x) for x in item.lower().split("x"))
        except ValueError:
            raise ValueError(f"--train_shapes takes BxT items such as 4x512, got {item!r}") from None
        if batch < 1 or n < 2:
            raise ValueError(f"--train_shapes needs a batch of at least 1 and a length of at least 2, got {item!r}")
        shapes.append((batch, n))
    return shapes


def measure_core(lengths, reps: int, budget_s: float, configs=("fla",)) -> list[dict]:
    import jax

    from bench import core as kb

    rows, dense_rows = [], {}
    for config in configs:
        cfg = kb.CONFIGS[config]
        for n in lengths:
            inputs = kb.make_inputs(cfg, n)
            shape = (cfg["heads"], cfg["kv_heads"], cfg["dim_head"], n)  # all that dense attention sees
            fns = [("nsa", kb.branch_fns(cfg)["core"])]
            if shape in dense_rows:  # the same dense attention as an earlier configuration: not timed again
                rows.append(dict(dense_rows[shape], config=config, same_as=dense_rows[shape]["config"]))
            else:
                fns.append(("dense cudnn", kb.dense))
            for what, fn in fns:
                row = dict(config=config, T=n, what=what)
                for key in ("fwd_ms", "fwd_bwd_ms"):
                    try:
                        forward, backward, ct = kb.fwd_and_bwd(fn, inputs)
                        call, args = (forward, inputs) if key == "fwd_ms" else (backward, (inputs, ct))
                        row[key] = kb.timed(call, args, reps, budget_s)
                    except Exception as exc:
                        row[key], row["error"] = None, f"{type(exc).__name__}: {str(exc)[:200]}"
                rows.append(row)
                if what == "dense cudnn":
                    dense_rows[shape] = row
                print(f"ours core {config} {what} T={n}: fwd {row['fwd_ms']} fwd+bwd {row['fwd_bwd_ms']} ms", flush=True)
            del inputs
            jax.clear_caches()
    return rows


def measure_decode(repeats: int) -> dict:
    from bench.decode import time_case

    return time_case("sparse cached", True, 64, 64 + 512, True, repeats)


def crossover(rows: list[dict], config: str, key: str = "fwd_bwd_ms") -> int | None:
    """Shortest measured length from which our core is faster than dense cuDNN at every longer one."""
    by = {(r["T"], r["what"]): r.get(key) for r in rows if r["config"] == config}
    lengths = sorted({t for t, _ in by})
    wins = [t for t in lengths if by.get((t, "nsa")) and by.get((t, "dense cudnn")) and by[(t, "nsa")] < by[(t, "dense cudnn")]]
    for t in lengths:
        if all(u in wins for u in lengths if u >= t):
            return t
    return None


# ---------------------------------------------------------------- peers

# Our sections -> the peers' (bench/peers_torch.py) sections that give their side of the rows.
PEER_SECTIONS = {"train": "train", "memory": "memory", "decode": "decode", "core": "fla,dense", "peaks": ""}


def merge_results(paths: list[str]) -> dict:
    """One result from runs that each timed some rows (--what) on their own card: the rows of
    each, and the peers' sections of each."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    merged = dict(runs[0], train=[], core=[], merged_from=[str(p) for p in paths])
    peers = dict(runs[0].get("peers") or {})
    for run in runs:
        merged["train"] += run.get("train", [])
        merged["core"] += run.get("core", [])
        for key in ("memory", "peaks", "decode"):
            if key in run:
                merged[key] = run[key]
        for key, value in (run.get("peers") or {}).items():
            skipped = isinstance(value, dict) and set(value) <= {"skipped"}  # a section this run left out
            if value not in (None, [], {}) and not (skipped and key in peers):
                peers[key] = value
    merged["devices"] = sorted({run.get("device") for run in runs if run.get("device")})
    if peers:
        merged["peers"] = peers
    return merged


def run_peers(args) -> dict:
    """The peers in a child process; its log goes to --peer_log. A run stopped at --peer_timeout
    still returns the rows it finished (the child rewrites its JSON after every row)."""
    path = Path(tempfile.mkdtemp()) / "peers.json"
    cmd = [sys.executable, os.path.join(ROOT, "bench", "peers_torch.py"), "--json", str(path),
           "--fla_lengths", ",".join(map(str, args.lengths)), "--train_shapes", ",".join(f"{b}x{n}" for b, n in args.shapes),
           "--what", ",".join(PEER_SECTIONS[w] for w in args.what.split(",") if PEER_SECTIONS.get(w)),
           "--float32_matmul_precision", args.peer_precision]
    print("peers: " + " ".join(cmd[1:]) + f" (log: {args.peer_log})", flush=True)
    start = time.perf_counter()
    with open(args.peer_log, "w") as log:
        try:
            run = subprocess.run(cmd, text=True, stdout=log, stderr=subprocess.STDOUT, timeout=args.peer_timeout)
            status = f"exit {run.returncode}"
        except subprocess.TimeoutExpired:
            status = f"stopped after {args.peer_timeout} s (partial results)"
    print(f"peers: {status} after {time.perf_counter() - start:.0f} s", flush=True)
    if not path.exists():  # say why the peer columns will be empty
        return dict(status=f"{status}, no rows written (log: {args.peer_log})")
    peers = json.loads(path.read_text())
    peers["status"] = status
    return peers


# ---------------------------------------------------------------- table

def ratio(a, b) -> str:
    """Two decimals: a target such as ">= 3.6x" must not read as met when it is 3.55x."""
    return f"{a / b:.2f}x" if a and b else "n/a"


def fmt(x, digits=2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def table(result: dict) -> str:
    peaks, peers = result.get("peaks", {}), result.get("peers") or {}
    flops_peak = peaks.get("matmul_tflops_float32", 0) * 1e12
    bf16_peak = peaks.get("matmul_tflops_bfloat16", 0) * 1e12
    bw = peaks.get("copy_tb_per_s", 0) * 1e12

    def floor(fl, by, pk):  # ms, or None when the peaks were not measured (--what without peaks)
        return max(fl / pk if pk else 0, by / bw if bw else 0) * 1e3 if pk or bw else None

    lines = ["| workload | ours (ms) | peer (ms) | peer / ours | target | floor (ms) |", "|---|---|---|---|---|---|"]
    listed = lambda key: peers.get(key) if isinstance(peers.get(key), list) else []  # noqa: E731
    peer_train = {(r.get("batch"), r.get("seq_len")): r for r in listed("train")}
    targets = {(4, 512): 10, (1, 4096): 6, (1, 16384): 6}  # issue 16's (the train step's) targets
    for batch, n in result["settings"]["shapes"]:
        ours = {r["variant"]: r for r in result["train"] if r["batch_size"] == batch and r["seq_len"] == n}
        best = min((r["ms_per_step"] for v, r in ours.items() if "ms_per_step" in r and "highest" not in v),
                   default=None)
        which = next((v for v, r in ours.items() if r.get("ms_per_step") == best), "-")
        peer = peer_train.get((batch, n), {}).get("median_ms")
        fl = floor(seed_train_flops(batch, n), train_bytes_floor(), flops_peak)
        lines.append(f"| seed train step B={batch} T={n} (ours: {which}) | {fmt(best)} | {fmt(peer)} | "
                     f"{ratio(peer, best)} | >= {targets.get((batch, n), '-')}x | {fmt(fl)} |")
        if "pallas, highest precision" in ours:
            high = ours["pallas, highest precision"]["ms_per_step"]
            lines.append(f"| same, ours with IEEE float32 matmuls (torch's default) | {fmt(high)} | {fmt(peer)} | "
                         f"{ratio(peer, high)} | | |")
    core = {(r["config"], r["T"], r["what"]): r for r in result["core"]}
    fla_rows = {r.get("seq_len"): r for r in listed("fla")}
    sdpa = {r.get("seq_len"): r for r in listed("dense")}
    peer_ms = lambda row, key: (row.get(key.replace("_ms", "")) or {}).get("median_ms")  # noqa: E731
    fla_configs = {"fla": "fla config", "fla_nodiff": "fla config without diff-top-k gates (fla's own gradients)"}
    for config, name in fla_configs.items():
        for n in result["settings"]["lengths"]:
            ours, dn = core.get((config, n, "nsa")), core.get((config, n, "dense cudnn"), {})
            if ours is None and config != "fla":
                continue
            ours = ours or {}
            for key, label in (("fwd_ms", "fwd"), ("fwd_bwd_ms", "fwd+bwd")):
                peer = peer_ms(fla_rows.get(n, {}), key)
                fl = floor(core_flops(n, key == "fwd_ms"), core_bytes(n, key == "fwd_ms"), bf16_peak)
                extra = (f"; dense cuDNN {fmt(dn.get(key))}, torch SDPA {fmt(peer_ms(sdpa.get(n, {}), key))}")
                tgt = {(65536, "fwd_ms"): "<= 25 ms", (65536, "fwd_bwd_ms"): ">= 3.6x fla, <= 60 ms"}.get((n, key), "-")
                lines.append(f"| NSA core {label}, {name}, T={n}{extra} | {fmt(ours.get(key))} | {fmt(peer)} | "
                             f"{ratio(peer, ours.get(key))} | {tgt} | {fmt(fl)} |")
    dec, pdec = result.get("decode", {}), peers.get("decode") or {}
    lines.append(f"| decode ms/token, seed model | {fmt(dec.get('ms_per_token_all'), 3)} | "
                 f"{fmt(pdec.get('ms_per_token'), 3)} | {ratio(pdec.get('ms_per_token'), dec.get('ms_per_token_all'))} | "
                 f"<= 1 ms | {fmt(floor(0, seed_param_bytes(), 0), 3)} |")
    mem, pmem = result.get("memory", {}), peers.get("memory") or {}
    lines.append(f"| peak memory GiB, seed B=4 T=512 | {fmt(mem.get('peak_gib'), 3)} | {fmt(pmem.get('peak_gib'), 3)} | "
                 f"{ratio(pmem.get('peak_gib'), mem.get('peak_gib'))} | <= theirs | - |")
    if mem.get("resident_before_step_gib") or pmem.get("resident_before_step_gib"):
        lines.append(f"| of which resident before the step (state) | {fmt(mem.get('resident_before_step_gib'), 3)} | "
                     f"{fmt(pmem.get('resident_before_step_gib'), 3)} | | | |")
    for config in sorted({r["config"] for r in result["core"]}):
        lines.append(f"\ncrossover ({config} config, fwd+bwd): our core beats dense cuDNN from T = "
                     f"{crossover(result['core'], config)} (lengths measured: {result['settings']['lengths']})")
    return "\n".join(lines)


def plot(result: dict, path: str) -> bool:
    """Core fwd+bwd time against sequence length: ours, fla, dense cuDNN (JAX), torch SDPA."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return False
    peers = result.get("peers") or {}
    series = {}
    for what, label in (("nsa", "nsa-jax (Pallas)"), ("dense cudnn", "dense causal, cuDNN (JAX)")):
        rows = sorted((r["T"], r["fwd_bwd_ms"]) for r in result["core"]
                      if r["config"] == "fla" and r["what"] == what and r.get("fwd_bwd_ms"))
        series[label] = rows
    for key, label in (("fla", "fla-core parallel_nsa"), ("dense", "dense causal, torch SDPA")):
        rows = peers.get(key) if isinstance(peers.get(key), list) else []
        series[label] = sorted((r["seq_len"], r["fwd_bwd"]["median_ms"]) for r in rows
                               if isinstance(r.get("fwd_bwd"), dict) and r["fwd_bwd"].get("median_ms"))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, rows in series.items():
        if rows:
            ax.plot([t for t, _ in rows], [ms for _, ms in rows], marker="o", label=label,
                    linestyle="--" if "dense" in label else "-")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length")
    ax.set_ylabel("forward + backward (ms)")
    ax.set_title(f"NSA core, fla benchmark config (64 q heads, 4 kv, d 128, bf16)\n{result.get('device')}, "
                 f"{result.get('date')}")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None)
    parser.add_argument("--skip_peers", action="store_true")
    parser.add_argument("--peers_json", default=None,
                        help="take the peers' rows from this bench/peers_torch.py JSON instead of running them")
    parser.add_argument("--quick", action="store_true", help="two core lengths, 5 repeats")
    parser.add_argument("--core_lengths", default=None, metavar="T,T,...",
                        help=f"lengths of the core rows (default {','.join(map(str, FLA_LENGTHS))})")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--budget_s", type=float, default=2.0)
    parser.add_argument("--peer_timeout", type=int, default=900)
    parser.add_argument("--peer_precision", default="highest", choices=["highest", "high"],
                        help="the peers' float32 matmul precision (torch.set_float32_matmul_precision): highest "
                             "(torch's default) or high (TF32, as JAX's default precision on the GPU)")
    parser.add_argument("--train_variants", default="pallas,reference",
                        help="our train-step variants timed at each shape (pallas, reference)")
    parser.add_argument("--train_shapes", default=",".join(f"{b}x{n}" for b, n in TRAIN_SHAPES), metavar="BxT,...",
                        help="train-step shapes, ours and the peers' (default: the performance issue's three)")
    parser.add_argument("--skip_highest", action="store_true",
                        help="skip our IEEE float32 row (torch's default precision; one more compile)")
    parser.add_argument("--peer_log", default=os.path.join(tempfile.gettempdir(), "peers_torch.log"))
    parser.add_argument("--report", default=None, metavar="JSON[,JSON...]",
                        help="print the table of an earlier run's JSON (with --peers_json: merge those peer rows "
                             "in and rewrite it to --json); several JSONs of runs that each timed some rows "
                             "(--what) are merged into one table (and written to --json)")
    parser.add_argument("--plot", default=None, metavar="PNG", help="also plot core time against length")
    parser.add_argument("--what", default="peaks,memory,train,core,decode")
    parser.add_argument("--core_configs", default="fla", help="bench/core.py configurations for the core rows "
                        "(fla; add paper for the paper's own, which bench/core.py also times)")
    args = parser.parse_args()
    try:
        args.shapes = parse_shapes(args.train_shapes)
    except ValueError as e:
        parser.error(str(e))
    args.lengths = [4096, 16384] if args.quick else FLA_LENGTHS
    if args.core_lengths:
        try:
            args.lengths = [int(n) for n in args.core_lengths.split(",")]
        except ValueError:
            parser.error(f"--core_lengths takes a comma list of integers, got {args.core_lengths!r}")
    if args.quick:
        args.repeats = 5
    what = set(args.what.split(","))
    if args.report:
        reports = args.report.split(",")
        result = merge_results(reports) if len(reports) > 1 else json.loads(Path(args.report).read_text())
        if len(reports) > 1 and args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
        if args.peers_json:
            result["peers"] = json.loads(Path(args.peers_json).read_text())
            result["peers"]["status"] = f"from {args.peers_json}"
            Path(args.json or args.report).write_text(json.dumps(result, indent=2))
        print(f"{result.get('device')}, jax {result.get('jax')}, {result.get('date')}"
              + (f", torch {result['peers'].get('torch')}" if result.get("peers") else ""))
        print(table(result))
        if args.plot:
            plot(result, args.plot)
        return

    result = dict(date=datetime.date.today().isoformat(), settings=dict(shapes=args.shapes, lengths=args.lengths),
                  train=[], core=[])
    path = Path(args.json or os.path.join(ROOT, "bench", "results", f"compare_peers-{result['date']}.json"))
    path.parent.mkdir(parents=True, exist_ok=True)
    save = lambda: path.write_text(json.dumps(result, indent=2))  # noqa: E731

    if args.peers_json:
        result["peers"] = json.loads(Path(args.peers_json).read_text())
        result["peers"]["status"] = f"from {args.peers_json}"
    elif not args.skip_peers:  # before JAX takes the GPU
        try:
            import torch  # noqa: F401
        except ImportError:
            print("peers skipped: torch is not installed")
        else:
            result["peers"] = run_peers(args)
            save()
    import jax

    result.update(device=jax.devices()[0].device_kind, jax=jax.__version__)
    steps = [("memory", measure_memory, ()), ("peaks", measure_peaks, ()),
             ("train", measure_train, (args.shapes, args.repeats, args.train_variants.split(","),
                                       not args.skip_highest, result["train"], save)),
             ("decode", measure_decode, (5,)),
             ("core", measure_core, (args.lengths, args.repeats, args.budget_s, args.core_configs.split(",")))]
    for name, fn, fn_args in steps:
        if name not in what:
            continue
        try:
            result[name] = fn(*fn_args)
        except Exception as exc:  # record and go on: one failure must not cost the other rows
            result[f"{name}_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            print(f"{name} failed: {result[f'{name}_error']}", flush=True)
        save()
    print(f"\n{result['device']}, jax {result['jax']}, {result['date']}"
          + (f", torch {result['peers'].get('torch')}" if result.get("peers") else ""))
    print(table(result))
    if (result.get("peers") or {}).get("status"):
        print(f"peers: {result['peers']['status']}")
    print(f"wrote {path}")
    if args.plot:
        plot(result, args.plot)


if __name__ == "__main__":
    main()

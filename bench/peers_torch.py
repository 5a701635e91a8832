"""Time the PyTorch peers on a GPU: the seed's native-sparse-attention-pytorch model and fla's parallel_nsa.

Runs in its own process, without JAX, so that the two frameworks don't fight over GPU memory.
Measurements (each row has its own try/except: a failure, e.g. out of memory, records
{"error": ...} for that row and the run goes on; progress goes to stderr):

  train   the seed model (native_sparse_attention_pytorch 0.2.3 `Transformer`, as the seed's train.py
          builds it: dim 512, depth 6, heads 8, kv_heads 4, dim_head 64; NSA window 64, compress block
          16 / stride 16 with GroupedMLP, selection block 16, 4 selected, diff top-k, shared selection;
          flex sliding window, Triton fine selection; float32): one full train step (forward, backward,
          clip_grad_norm_ 0.5, Adam lr 1e-4, zero_grad) per --train_shapes entry (BxT, no accumulation):
          median ms/step and tokens/s = B*T / time
  memory  peak torch.cuda.max_memory_allocated of one such step at --memory_shape (after a warm-up step,
          so Adam's state is already allocated), GiB; None on CPU
  decode  the seed model's `sample(prompt, prime + generated, use_cache_kv=True)`, batch 1, temperature 1,
          filter_thres 0.9: ms per generated token = whole generation (prefill included) / tokens generated,
          median of --decode_repeats generations after one warm-up generation
  fla     fla-core's `fla.ops.nsa.parallel_nsa` with fla's benchmark config: batch 1, 64 query heads,
          4 kv heads, head dim 128, bfloat16, selection block 64, 16 selected blocks, compression by
          mean-pooling blocks of 64 (what parallel_nsa does for its compressed branch), random sigmoid
          gates g_cmp and g_slc, no sliding window (fla's needs flash-attn); forward and forward+backward
          (gradients of (out * do).sum() w.r.t. q, k, v, g_cmp, g_slc) per --fla_lengths entry
  fla_packed  the same parallel_nsa on --fla_packed_length tokens packed from --fla_documents equal
          documents (`cu_seqlens`, batch 1): forward and forward+backward
  dense   torch SDPA, causal, same heads/dims/dtype as fla (GQA via enable_gqa, else repeat_interleave),
          forward and forward+backward per --fla_lengths entry

Timing: --warmup untimed calls, then up to --repeats timed calls, each between torch.cuda.synchronize()
calls (perf_counter), stopping early after --budget_s seconds once 3 runs are in; the median is reported.
Without torch the script prints "peers skipped: torch is not installed" and exits 0 without writing JSON.

  python3 bench/peers_torch.py --json bench/results/peers_torch-h100.json [--what train,decode] [...]
  python3 bench/peers_torch.py --smoke --device cpu --json /tmp/peers_smoke.json   # CPU check, tiny shapes
"""

from __future__ import annotations

import os
import sys

# A torch-only script, run by path (`python3 bench/peers_torch.py`, as compare_peers does): Python
# puts bench/ first on sys.path, where the bench modules (core.py, decode.py, ...) could shadow
# modules of the peers' packages of the same name: take it off.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
os.environ.setdefault("TQDM_DISABLE", "1")  # Transformer.sample wraps its loop in tqdm (read at import)

import argparse
import datetime
import gc
import importlib.metadata
import json
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

try:
    import torch
except ImportError:
    torch = None

SECTIONS = ("train", "memory", "decode", "fla", "fla_packed", "dense")
SKIP_LINE = "peers skipped: torch is not installed"

SEED_MODEL = dict(num_tokens=256, dim=512, depth=6, heads=8, dim_head=64, kv_heads=4, use_sparse_attn=True)
SEED_SPARSE = dict(sliding_window_size=64, compress_block_size=16, compress_block_sliding_stride=16,
                   selection_block_size=16, num_selected_blocks=4, use_diff_topk=True,
                   query_heads_share_selected_kv=True)
SEED_GROUPED_MLP = dict(dim_head=64, compress_window_size=16, heads=4)  # 0.2.3 names it compress_window_size
SEED_OPTIM = dict(lr=1e-4, clip_grad_norm=0.5)

FLA_CONFIG = dict(batch=1, query_heads=64, kv_heads=4, head_dim=128, dtype="bfloat16", block_size=64,
                  block_counts=16, window_size=0)


# ----------------------------------------------------------------------------------------------- helpers

def one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:400]


def log(message: str) -> None:
    print(f"[peers] {message}", file=sys.stderr, flush=True)


def package_version(module: str, dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        return getattr(__import__(module), "__version__", "unknown")
    except Exception:  # noqa: BLE001 - absent or broken: no version
        return None


def parse_shapes(text: str) -> list[tuple[int, int]]:
    return [(int(b), int(t)) for b, t in (item.lower().split("x") for item in text.split(",") if item)]


def parse_ints(text: str) -> list[int]:
    return [int(item) for item in text.split(",") if item]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@dataclass
class Timing:
    repeats: int
    warmup: int
    budget_s: float
    min_runs: int = 3


def time_ms(fn: Callable[[], Any], device: torch.device, timing: Timing, warmup: int | None = None) -> dict:
    """Median wall time of fn in ms, each call between synchronizations, after warm-up calls."""
    for _ in range(timing.warmup if warmup is None else warmup):
        fn()
    sync(device)
    runs: list[float] = []
    start = time.perf_counter()
    min_runs = min(timing.min_runs, timing.repeats)
    while len(runs) < timing.repeats:
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        runs.append((time.perf_counter() - t0) * 1e3)
        if len(runs) >= min_runs and time.perf_counter() - start > timing.budget_s:
            break
    return dict(median_ms=statistics.median(runs), min_ms=min(runs), runs_ms=[round(r, 4) for r in runs],
                n_runs=len(runs))


def guarded(what: str, fn: Callable[[], dict], device: torch.device, **keys: Any) -> dict:
    """Run one measurement; on any failure return its keys plus {"error": one line}, freeing memory."""
    try:
        row = {**keys, **fn()}
    except Exception as exc:  # noqa: BLE001 - e.g. torch.cuda.OutOfMemoryError: record and go on
        row = {**keys, "error": one_line(exc)}
    free_memory(device)
    log(f"{what} {keys}: {summary(row)}")
    return row


def summary(row: dict) -> str:
    """The row's float results (and those of its nested passes) or its error, on one line."""
    if "error" in row:
        return f"error: {row['error']}"
    parts = []
    for key, value in row.items():
        if isinstance(value, float):
            parts.append(f"{key}={value:.4g}")
        elif isinstance(value, dict):
            parts.append(f"{key}: {summary(value)}")
    return ", ".join(parts)


# ----------------------------------------------------------------------------------- seed model (train)

@dataclass
class SeedOptions:
    triton: bool  # use_triton_fine_selection
    flex: bool  # use_flex_sliding_window
    flex_error: str | None = None  # why flex was turned off, when the first step with it failed


def build_seed_model(options: SeedOptions, device: torch.device) -> torch.nn.Module:
    from native_sparse_attention_pytorch.compress_networks import GroupedMLP
    from native_sparse_attention_pytorch.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(**SEED_MODEL, use_flex_sliding_window=options.flex,
                        use_triton_fine_selection=options.triton, use_flex_fine_selection=False,
                        sparse_attn_kwargs=dict(SEED_SPARSE, compress_mlp=GroupedMLP(**SEED_GROUPED_MLP)))
    return model.to(device)


def make_train_step(model: torch.nn.Module, batch: int, seq_len: int,
                    device: torch.device) -> Callable[[], torch.Tensor]:
    optim = torch.optim.Adam(model.parameters(), lr=SEED_OPTIM["lr"])
    generator = torch.Generator().manual_seed(0)
    data = [torch.randint(0, 256, (batch, seq_len + 1), generator=generator).to(device) for _ in range(3)]
    counter = iter(range(1 << 62))

    def step() -> torch.Tensor:
        loss = model(data[next(counter) % len(data)], return_loss=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), SEED_OPTIM["clip_grad_norm"])
        optim.step()
        optim.zero_grad()
        return loss

    return step


def seed_train_step(options: SeedOptions, batch: int, seq_len: int,
                    device: torch.device) -> Callable[[], torch.Tensor]:
    """A ready train step (one step already run). If flex attention fails there, fall back to no flex."""
    step = make_train_step(build_seed_model(options, device), batch, seq_len, device)
    try:
        step()
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as exc:  # noqa: BLE001
        if not options.flex:
            raise
        error = one_line(exc)
        del step
        free_memory(device)
        log(f"train step with use_flex_sliding_window=True failed ({error}); retrying without flex")
        options.flex = False
        try:
            step = make_train_step(build_seed_model(options, device), batch, seq_len, device)
            step()
        except Exception:
            options.flex = True  # not flex's fault: keep it and report the first error
            raise RuntimeError(error) from None
        options.flex_error = error
    sync(device)
    return step


def measure_train(options: SeedOptions, batch: int, seq_len: int, device: torch.device, timing: Timing) -> dict:
    step = seed_train_step(options, batch, seq_len, device)
    losses: list[torch.Tensor] = []
    result = time_ms(lambda: losses.append(step().detach()), device, timing,
                     warmup=max(timing.warmup - 1, 0))  # one step was run already
    return dict(**result, tokens_per_s=batch * seq_len / (result["median_ms"] / 1e3), loss=float(losses[-1]),
                flex=options.flex, triton=options.triton)


def measure_memory(options: SeedOptions, batch: int, seq_len: int, device: torch.device) -> dict:
    if device.type != "cuda":
        return dict(peak_gib=None, note="torch.cuda.max_memory_allocated is CUDA only")
    step = seed_train_step(options, batch, seq_len, device)  # after it, Adam's state exists
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    resident = torch.cuda.memory_allocated(device)
    step()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device)
    return dict(peak_gib=peak / 2**30, resident_before_step_gib=resident / 2**30, flex=options.flex,
                triton=options.triton)


def measure_decode(options: SeedOptions, prime: int, generated: int, repeats: int, device: torch.device) -> dict:
    model = build_seed_model(options, device).eval()
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (1, prime), generator=generator).to(device) for _ in range(repeats + 1)]
    seq_len = prime + generated
    out = model.sample(prompts[0], seq_len, use_cache_kv=True)  # warm-up generation
    assert out.shape == (1, generated), f"sample returned shape {tuple(out.shape)}"
    runs = []
    for prompt in prompts[1:]:
        sync(device)
        t0 = time.perf_counter()
        model.sample(prompt, seq_len, use_cache_kv=True)
        sync(device)
        runs.append((time.perf_counter() - t0) * 1e3)
    total = statistics.median(runs)
    return dict(ms_per_token=total / generated, total_ms=total, runs_ms=[round(r, 3) for r in runs],
                triton_prefill=options.triton)


# -------------------------------------------------------------------------------------- kernels (fla, dense)

def attention_inputs(seq_len: int, device: torch.device, grad: bool, gates: bool) -> dict[str, torch.Tensor]:
    """fla layout [B, T, heads, dim]: q with 64 heads, k and v with 4; gates [B, T, 64] in (0, 1)."""
    c = FLA_CONFIG
    dtype = getattr(torch, c["dtype"])
    shape = (c["batch"], seq_len)
    tensors = dict(q=torch.randn(*shape, c["query_heads"], c["head_dim"], device=device, dtype=dtype),
                   k=torch.randn(*shape, c["kv_heads"], c["head_dim"], device=device, dtype=dtype),
                   v=torch.randn(*shape, c["kv_heads"], c["head_dim"], device=device, dtype=dtype))
    if gates:
        for name in ("g_cmp", "g_slc"):
            tensors[name] = torch.randn(*shape, c["query_heads"], device=device, dtype=dtype).sigmoid()
    return {name: t.requires_grad_(grad) for name, t in tensors.items()}


def time_pass(forward: Callable[[dict], torch.Tensor], seq_len: int, device: torch.device, timing: Timing,
              gates: bool, backward: bool) -> dict:
    """Forward alone (inputs without grad, no_grad), or forward+backward: the gradients of (out * do).sum()
    w.r.t. every input. The tensors live in this frame only, so they are gone once it returns or raises."""
    inputs = attention_inputs(seq_len, device, grad=backward, gates=gates)
    if not backward:
        with torch.no_grad():
            return time_ms(lambda: forward(inputs), device, timing)
    leaves = tuple(inputs.values())
    do = torch.randn_like(inputs["q"])
    return time_ms(lambda: torch.autograd.grad(forward(inputs), leaves, grad_outputs=do), device, timing)


def fwd_and_bwd(forward: Callable[[dict], torch.Tensor], seq_len: int, device: torch.device, timing: Timing,
                gates: bool) -> dict:
    """Time "fwd" and "fwd_bwd"; a failure of one (e.g. out of memory) is recorded as its {"error": ...}."""
    row: dict[str, Any] = {}
    for name, backward in (("fwd", False), ("fwd_bwd", True)):
        try:
            row[name] = time_pass(forward, seq_len, device, timing, gates, backward)
        except Exception as exc:  # noqa: BLE001
            row[name] = {"error": one_line(exc)}
        free_memory(device)
    return row


def fla_forward(cu_seqlens: torch.Tensor | None = None) -> Callable[[dict], torch.Tensor]:
    """parallel_nsa in fla's benchmark config; with cu_seqlens [N + 1], N packed documents."""
    from fla.ops.nsa import parallel_nsa

    c = FLA_CONFIG

    def forward(x: dict) -> torch.Tensor:
        return parallel_nsa(x["q"], x["k"], x["v"], g_cmp=x["g_cmp"], g_slc=x["g_slc"], g_swa=None,
                            block_counts=c["block_counts"], block_size=c["block_size"],
                            window_size=c["window_size"], cu_seqlens=cu_seqlens)

    return forward


def dense_forward(device: torch.device) -> tuple[Callable[[dict], torch.Tensor], str]:
    """Causal SDPA in [B, heads, T, dim]; GQA through enable_gqa where torch has it."""
    import torch.nn.functional as F

    groups = FLA_CONFIG["query_heads"] // FLA_CONFIG["kv_heads"]

    def with_gqa(x: dict) -> torch.Tensor:
        q, k, v = (x[n].transpose(1, 2) for n in "qkv")
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).transpose(1, 2)

    def with_repeat(x: dict) -> torch.Tensor:
        q, k, v = (x[n].transpose(1, 2) for n in "qkv")
        k, v = (t.repeat_interleave(groups, dim=1) for t in (k, v))
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)

    try:
        with torch.no_grad():
            with_gqa(attention_inputs(64, device, grad=False, gates=False))
        return with_gqa, "enable_gqa=True"
    except TypeError:  # torch < 2.5
        return with_repeat, "repeat_interleave to 64 heads"


# ------------------------------------------------------------------------------------------------- main

def import_reason(module: str) -> str | None:
    """None when `module` imports, else why not (one line)."""
    try:
        __import__(module)
        return None
    except Exception as exc:  # noqa: BLE001 - ImportError, or a package that fails while importing
        return one_line(exc)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


def write(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")


def fmt(value: Any, spec: str = ".2f") -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "-"


def print_table(record: dict) -> None:
    print(f"\nPyTorch peers on {record['device']}, torch {record['torch']}, {record['date']}")
    for name in SECTIONS:
        section = record[name]
        if isinstance(section, dict) and "skipped" in section:
            print(f"{name}: skipped ({section['skipped']})")
    if isinstance(record["train"], list):
        print(f"{'seed train step':<18}{'B':>4}{'T':>7}{'ms/step':>11}{'tokens/s':>12}")
        for r in record["train"]:
            tail = (f"{fmt(r.get('median_ms')):>11}{fmt(r.get('tokens_per_s'), ',.0f'):>12}" if "error" not in r
                    else f"  error: {r['error'][:80]}")
            print(f"{'':<18}{r['batch']:>4}{r['seq_len']:>7}{tail}")
    memory = record["memory"]
    if "skipped" not in memory:
        peak = memory.get("peak_gib")
        value = (f"error: {memory['error']}" if "error" in memory else
                 "n/a (CUDA only)" if peak is None else f"{peak:.3f} GiB")
        print(f"seed train step peak memory (B={memory.get('batch')}, T={memory.get('seq_len')}): {value}")
    decode = record["decode"]
    if "skipped" not in decode:
        value = f"error: {decode['error']}" if "error" in decode else f"{decode['ms_per_token']:.3f} ms/token"
        print(f"seed decode (prime {decode.get('prime')}, {decode.get('generated')} generated, cached): {value}")
    for name in ("fla", "fla_packed", "dense"):
        if not isinstance(record[name], list):
            continue
        print(f"{name + ' (ms)':<18}{'T':>7}{'fwd':>11}{'fwd+bwd':>11}")
        for r in record[name]:
            cells = [fmt(r.get(p, {}).get("median_ms")) if "error" not in r.get(p, {}) else "error"
                     for p in ("fwd", "fwd_bwd")]
            print(f"{'':<18}{r['seq_len']:>7}{cells[0]:>11}{cells[1]:>11}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None, help="output (default bench/results/peers_torch-<date>.json)")
    parser.add_argument("--what", default=",".join(SECTIONS), help=f"comma list from {','.join(SECTIONS)}")
    parser.add_argument("--train_shapes", default="4x512,1x4096,1x16384", help="BxT list")
    parser.add_argument("--memory_shape", default="4x512", help="BxT of the peak-memory step")
    parser.add_argument("--fla_lengths", default="4096,8192,16384,32768,65536", help="fla and dense lengths")
    parser.add_argument("--fla_packed_length", type=int, default=65536, help="fla_packed: tokens in all")
    parser.add_argument("--fla_documents", type=int, default=16, help="fla_packed: equal documents packed")
    parser.add_argument("--decode_prime", type=int, default=64)
    parser.add_argument("--decode_tokens", type=int, default=512, help="tokens generated per generation")
    parser.add_argument("--decode_repeats", type=int, default=3, help="timed generations (after one warm-up)")
    parser.add_argument("--float32_matmul_precision", default="highest", choices=["highest", "high"],
                        help="torch.set_float32_matmul_precision: highest (torch's default, IEEE float32) or "
                             "high (TF32 tensor cores, what JAX's default precision uses on the GPU)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--budget_s", type=float, default=30.0,
                        help="stop repeating a measurement after this many seconds (once 3 runs are in)")
    parser.add_argument("--device", default=None, help="cuda (default) or cpu (with --smoke)")
    parser.add_argument("--no_triton", action="store_true", help="seed model without Triton fine selection")
    parser.add_argument("--no_flex", action="store_true", help="seed model without flex sliding window")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes, 1 repeat (for a CPU check; the device defaults to cpu)")
    args = parser.parse_args()
    args.what = [w.strip() for w in args.what.split(",") if w.strip()]
    unknown = set(args.what) - set(SECTIONS)
    if unknown:
        parser.error(f"--what: unknown {sorted(unknown)}; choose from {SECTIONS}")
    if args.smoke:
        args.device = args.device or "cpu"
        args.train_shapes, args.memory_shape, args.fla_lengths = "1x64", "1x64", "128,256"
        args.fla_packed_length, args.fla_documents = 256, 2
        args.decode_prime, args.decode_tokens, args.decode_repeats = 32, 16, 1
        args.repeats, args.warmup = 1, 1
    args.device = args.device or "cuda"
    return args


def main() -> int:
    args = parse_args()
    if torch is None:
        print(SKIP_LINE)
        return 0
    device = torch.device(args.device)
    torch.set_float32_matmul_precision(args.float32_matmul_precision)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("peers: CUDA is not available (for a CPU check: --smoke --device cpu)", file=sys.stderr)
        return 2
    today = datetime.date.today().isoformat()
    path = Path(args.json) if args.json else Path(__file__).parent / "results" / f"peers_torch-{today}.json"
    timing = Timing(repeats=args.repeats, warmup=args.warmup, budget_s=args.budget_s)
    on_gpu = device.type == "cuda"  # CPU has neither Triton nor flex attention's compiled kernels
    options = SeedOptions(triton=on_gpu and not args.no_triton, flex=on_gpu and not args.no_flex)
    nsa_missing = import_reason("native_sparse_attention_pytorch.transformer")
    fla_missing = "fla needs a CUDA GPU (Triton kernels)" if not on_gpu else import_reason("fla.ops.nsa")

    record: dict[str, Any] = dict(
        benchmark="bench/peers_torch.py", device=device_name(device), date=today, python=platform.python_version(),
        torch=torch.__version__, triton=package_version("triton", "triton"),
        native_sparse_attention_pytorch=package_version("native_sparse_attention_pytorch",
                                                        "native-sparse-attention-pytorch"),
        fla_core=package_version("fla", "fla-core"),  # "fla" is the section of fla rows
        settings=dict(
            smoke=args.smoke, device=str(device), repeats=args.repeats, warmup=args.warmup, budget_s=args.budget_s,
            timing="warm-up calls, then timed calls each between torch.cuda.synchronize() (perf_counter); median",
            float32_matmul_precision=torch.get_float32_matmul_precision(),
            seed_model=dict(SEED_MODEL, use_flex_sliding_window=options.flex,
                            use_triton_fine_selection=options.triton, use_flex_fine_selection=False,
                            sparse_attn_kwargs=dict(SEED_SPARSE, compress_mlp=dict(GroupedMLP=SEED_GROUPED_MLP)),
                            dtype="float32", not_passed=dict(
                                interpolated_importance_score="not an argument of SparseAttention in 0.2.3")),
            optimizer=f"Adam(lr={SEED_OPTIM['lr']}), clip_grad_norm_({SEED_OPTIM['clip_grad_norm']}), zero_grad; "
                      "loss = model(data[B, T+1] random bytes, return_loss=True); no grad accumulation",
            decode=dict(batch=1, prime=args.decode_prime, generated=args.decode_tokens,
                        call="model.sample(prompt, prime + generated, use_cache_kv=True)",
                        temperature=1.0, filter_thres=0.9, timed_generations=args.decode_repeats,
                        ms_per_token="median whole generation (prefill included) / generated"),
            fla=dict(FLA_CONFIG, call="parallel_nsa(q, k, v, g_cmp=g_cmp, g_slc=g_slc, g_swa=None, "
                     "block_counts=16, block_size=64, window_size=0)", layout="[B, T, heads, dim]",
                     gates="sigmoid(randn), requires_grad in fwd_bwd",
                     fwd="inputs without grad, under torch.no_grad()",
                     fwd_bwd="torch.autograd.grad(out, (q, k, v, g_cmp, g_slc), grad_outputs=do), do ~ randn"),
            dense=dict(batch=1, query_heads=64, kv_heads=4, head_dim=128, dtype="bfloat16",
                       call="F.scaled_dot_product_attention(q, k, v, is_causal=True, ...)",
                       fwd_bwd="torch.autograd.grad(out, (q, k, v), grad_outputs=do)"),
        ),
        **{name: {"skipped": "not in --what"} for name in SECTIONS},
    )

    if "train" in args.what:
        record["train"] = {"skipped": nsa_missing} if nsa_missing else []
        for batch, seq_len in ([] if nsa_missing else parse_shapes(args.train_shapes)):
            record["train"].append(guarded("train", lambda: measure_train(options, batch, seq_len, device, timing),
                                           device, batch=batch, seq_len=seq_len))
            write(path, record)
    if "memory" in args.what:
        batch, seq_len = parse_shapes(args.memory_shape)[0]
        record["memory"] = {"skipped": nsa_missing} if nsa_missing else guarded(
            "memory", lambda: measure_memory(options, batch, seq_len, device), device, batch=batch, seq_len=seq_len)
        write(path, record)
    if "decode" in args.what:
        record["decode"] = {"skipped": nsa_missing} if nsa_missing else guarded(
            "decode", lambda: measure_decode(options, args.decode_prime, args.decode_tokens, args.decode_repeats,
                                             device), device, prime=args.decode_prime, generated=args.decode_tokens)
        write(path, record)
    if "fla" in args.what:
        record["fla"] = {"skipped": fla_missing} if fla_missing else []
        for seq_len in ([] if fla_missing else parse_ints(args.fla_lengths)):
            record["fla"].append(guarded("fla", lambda: fwd_and_bwd(fla_forward(), seq_len, device, timing, True),
                                         device, seq_len=seq_len))
            write(path, record)
    if "fla_packed" in args.what:
        n, docs = args.fla_packed_length, args.fla_documents
        record["settings"]["fla_packed"] = dict(seq_len=n, documents=docs,
                                                call="parallel_nsa(..., cu_seqlens=arange(0, T + 1, T // documents))")
        if fla_missing:
            record["fla_packed"] = {"skipped": fla_missing}
        else:
            cu_seqlens = torch.arange(0, n + 1, n // docs, device=device, dtype=torch.long)
            record["fla_packed"] = [guarded("fla_packed", lambda: fwd_and_bwd(fla_forward(cu_seqlens), n, device,
                                                                              timing, True),
                                            device, seq_len=n, documents=docs)]
        write(path, record)
    if "dense" in args.what:
        try:
            forward, gqa = dense_forward(device)
            record["settings"]["dense"]["gqa"] = gqa
            record["dense"] = []
        except Exception as exc:  # noqa: BLE001
            record["dense"] = {"skipped": f"SDPA failed on a tiny input: {one_line(exc)}"}
        for seq_len in (parse_ints(args.fla_lengths) if isinstance(record["dense"], list) else []):
            record["dense"].append(guarded("dense", lambda: fwd_and_bwd(forward, seq_len, device, timing, False),
                                           device, seq_len=seq_len))
            write(path, record)

    record["settings"]["seed_model"].update(use_flex_sliding_window=options.flex,
                                            flex_fallback_error=options.flex_error)
    write(path, record)
    print_table(record)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

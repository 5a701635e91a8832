"""Train a byte-level language model with Native Sparse Attention (or dense attention).

    python train.py --flagfile=configs/quickstart.flags      # ~1 minute on a CPU
    python train.py --flagfile=configs/enwik8.flags          # the seed's run (enwik8, GPU)
    tensorboard --logdir runs

Every constant of the seed's train.py is a flag of the same name in lower case. A run reads top
to bottom: configuration (flags), setup (devices, data, model, resuming from the newest
checkpoint), then the steps with periodic validation, generation and checkpoints.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import absl.logging  # noqa: F401  (defines --log_dir, which this program re-purposes)
from absl import flags

from nsa_jax.cli import fail, parse_flags

# jax, flax and the rest are imported by the functions that use them, once the flags are parsed,
# so that --help and flag errors answer at once (0.1 s, not 1 s).
if TYPE_CHECKING:
    import jax
    import numpy as np
    from tensorboardX import SummaryWriter
    from tqdm import tqdm

    from nsa_jax.checkpoint import Checkpointer
    from nsa_jax.config import ModelConfig, TrainConfig
    from nsa_jax.data import CropSampler
    from nsa_jax.training import Trainer, TrainState

# -- flags: the seed's constants (same defaults) ------------------------------------------
flags.DEFINE_integer("num_batches", int(1e5), "training steps")
flags.DEFINE_integer("batch_size", 4, "sequences per micro-batch")
flags.DEFINE_integer("grad_accum_every", 4, "micro-batches per step (gradient accumulation)")
flags.DEFINE_float("learning_rate", 1e-4, "Adam learning rate")
flags.DEFINE_integer("validate_every", 100, "validate every N steps (0: never)")
flags.DEFINE_integer("prime_length", 64, "bytes of validation text that prime generation")
flags.DEFINE_integer("generate_every", 500, "generate a sample every N steps (0: never)")
flags.DEFINE_integer("generate_length", 512, "bytes to generate")
flags.DEFINE_integer("seq_len", 512, "training sequence length (crops are seq_len + 1)")
flags.DEFINE_integer("heads", 8, "query heads")
flags.DEFINE_integer("kv_heads", 4, "key/value heads (GQA)")
flags.DEFINE_boolean("use_sparse_attn", True, "NSA (true) or dense attention (false)")
flags.DEFINE_boolean("use_pallas_nsa", True,
                     "the seed's USE_TRITON_NSA: Pallas kernels where they run natively (GPU); "
                     "on CPU the pure-JAX reference runs either way")
flags.DEFINE_boolean("use_flex_for_fine_selection", False, "accepted for the seed's compatibility; no effect here")
flags.DEFINE_boolean("query_heads_share_selection", True, "query heads of a kv group share the selected blocks")
flags.DEFINE_integer("sliding_window_size", 64, "sliding window")
flags.DEFINE_integer("compress_block_size", 16, "compression block")
flags.DEFINE_integer("fine_block_size", 16, "selection (fine) block")
flags.DEFINE_integer("num_fine_selected", 4, "selected blocks per query")
flags.DEFINE_boolean("interpolated_importance_score", False, "interpolate compressed scores to token resolution")
flags.DEFINE_boolean("use_diff_topk", True, "straight-through gates on the selected blocks")
flags.DEFINE_boolean("use_efficient_inference", True, "generate with the KV cache")
flags.DEFINE_string("project_name", "native-sparse-attention", "accepted for the seed's compatibility (wandb project)")
flags.DEFINE_boolean("wandb_online", False, "accepted for the seed's compatibility; logging goes to TensorBoard")
flags.DEFINE_string("run_name", None, "experiment name (default: the seed's name for the settings)")
# -- flags: additions ----------------------------------------------------------------------
flags.DEFINE_integer("compress_block_sliding_stride", None, "compression stride (default: compress_block_size)")
flags.DEFINE_integer("dim", 512, "model width")
flags.DEFINE_integer("depth", 6, "layers")
flags.DEFINE_integer("dim_head", 64, "head dimension")
flags.DEFINE_float("ff_expansion_factor", 4.0, "feedforward width / model width")
flags.DEFINE_enum("compress_mlp", "grouped_mlp",
                  ["mlp", "grouped_mlp", "conv_linear", "attention_pool", "single_projection"], "compress network")
flags.DEFINE_string("nsa_branches", "compressed,selected,sliding",
                    "NSA branches that run, comma-separated (ablations: e.g. compressed,sliding or sliding)")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "activation dtype (parameters stay float32)")
flags.DEFINE_enum("remat", "none", ["none", "block"],
                  "rematerialisation: none, or block (keep each layer's input only, recompute the layer in the "
                  "backward pass: for long sequences; README, 'Long context')")
flags.DEFINE_string("data_path", "data/enwik8.gz",
                    "enwik8(.gz|.zip), any byte file, or 'stdlib' (this Python's standard library sources)")
flags.DEFINE_float("valid_fraction", 0.05, "validation share of a non-enwik8 corpus")
flags.DEFINE_boolean("pack_documents", False,
                     "split the corpus into documents and train with segment ids: attention stays within a "
                     "document, positions restart at each, and a target in the next document does not count")
flags.DEFINE_string("document_separator", None,
                    "bytes that begin a document, Python escapes allowed (default: '<page>' for enwik8, "
                    "a blank line '\\n\\n' otherwise)")
# absl.logging already defines --log_dir; give it our meaning and default.
flags.FLAGS.set_default("log_dir", "runs")
flags.FLAGS["log_dir"].help = "TensorBoard events go to <log_dir>/<run_name>"
flags.declare_key_flag("log_dir")  # listed by --help with this program's own flags, as is --flagfile
flags.declare_key_flag("flagfile")
flags.DEFINE_string("checkpoint_dir", None, "checkpoint directory (default: checkpoints/<run_name>)")
flags.DEFINE_integer("checkpoint_every", 1000, "save every N steps (0: only at the end)")
flags.DEFINE_float("checkpoint_every_minutes", 0.0,
                   "also save when this many minutes have passed since the last save (0: off); whichever of "
                   "this and --checkpoint_every comes first")
flags.DEFINE_integer("keep_checkpoints", 3, "checkpoints kept")
flags.DEFINE_integer("log_every", 10, "fetch and log training metrics every N steps")
flags.DEFINE_integer("seed", 0, "seeds parameters, data crops and sampling")
flags.DEFINE_boolean("fsdp", False, "split parameters and optimizer state over the devices (default: replicate)")
flags.DEFINE_boolean("shard_optimizer", False, "keep parameters replicated and split the optimizer state over the "
                     "devices (ZeRO-1: each device updates its part; less memory than replicating)")
flags.register_multi_flags_validator(
    ["fsdp", "shard_optimizer"], lambda f: not (f["fsdp"] and f["shard_optimizer"]),
    "--fsdp already splits the optimizer state (and the parameters): pass --fsdp or --shard_optimizer, not both")
flags.DEFINE_integer("context_parallelism", 1, "split each sequence over this many devices (zig-zag: two chunks each), "
                     "the batch over the rest (exact; not yet measured on GPUs: README, 'Several GPUs')")
flags.DEFINE_string("coordinator_address", None, "multi-host: address of process 0, host:port")
flags.DEFINE_integer("num_processes", None, "multi-host: number of processes")
flags.DEFINE_integer("process_id", None, "multi-host: this process's index")
flags.DEFINE_integer("max_nonfinite_steps", 10,
                     "stop after this many consecutive steps with a non-finite loss or gradient (each is skipped)")
FLAGS = flags.FLAGS


FLAG_NAMES = {  # ModelConfig field -> flag, for error messages
    "selection_block_size": "fine_block_size",
    "num_selected_blocks": "num_fine_selected",
    "query_heads_share_selected_kv": "query_heads_share_selection",
}


def main(argv: list[str]) -> None:
    """Configuration, setup, the loop. Exit status: 2 a user error, 3 non-finite training, 75 stopped by
    SIGTERM (preemption) after saving, 130 Ctrl-C after saving."""
    model_config, cfg, run_name = configs_from_argv(argv)
    run = setup(model_config, cfg, run_name)
    train_loop(run)


# -- configuration ------------------------------------------------------------------------------

def configs_from_argv(argv: list[str]) -> tuple[ModelConfig, TrainConfig, str]:
    """Parse and check the flags: --help and every flag or configuration error end here, before
    any device work."""
    parse_flags(argv, sys.modules[__name__])
    model_config, cfg, run_name = configs_from_flags()
    problem = cfg.validate() or model_config.validate() or (
        FLAGS.max_nonfinite_steps < 1 and f"--max_nonfinite_steps must be >= 1, got {FLAGS.max_nonfinite_steps}") or (
        FLAGS.checkpoint_every_minutes < 0
        and f"--checkpoint_every_minutes must be >= 0 (0: off), got {FLAGS.checkpoint_every_minutes}")
    if problem:
        for field, flag in FLAG_NAMES.items():
            problem = problem.replace(field, flag)
        fail(problem)
    return model_config, cfg, run_name


def configs_from_flags() -> tuple[ModelConfig, TrainConfig, str]:
    """The model and run configurations the parsed flags describe, and the run's name."""
    from nsa_jax.config import ModelConfig, TrainConfig

    model = ModelConfig(
        dim=FLAGS.dim, depth=FLAGS.depth, heads=FLAGS.heads, kv_heads=FLAGS.kv_heads, dim_head=FLAGS.dim_head,
        ff_expansion_factor=FLAGS.ff_expansion_factor, use_sparse_attn=FLAGS.use_sparse_attn,
        sliding_window_size=FLAGS.sliding_window_size, compress_block_size=FLAGS.compress_block_size,
        compress_block_sliding_stride=(FLAGS.compress_block_size if FLAGS.compress_block_sliding_stride is None
                                       else FLAGS.compress_block_sliding_stride),
        selection_block_size=FLAGS.fine_block_size, num_selected_blocks=FLAGS.num_fine_selected,
        use_diff_topk=FLAGS.use_diff_topk, query_heads_share_selected_kv=FLAGS.query_heads_share_selection,
        interpolated_importance_score=FLAGS.interpolated_importance_score, compress_mlp=FLAGS.compress_mlp,
        nsa_branches=FLAGS.nsa_branches,
    )
    train = TrainConfig(
        num_batches=FLAGS.num_batches, batch_size=FLAGS.batch_size, grad_accum_every=FLAGS.grad_accum_every,
        learning_rate=FLAGS.learning_rate, seq_len=FLAGS.seq_len, validate_every=FLAGS.validate_every,
        generate_every=FLAGS.generate_every, prime_length=FLAGS.prime_length,
        generate_length=FLAGS.generate_length, use_efficient_inference=FLAGS.use_efficient_inference,
        checkpoint_every=FLAGS.checkpoint_every, keep_checkpoints=FLAGS.keep_checkpoints,
        log_every=FLAGS.log_every, seed=FLAGS.seed, dtype=FLAGS.dtype, remat=FLAGS.remat,
    )
    run_name = FLAGS.run_name
    if run_name is None:  # the seed's experiment name
        run_name = "baseline" if not model.use_sparse_attn else (
            f"sparse-attn: compress size {model.compress_block_size} | fine size {model.selection_block_size}"
            f" | {model.num_selected_blocks} selected")
        if model.use_sparse_attn and model.nsa_branches != ModelConfig.nsa_branches:  # an ablation: its own run
            run_name += f" | branches {model.nsa_branches}"
    return model, train, run_name


def slug(name: str) -> str:
    """A directory name for a run name ('sparse-attn: compress size 16 | ...' -> 'sparse-attn_compress_size_16_...')."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "run"


def check_writable(directory: str, flag: str) -> None:
    """Create `directory` and write a probe file in it, or fail naming the flag."""
    path = Path(directory).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        fail(f"cannot write to {flag} {directory}: {e.strerror or e}")


# -- setup --------------------------------------------------------------------------------------

class NullWriter:
    """What processes other than 0 log to."""

    def add_scalar(self, *args, **kwargs) -> None: ...
    def add_text(self, *args, **kwargs) -> None: ...
    def close(self) -> None: ...


@dataclasses.dataclass
class Run:
    """What `setup` builds and the loop works on; `state` is replaced by every step."""

    model_config: ModelConfig
    cfg: TrainConfig
    run_name: str
    checkpoint_dir: str
    log_dir: str
    is_main: bool  # process 0, the one that logs
    valid_bytes: np.ndarray  # generation primes come from it
    train_data: CropSampler
    valid_data: CropSampler
    trainer: Trainer
    state: TrainState
    checkpointer: Checkpointer
    start_step: int  # 0, or the step resumed from
    writer: SummaryWriter | NullWriter


def setup(model_config: ModelConfig, cfg: TrainConfig, run_name: str) -> Run:
    """Directories, devices, data, model and compiled steps; then resume from the newest checkpoint."""
    import jax
    from flax import nnx
    from tensorboardX import SummaryWriter

    import kernels
    from nsa_jax import data, sharding
    from nsa_jax.checkpoint import CheckpointError, Checkpointer
    from nsa_jax.training import STATE_LAYOUT, Trainer, make_optimizer, tree_size

    checkpoint_dir = FLAGS.checkpoint_dir or f"checkpoints/{slug(run_name)}"
    log_dir = f"{FLAGS.log_dir}/{slug(run_name)}"
    check_writable(log_dir, "--log_dir")
    check_writable(checkpoint_dir, "--checkpoint_dir")

    # -- devices: one mesh over all of them (all hosts, when multi-host) ---------------------
    sharding.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    context = FLAGS.context_parallelism
    if context < 1 or jax.device_count() % context:
        fail(f"--context_parallelism ({context}) must divide the number of devices ({jax.device_count()})")
    # Each device holds two chunks of every sequence (the zig-zag split of nsa_jax/context.py).
    if context > 1 and cfg.seq_len % (2 * context):
        fail(f"--seq_len ({cfg.seq_len}) must be a multiple of twice --context_parallelism ({2 * context})")
    chunk = cfg.seq_len // (2 * context)
    if context > 1 and model_config.use_sparse_attn and model_config.sliding_window_size > chunk:
        fail(f"--sliding_window_size ({model_config.sliding_window_size}) must fit in one chunk of a sequence "
             f"(--seq_len / (2 x --context_parallelism) = {chunk}): use a smaller --context_parallelism")
    if context > 1 and (FLAGS.fsdp or FLAGS.shard_optimizer or FLAGS.pack_documents):
        fail("--context_parallelism does not combine with --fsdp, --shard_optimizer or --pack_documents yet")
    mesh = sharding.make_mesh(context=context)
    if cfg.batch_size % mesh.shape[sharding.DATA]:
        shards = mesh.shape[sharding.DATA]
        fail(f"--batch_size ({cfg.batch_size}) must be a multiple of the number of devices ({shards})" if context == 1
             else f"--batch_size ({cfg.batch_size}) must be a multiple of the data-parallel devices "
                  f"({shards} = {mesh.size} devices / --context_parallelism {context})")
    is_main = jax.process_index() == 0

    # -- data -------------------------------------------------------------------------------
    try:
        train_bytes, valid_bytes = data.load_corpus(FLAGS.data_path, FLAGS.valid_fraction)
        sampler, packing = data.CropSampler, {}
        if FLAGS.pack_documents:
            separator = data.parse_separator(FLAGS.document_separator, FLAGS.data_path)
            sampler = data.PackedCropSampler
            packing = lambda split: dict(starts=data.document_starts(split, separator))  # noqa: E731
        train_data = sampler(train_bytes, cfg.seq_len, seed=cfg.seed, name="the training split",
                             **(packing(train_bytes) if packing else {}))
        valid_data = sampler(valid_bytes, cfg.seq_len, seed=cfg.seed + 1, name="the validation split",
                             fixes="raise --valid_fraction, use a larger file or a smaller --seq_len",
                             **(packing(valid_bytes) if packing else {}))
    except data.DataError as e:
        fail(str(e))

    # -- model and compiled steps -----------------------------------------------------------
    use_pallas_nsa = None if FLAGS.use_pallas_nsa else False  # None: kernels where they run natively
    model = model_config.build(nnx.Rngs(cfg.seed), use_pallas_nsa=use_pallas_nsa, dtype=cfg.dtype, remat=cfg.remat)
    trainer = Trainer(model, make_optimizer(cfg.learning_rate, cfg.max_grad_norm), mesh, fsdp=FLAGS.fsdp,
                      shard_optimizer=FLAGS.shard_optimizer)  # (--fsdp with it: the flags validator says no)
    state = trainer.init_state()

    # -- checkpoints: resume from the newest -------------------------------------------------
    checkpointer = Checkpointer(checkpoint_dir, keep=cfg.keep_checkpoints)
    start_step = 0
    try:
        newest = checkpointer.restore_newest(state, model_config, warn=lambda m: print(f"warning: {m}"),
                                             layout=STATE_LAYOUT, convert=trainer.layout_converters())
    except CheckpointError as e:
        fail(str(e))
    if newest is not None:
        start_step, state, meta = newest
        train_data.set_state(meta["train_rng"])
        valid_data.set_state(meta["valid_rng"])
        print(f"resuming from step {start_step} ({checkpoint_dir})")

    writer = SummaryWriter(log_dir) if is_main else NullWriter()  # one process logs
    backend = kernels.backend_name(use_pallas_nsa) if model_config.use_sparse_attn else "dense"
    print(f"{run_name}: {tree_size(state.params) / 1e6:.2f}M parameters, attention {backend}, "
          f"device {jax.devices()[0].platform}, {len(train_bytes) / 1e6:.1f} MB train / "
          f"{len(valid_bytes) / 1e6:.1f} MB valid, {cfg.tokens_per_step} tokens per step; "
          f"{sharding.describe(mesh)}{', fsdp' if FLAGS.fsdp else ''}"
          f"{', optimizer state split' if FLAGS.shard_optimizer else ''}")
    return Run(model_config, cfg, run_name, checkpoint_dir, log_dir, is_main, valid_bytes, train_data, valid_data,
               trainer, state, checkpointer, start_step, writer)


# -- the loop -----------------------------------------------------------------------------------

def train_loop(run: Run) -> None:
    """Steps from `run.start_step` to num_batches, each followed by the periodic work that is due,
    then the final checkpoint. SIGTERM and Ctrl-C finish the step, save it and exit (75 and 130;
    `nsa_jax.preemption`); a run of non-finite steps stops without saving (exit 3)."""
    import jax
    from tqdm import tqdm

    from nsa_jax.preemption import StopSignals

    cfg, trainer = run.cfg, run.trainer
    progress = tqdm(range(run.start_step, cfg.num_batches), initial=run.start_step, total=cfg.num_batches,
                    desc="training", mininterval=1.0, dynamic_ncols=True, disable=not run.is_main)
    metrics_log = MetricsLog(run.writer, progress, cfg, run.start_step)
    completed = (run.start_step, run.train_data.state(), run.valid_data.state())  # what an interrupt can save
    clock = SaveClock(FLAGS.checkpoint_every_minutes, multi_process=jax.process_count() > 1)
    stop = StopSignals(multi_process=jax.process_count() > 1)
    try:
        with stop:
            for step in progress:
                batches = trainer.train_batches(run.train_data.sample(cfg.grad_accum_every, cfg.batch_size))
                with stop.critical():  # the step donates the old state: keep a state to save on a second Ctrl-C
                    run.state, metrics = trainer.train_step(run.state, batches)
                    completed = (step + 1, run.train_data.state(), run.valid_data.state())
                metrics_log.record(step, metrics)
                if stop.requested(step + 1):  # skip validation and generation: save now
                    break

                if every(cfg.validate_every, step):
                    validate(run, step, progress)
                if every(cfg.generate_every, step):
                    generate(run, step, progress)
                if step + 1 < cfg.num_batches and (every(cfg.checkpoint_every, step + 1)
                                                   or clock.due(step + 1, cfg.log_every)):
                    save(run, step + 1)
                    clock.saved()
                if stop.requested(step + 1):  # a signal during the periodic work: no further step
                    break
            if stop.received is not None and completed[0] < cfg.num_batches:
                progress.close()
                with stop.final_save():
                    save_on_stop(run, *completed, stop.name)
                sys.exit(stop.exit_status)
    except NonFiniteTraining as e:
        progress.close()
        fail(f"{FLAGS.max_nonfinite_steps} consecutive steps (up to step {e.step}) had a non-finite loss "
             "or gradient and were skipped; stopping without saving. Lower --learning_rate or check the data; "
             "rerunning resumes from the last checkpoint.", status=3)
    except KeyboardInterrupt:
        progress.close()
        save_on_stop(run, *completed, "interrupted")
        sys.exit(130)
    finally:
        run.writer.close()

    progress.close()
    if cfg.num_batches > run.start_step:
        save(run, cfg.num_batches)
    run.checkpointer.wait()
    peak = peak_memory_gib()
    print(f"done: {cfg.num_batches} steps; checkpoints in {run.checkpointer.directory}, "
          f"TensorBoard events in {run.log_dir}" + ("" if peak is None else f"; peak device memory {peak:.2f} GiB"))


class SaveClock:
    """--checkpoint_every_minutes: a save is due once that long has passed since the last one (or
    the start). Processes of a multi-host run must save the same steps: they ask only at logging
    steps, and process 0's clock decides for all."""

    def __init__(self, minutes: float, multi_process: bool):
        self.seconds, self.multi_process = 60.0 * minutes, multi_process
        self.last = time.monotonic()

    def due(self, step: int, log_every: int) -> bool:
        if self.seconds <= 0:
            return False
        if not self.multi_process:
            return time.monotonic() - self.last >= self.seconds
        if not every(log_every, step):
            return False
        import numpy as np
        from jax.experimental import multihost_utils

        mine = np.array(time.monotonic() - self.last >= self.seconds)
        return bool(multihost_utils.broadcast_one_to_all(mine))

    def saved(self) -> None:
        self.last = time.monotonic()


def every(n: int, step: int) -> bool:
    return n > 0 and step % n == 0


class NonFiniteTraining(Exception):
    """--max_nonfinite_steps steps in a row had a non-finite loss or gradient (`step` the last)."""

    def __init__(self, step: int):
        self.step = step


class MetricsLog:
    """Training metrics to TensorBoard and the progress bar. They are fetched from the device every
    log_every steps, not per step (a fetch waits for the step); consecutive non-finite (skipped)
    steps are counted as they are fetched."""

    def __init__(self, writer: SummaryWriter | NullWriter, progress: tqdm, cfg: TrainConfig, start_step: int):
        self.writer, self.progress, self.cfg = writer, progress, cfg
        self.pending: list[tuple[int, dict[str, jax.Array]]] = []  # (step, metrics still on the device)
        self.nonfinite_run = 0  # consecutive skipped steps
        self.last_log_time: float | None = None
        self.last_log_step = start_step

    def record(self, step: int, metrics: dict[str, jax.Array]) -> None:
        """Queue a step's metrics; on a logging step, fetch and write the queue. Raises
        NonFiniteTraining after --max_nonfinite_steps skipped steps in a row."""
        import jax

        cfg, writer = self.cfg, self.writer
        self.pending.append((step, metrics))
        if self.last_log_time is None:  # the first step includes compilation: start the clock after it
            jax.block_until_ready(metrics)
            self.last_log_time, self.last_log_step = time.perf_counter(), step + 1
            return
        if not (every(cfg.log_every, step + 1) or step + 1 == cfg.num_batches):
            return
        fetched = jax.device_get(self.pending)
        now = time.perf_counter()
        step_time = (now - self.last_log_time) / max(1, step + 1 - self.last_log_step)
        tokens_per_sec = cfg.tokens_per_step / step_time
        for s, m in fetched:
            self.nonfinite_run = self.nonfinite_run + 1 if m["skipped"] else 0
            if m["skipped"]:
                writer.add_scalar("train/skipped_steps", 1, s)
                self.progress.write(f"step {s}: non-finite loss or gradient; update skipped")
            else:
                writer.add_scalar("train/loss", m["loss"], s)
                writer.add_scalar("train/bits_per_byte", m["bits_per_byte"], s)
                writer.add_scalar("train/grad_norm", m["grad_norm"], s)
            if self.nonfinite_run >= FLAGS.max_nonfinite_steps:
                raise NonFiniteTraining(s)
        writer.add_scalar("train/learning_rate", cfg.learning_rate, step)
        writer.add_scalar("train/tokens_per_sec", tokens_per_sec, step)
        writer.add_scalar("train/step_time_ms", 1e3 * step_time, step)
        postfix = dict(loss=f"{fetched[-1][1]['loss']:.3f}", tok_s=f"{tokens_per_sec:,.0f}")
        peak = peak_memory_gib()
        if peak is not None:
            writer.add_scalar("train/peak_memory_gib", peak, step)
            postfix["mem"] = f"{peak:.1f}GiB"
        self.progress.set_postfix(**postfix)
        self.pending, self.last_log_time, self.last_log_step = [], now, step + 1


def peak_memory_gib() -> float | None:
    """Peak memory in use on this process's first device so far (GiB), where the platform reports it."""
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**30


# -- periodic work: validate, generate, save ----------------------------------------------------

def validate(run: Run, step: int, progress: tqdm) -> None:
    """The loss on one validation batch (batch_size crops, as the seed's)."""
    import numpy as np

    batch = run.trainer.eval_batch(run.valid_data.sample(run.cfg.batch_size))
    loss = float(run.trainer.eval_step(run.state.params, batch))
    run.writer.add_scalar("valid/loss", loss, step)
    run.writer.add_scalar("valid/bits_per_byte", loss / np.log(2), step)
    progress.write(f"step {step}: validation loss {loss:.3f} ({loss / np.log(2):.3f} bits per byte)")


def generate(run: Run, step: int, progress: tqdm) -> None:
    """Continue prime_length bytes of validation text. The prime and the sampling key depend on
    (seed, step) only, so a resumed run generates what the uninterrupted one does."""
    import jax
    import numpy as np

    from nsa_jax import data

    cfg = run.cfg
    prime_rng = np.random.default_rng([cfg.seed, step])
    start = prime_rng.integers(0, len(run.valid_bytes) - cfg.prime_length)
    prime = run.valid_bytes[start: start + cfg.prime_length].astype(np.int32)
    sampled = run.trainer.model(run.state.params).sample(
        prime[None], cfg.prime_length + cfg.generate_length, use_cache_kv=cfg.use_efficient_inference,
        rng=jax.random.fold_in(jax.random.key(cfg.seed), step))
    text = data.decode_tokens(np.asarray(sampled[0]))
    progress.write(f"\n{data.decode_tokens(prime)}\n{'-' * 40}\n{text}\n")
    run.writer.add_text("samples", f"{data.decode_tokens(prime)} ▌ {text}", step)


def save(run: Run, step: int, train_rng: dict[str, Any] | None = None,
         valid_rng: dict[str, Any] | None = None) -> None:
    """Checkpoint `run.state` as `step`, with what resuming and sample.py need: both configurations
    and the samplers' RNG states (their current ones unless given)."""
    from nsa_jax.checkpoint import all_finite
    from nsa_jax.training import STATE_LAYOUT

    if not all_finite(run.state.params):  # never replace a good checkpoint with a broken state
        print(f"warning: not saving step {step}: the parameters hold non-finite values")
        return
    meta = dict(model_config=run.model_config.to_dict(), train_config=run.cfg.to_dict(), run_name=run.run_name,
                data_path=FLAGS.data_path, train_rng=train_rng or run.train_data.state(),
                valid_rng=valid_rng or run.valid_data.state(), state_layout=STATE_LAYOUT)
    run.checkpointer.save(step, run.state, meta)


def save_on_stop(run: Run, done: int, train_rng: dict[str, Any], valid_rng: dict[str, Any], why: str) -> None:
    """A stop signal: save the last completed step (with the RNG states from right after it) unless
    it is saved already, wait until the checkpoint is on disk, and say so in one line."""
    if done > run.start_step:
        if run.checkpointer.latest_step() != done:
            save(run, done, train_rng, valid_rng)
        run.checkpointer.wait()
        print(f"\n{why}: saved step {done} to {run.checkpoint_dir}; run the same command to resume", flush=True)
    else:
        print(f"\n{why} before the first step finished; nothing saved", flush=True)


if __name__ == "__main__":
    main(sys.argv)

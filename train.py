"""Train a byte-level language model with Native Sparse Attention (or dense attention).

    python train.py --flagfile=configs/quickstart.flags      # ~1 minute on a CPU
    python train.py --flagfile=configs/enwik8.flags          # the seed's run (enwik8, GPU)
    tensorboard --logdir runs

Every constant of the seed's train.py is a flag of the same name in lower case. The loop
reads top to bottom: configuration, data, model, checkpoint (resume), then steps with
periodic validation, generation and checkpoints.
"""

from __future__ import annotations

import re
import sys
import time

from absl import flags

from nsa_jax.config import ModelConfig, TrainConfig

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
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "activation dtype (parameters stay float32)")
flags.DEFINE_string("data_path", "data/enwik8.gz",
                    "enwik8(.gz|.zip), any byte file, or 'stdlib' (this Python's standard library sources)")
flags.DEFINE_float("valid_fraction", 0.05, "validation share of a non-enwik8 corpus")
# absl.logging (imported with flax) already defines --log_dir; give it our meaning and default.
flags.FLAGS.set_default("log_dir", "runs")
flags.FLAGS["log_dir"].help = "TensorBoard events go to <log_dir>/<run_name>"
flags.DEFINE_string("checkpoint_dir", None, "checkpoint directory (default: checkpoints/<run_name>)")
flags.DEFINE_integer("checkpoint_every", 1000, "save every N steps (0: only at the end)")
flags.DEFINE_integer("keep_checkpoints", 3, "checkpoints kept")
flags.DEFINE_integer("log_every", 10, "fetch and log training metrics every N steps")
flags.DEFINE_integer("seed", 0, "seeds parameters, data crops and sampling")
flags.DEFINE_boolean("fsdp", False, "split parameters and optimizer state over the devices (default: replicate)")
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


def fail(message: str) -> None:
    """A user error: one line, no traceback, exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def check_writable(directory: str, flag: str) -> None:
    """Create `directory` and write a probe file in it, or fail naming the flag."""
    from pathlib import Path

    path = Path(directory).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        fail(f"cannot write to {flag} {directory}: {e.strerror or e}")


def configs_from_flags() -> tuple[ModelConfig, TrainConfig, str]:
    model = ModelConfig(
        dim=FLAGS.dim, depth=FLAGS.depth, heads=FLAGS.heads, kv_heads=FLAGS.kv_heads, dim_head=FLAGS.dim_head,
        ff_expansion_factor=FLAGS.ff_expansion_factor, use_sparse_attn=FLAGS.use_sparse_attn,
        sliding_window_size=FLAGS.sliding_window_size, compress_block_size=FLAGS.compress_block_size,
        compress_block_sliding_stride=(FLAGS.compress_block_size if FLAGS.compress_block_sliding_stride is None
                                       else FLAGS.compress_block_sliding_stride),
        selection_block_size=FLAGS.fine_block_size, num_selected_blocks=FLAGS.num_fine_selected,
        use_diff_topk=FLAGS.use_diff_topk, query_heads_share_selected_kv=FLAGS.query_heads_share_selection,
        interpolated_importance_score=FLAGS.interpolated_importance_score, compress_mlp=FLAGS.compress_mlp,
    )
    train = TrainConfig(
        num_batches=FLAGS.num_batches, batch_size=FLAGS.batch_size, grad_accum_every=FLAGS.grad_accum_every,
        learning_rate=FLAGS.learning_rate, seq_len=FLAGS.seq_len, validate_every=FLAGS.validate_every,
        generate_every=FLAGS.generate_every, prime_length=FLAGS.prime_length,
        generate_length=FLAGS.generate_length, use_efficient_inference=FLAGS.use_efficient_inference,
        checkpoint_every=FLAGS.checkpoint_every, keep_checkpoints=FLAGS.keep_checkpoints,
        log_every=FLAGS.log_every, seed=FLAGS.seed, dtype=FLAGS.dtype,
    )
    run_name = FLAGS.run_name
    if run_name is None:  # the seed's experiment name
        run_name = "baseline" if not model.use_sparse_attn else (
            f"sparse-attn: compress size {model.compress_block_size} | fine size {model.selection_block_size}"
            f" | {model.num_selected_blocks} selected")
    return model, train, run_name


def slug(name: str) -> str:
    """A directory name for a run name ('sparse-attn: compress size 16 | ...' -> 'sparse-attn_compress_size_16_...')."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "run"


class NullWriter:
    """What processes other than 0 log to."""

    def add_scalar(self, *args, **kwargs) -> None: ...
    def add_text(self, *args, **kwargs) -> None: ...
    def close(self) -> None: ...


class NonFiniteTraining(Exception):
    def __init__(self, step: int):
        self.step = step


def main(argv: list[str]) -> None:
    try:
        FLAGS(argv)
    except flags.Error as e:
        fail(f"{e} (see python train.py --helpfull)")
    model_config, cfg, run_name = configs_from_flags()
    problem = cfg.validate() or model_config.validate() or (
        FLAGS.max_nonfinite_steps < 1 and f"--max_nonfinite_steps must be >= 1, got {FLAGS.max_nonfinite_steps}")
    if problem:
        for field, flag in FLAG_NAMES.items():
            problem = problem.replace(field, flag)
        fail(problem)
    checkpoint_dir = FLAGS.checkpoint_dir or f"checkpoints/{slug(run_name)}"
    log_dir = f"{FLAGS.log_dir}/{slug(run_name)}"
    check_writable(log_dir, "--log_dir")
    check_writable(checkpoint_dir, "--checkpoint_dir")

    # Heavy imports after the flags, so that `--help` and flag errors answer at once.
    import jax
    import numpy as np
    from flax import nnx
    from tensorboardX import SummaryWriter
    from tqdm import tqdm

    from nsa_jax import data, sharding
    from nsa_jax.checkpoint import CheckpointError, Checkpointer, all_finite
    from nsa_jax.training import Trainer, make_optimizer, tree_size

    # -- devices: one mesh over all of them (all hosts, when multi-host) ---------------------
    sharding.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    mesh = sharding.make_mesh()
    if cfg.batch_size % mesh.size:
        fail(f"--batch_size ({cfg.batch_size}) must be a multiple of the number of devices ({mesh.size})")
    is_main = jax.process_index() == 0

    # -- data -------------------------------------------------------------------------------
    try:
        train_bytes, valid_bytes = data.load_corpus(FLAGS.data_path, FLAGS.valid_fraction)
        train_data = data.CropSampler(train_bytes, cfg.seq_len, seed=cfg.seed)
        valid_data = data.CropSampler(valid_bytes, cfg.seq_len, seed=cfg.seed + 1)
    except data.DataError as e:
        fail(str(e))

    # -- model and compiled steps -----------------------------------------------------------
    model = model_config.build(nnx.Rngs(cfg.seed), use_pallas_nsa=None if FLAGS.use_pallas_nsa else False,
                               dtype=cfg.dtype)
    trainer = Trainer(model, make_optimizer(cfg.learning_rate, cfg.max_grad_norm), mesh, fsdp=FLAGS.fsdp)
    state = trainer.init_state()

    # -- checkpoints: resume from the newest -------------------------------------------------
    checkpointer = Checkpointer(checkpoint_dir, keep=cfg.keep_checkpoints)
    start_step = 0
    try:
        newest = checkpointer.restore_newest(state, model_config, warn=lambda m: print(f"warning: {m}"))
    except CheckpointError as e:
        fail(str(e))
    if newest is not None:
        start_step, state, meta = newest
        train_data.set_state(meta["train_rng"])
        valid_data.set_state(meta["valid_rng"])
        print(f"resuming from step {start_step} ({checkpoint_dir})")

    def save(step: int, train_rng=None, valid_rng=None) -> None:
        if not all_finite(state.params):  # never replace a good checkpoint with a broken state
            print(f"warning: not saving step {step}: the parameters hold non-finite values")
            return
        meta = dict(model_config=model_config.to_dict(), train_config=cfg.to_dict(), run_name=run_name,
                    data_path=FLAGS.data_path, train_rng=train_rng or train_data.state(),
                    valid_rng=valid_rng or valid_data.state())
        checkpointer.save(step, state, meta)

    writer = SummaryWriter(log_dir) if is_main else NullWriter()  # one process logs
    backend = "dense" if not model_config.use_sparse_attn else (
        "pallas" if FLAGS.use_pallas_nsa and jax.default_backend() == "gpu" else "reference")
    print(f"{run_name}: {tree_size(state.params) / 1e6:.2f}M parameters, attention {backend}, "
          f"device {jax.devices()[0].platform}, {len(train_bytes) / 1e6:.1f} MB train / "
          f"{len(valid_bytes) / 1e6:.1f} MB valid, {cfg.tokens_per_step} tokens per step; "
          f"{sharding.describe(mesh)}{', fsdp' if FLAGS.fsdp else ''}")

    def every(n: int, step: int) -> bool:
        return n > 0 and step % n == 0

    # -- the loop -----------------------------------------------------------------------------
    pending = []  # (step, metrics on device): fetched every log_every steps, no sync per step
    nonfinite_run = 0  # consecutive skipped steps
    last_log_time, last_log_step = None, start_step
    completed = (start_step, train_data.state(), valid_data.state())  # what an interrupt can save
    progress = tqdm(range(start_step, cfg.num_batches), initial=start_step, total=cfg.num_batches,
                    desc="training", mininterval=1.0, dynamic_ncols=True, disable=not is_main)
    try:
        for step in progress:
            batches = trainer.train_batches(train_data.sample(cfg.grad_accum_every, cfg.batch_size))
            state, metrics = trainer.train_step(state, batches)
            completed = (step + 1, train_data.state(), valid_data.state())
            pending.append((step, metrics))

            if last_log_time is None:  # the first step includes compilation: start the clock after it
                jax.block_until_ready(metrics)
                last_log_time, last_log_step = time.perf_counter(), step + 1
            elif every(cfg.log_every, step + 1) or step + 1 == cfg.num_batches:
                fetched = jax.device_get(pending)
                now = time.perf_counter()
                step_time = (now - last_log_time) / max(1, step + 1 - last_log_step)
                tokens_per_sec = cfg.tokens_per_step / step_time
                for s, m in fetched:
                    nonfinite_run = nonfinite_run + 1 if m["skipped"] else 0
                    if m["skipped"]:
                        writer.add_scalar("train/skipped_steps", 1, s)
                        progress.write(f"step {s}: non-finite loss or gradient; update skipped")
                    else:
                        writer.add_scalar("train/loss", m["loss"], s)
                        writer.add_scalar("train/bits_per_byte", m["bits_per_byte"], s)
                        writer.add_scalar("train/grad_norm", m["grad_norm"], s)
                    if nonfinite_run >= FLAGS.max_nonfinite_steps:
                        raise NonFiniteTraining(s)
                writer.add_scalar("train/learning_rate", cfg.learning_rate, step)
                writer.add_scalar("train/tokens_per_sec", tokens_per_sec, step)
                writer.add_scalar("train/step_time_ms", 1e3 * step_time, step)
                progress.set_postfix(loss=f"{fetched[-1][1]['loss']:.3f}", tok_s=f"{tokens_per_sec:,.0f}")
                pending, last_log_time, last_log_step = [], now, step + 1

            if every(cfg.validate_every, step):
                loss = float(trainer.eval_step(state.params, trainer.eval_batch(valid_data.sample(cfg.batch_size))))
                writer.add_scalar("valid/loss", loss, step)
                writer.add_scalar("valid/bits_per_byte", loss / np.log(2), step)
                progress.write(f"step {step}: validation loss {loss:.3f} ({loss / np.log(2):.3f} bits per byte)")

            if every(cfg.generate_every, step):
                prime_rng = np.random.default_rng([cfg.seed, step])  # stateless: resume-safe
                start = prime_rng.integers(0, len(valid_bytes) - cfg.prime_length)
                prime = valid_bytes[start: start + cfg.prime_length].astype(np.int32)
                sampled = trainer.model(state.params).sample(
                    prime[None], cfg.prime_length + cfg.generate_length,
                    use_cache_kv=cfg.use_efficient_inference,
                    rng=jax.random.fold_in(jax.random.key(cfg.seed), step))
                text = data.decode_tokens(np.asarray(sampled[0]))
                progress.write(f"\n{data.decode_tokens(prime)}\n{'-' * 40}\n{text}\n")
                writer.add_text("samples", f"{data.decode_tokens(prime)} ▌ {text}", step)

            if every(cfg.checkpoint_every, step + 1) and step + 1 < cfg.num_batches:
                save(step + 1)
    except NonFiniteTraining as e:
        progress.close()
        print(f"error: {FLAGS.max_nonfinite_steps} consecutive steps (up to step {e.step}) had a non-finite loss "
              "or gradient and were skipped; stopping without saving. Lower --learning_rate or check the data; "
              "rerunning resumes from the last checkpoint.", file=sys.stderr)
        sys.exit(3)
    except KeyboardInterrupt:
        progress.close()
        done, train_rng, valid_rng = completed
        if done > start_step:
            save(done, train_rng, valid_rng)
            checkpointer.wait()
            print(f"\ninterrupted: saved step {done} to {checkpoint_dir}; run the same command to resume")
        else:
            print("\ninterrupted before the first step finished; nothing saved")
        sys.exit(130)
    finally:
        writer.close()

    progress.close()
    if cfg.num_batches > start_step:
        save(cfg.num_batches)
    checkpointer.wait()
    print(f"done: {cfg.num_batches} steps; checkpoints in {checkpointer.directory}, "
          f"TensorBoard events in {log_dir}")


if __name__ == "__main__":
    main(sys.argv)

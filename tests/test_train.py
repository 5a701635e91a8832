"""train.py end to end (subprocesses, as users run it) and its data pipeline.

The quick tier trains once (the `trained` fixture) and checks that run, sample.py on its checkpoint
and a resume with another model; the slow tier (`pytest -m slow`) runs the longer ones: exact
resumption, after a stop and after Ctrl-C, and periodic generation with sample.py's options.
"""

from __future__ import annotations

import fcntl
import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nsa_jax import data
from nsa_jax.checkpoint import Checkpointer, model_config_of
from nsa_jax.config import ModelConfig
from nsa_jax.training import Trainer, make_optimizer
from flax import nnx

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--dim=32", "--depth=1", "--heads=2", "--kv_heads=1", "--dim_head=16", "--seq_len=32", "--batch_size=2",
    "--grad_accum_every=2", "--sliding_window_size=8", "--compress_block_size=8", "--fine_block_size=8",
    "--num_fine_selected=1", "--generate_every=0", "--validate_every=0", "--learning_rate=3e-3",
    "--log_every=5",
]


def tiny_run_command(tmp_path: Path, batch_size: int) -> list[str]:
    """train.py with TINY on a corpus of our own sources, logs and checkpoints under tmp_path
    (for runs across device counts and splits: tests/test_sharding.py, tests/test_context.py)."""
    root = Path(__file__).resolve().parents[1]
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(b"".join(sorted(p.read_bytes() for p in (root / "nsa_jax").glob("*.py"))))
    return [sys.executable, str(root / "train.py"), *TINY, f"--data_path={corpus}", f"--log_dir={tmp_path}",
            f"--checkpoint_dir={tmp_path / 'c'}", f"--batch_size={batch_size}"]


def write_corpus(path: Path) -> Path:
    """A small real text: the package's own sources."""
    path.write_bytes(b"".join(sorted(p.read_bytes() for p in (ROOT / "nsa_jax").glob("*.py"))))
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("data") / "corpus.txt")


def train(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def final_params(checkpoint_dir: Path):
    ckpt = Checkpointer(checkpoint_dir)
    step = ckpt.latest_step()
    config = model_config_of(ckpt.restore_meta(step))
    trainer = Trainer(config.build(nnx.Rngs(0)), make_optimizer(1e-3))
    state, meta = ckpt.restore(step, trainer.init_state())
    ckpt.close()
    return step, state


@pytest.fixture(scope="session")
def trained(tmp_path_factory, worker_id) -> tuple[subprocess.CompletedProcess, Path]:
    """One short training run that the quick end-to-end tests share: validation at steps 0, 20, 40,
    generation at 0 and 30, a checkpoint at 60. (The run's output, its directory.) Under xdist the
    workers share it: the first trains (holding a lock), the others read its saved output."""
    if worker_id == "master":  # no xdist: this process alone
        return _train_shared(tmp_path_factory.mktemp("trained"))
    shared = tmp_path_factory.getbasetemp().parent  # this run's directory, common to its workers
    with open(shared / "trained.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _train_shared(shared / "trained")


def _train_shared(tmp_path: Path) -> tuple[subprocess.CompletedProcess, Path]:
    result = tmp_path / "result.json"
    if not result.exists():
        tmp_path.mkdir(exist_ok=True)
        corpus = write_corpus(tmp_path / "corpus.txt")
        run = train(*TINY, f"--data_path={corpus}", "--num_batches=60", "--validate_every=20", "--generate_every=30",
                    "--prime_length=8", "--generate_length=16", f"--checkpoint_dir={tmp_path / 'ckpt'}",
                    f"--log_dir={tmp_path / 'runs'}", "--run_name=t", cwd=tmp_path)
        result.write_text(json.dumps(dict(args=run.args, returncode=run.returncode, stdout=run.stdout,
                                          stderr=run.stderr)))
    return subprocess.CompletedProcess(**json.loads(result.read_text())), tmp_path


def test_training_lowers_the_validation_loss(trained):
    run, tmp_path = trained
    assert run.returncode == 0, run.stderr[-2000:]
    losses = [float(x) for x in re.findall(r"validation loss ([0-9.]+)", run.stdout + run.stderr)]
    assert len(losses) == 3 and losses[-1] < losses[0] - 0.5, losses
    assert list((tmp_path / "runs" / "t").glob("events.out.tfevents.*")), "TensorBoard events written"
    assert (tmp_path / "ckpt" / "60").is_dir()


def test_sample_py_continues_a_trained_checkpoint(trained):
    run, tmp_path = trained
    assert run.returncode == 0, run.stderr[-2000:]
    assert (run.stdout + run.stderr).count("-" * 40) == 2  # generated at steps 0 and 30
    sample = subprocess.run([sys.executable, str(ROOT / "sample.py"), f"--checkpoint_dir={tmp_path / 'ckpt'}",
                             "--prime=def f(", "--length=24"], capture_output=True, text=True, timeout=300)
    assert sample.returncode == 0, sample.stderr[-2000:]
    text = sample.stdout.rstrip("\n")
    assert text.startswith("def f(") and len(text) == len("def f(") + 24, repr(text)
    assert f"# step 60 of {tmp_path / 'ckpt'}" in sample.stderr


@pytest.mark.slow
def test_resume_is_exact(tmp_path, corpus):
    common = [*TINY, f"--data_path={corpus}", f"--log_dir={tmp_path / 'runs'}", "--checkpoint_every=0"]
    straight = train(*common, "--num_batches=16", f"--checkpoint_dir={tmp_path / 'a'}", cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr[-2000:]
    first = train(*common, "--num_batches=8", f"--checkpoint_dir={tmp_path / 'b'}", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    second = train(*common, "--num_batches=16", f"--checkpoint_dir={tmp_path / 'b'}", cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resuming from step 8" in second.stdout
    step_a, state_a = final_params(tmp_path / "a")
    step_b, state_b = final_params(tmp_path / "b")
    assert step_a == step_b == 16
    for x, y in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _same_final_state(a: Path, b: Path, step: int) -> None:
    (step_a, state_a), (step_b, state_b) = final_params(a), final_params(b)
    assert step_a == step_b == step
    for x, y in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_ctrl_c_saves_the_last_step_then_resumes_exactly(tmp_path, corpus):
    """SIGINT right after a validation, so mostly inside the next step (whose call deletes the state
    it is given): exit 130 with the last completed step saved; the same command resumes from it and
    ends where an uninterrupted run does."""
    common = [*TINY, f"--data_path={corpus}", f"--log_dir={tmp_path / 'runs'}", "--checkpoint_every=0",
              "--validate_every=5"]
    # The child gets a terminal's SIGINT (KeyboardInterrupt) also when the tests run in a background
    # job, which ignores SIGINT: a handled signal is reset to its default in the child, an ignored one is not.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = _start([*common, "--num_batches=100000", f"--checkpoint_dir={tmp_path / 'b'}"], tmp_path)
    finally:
        signal.signal(signal.SIGINT, previous)
    for line in proc.stdout:
        if "step 10: validation loss" in line:
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    done = int(re.search(r"interrupted: saved step (\d+) to ", out).group(1))
    assert done > 10 and (tmp_path / "b" / str(done)).is_dir()
    resumed = train(*common, f"--num_batches={done + 2}", f"--checkpoint_dir={tmp_path / 'b'}", cwd=tmp_path)
    assert resumed.returncode == 0 and f"resuming from step {done}" in resumed.stdout, resumed.stderr[-2000:]
    straight = train(*common, f"--num_batches={done + 2}", f"--checkpoint_dir={tmp_path / 'a'}", cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr[-2000:]
    _same_final_state(tmp_path / "a", tmp_path / "b", done + 2)


@pytest.mark.slow
def test_sigterm_saves_the_step_then_resumes_exactly(tmp_path, corpus):
    """Preemption: SIGTERM while checkpoints are being written (one per step) finishes the step, saves
    it, waits for it and exits 75 naming the step; the previous checkpoint is still readable; the
    same command resumes there and ends where an uninterrupted run does, bit for bit."""
    common = [*TINY, f"--data_path={corpus}", f"--log_dir={tmp_path / 'runs'}", "--checkpoint_every=1",
              "--keep_checkpoints=2", "--validate_every=5"]
    proc = _start([*common, "--num_batches=100000", f"--checkpoint_dir={tmp_path / 'b'}"], tmp_path)
    for line in proc.stdout:
        if "step 10: validation loss" in line:
            proc.send_signal(signal.SIGTERM)
            break
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 75 and "Traceback" not in err, err[-2000:]
    done = int(re.search(r"preempted \(SIGTERM\): saved step (\d+) to ", out).group(1))
    assert done > 10
    ckpt = Checkpointer(tmp_path / "b")
    assert ckpt.latest_step() == done and (done - 1) in ckpt.manager.all_steps()
    assert ckpt.restore_meta(done - 1)["step"] == done - 1  # the previous checkpoint: intact
    ckpt.close()
    resumed = train(*common, f"--num_batches={done + 2}", f"--checkpoint_dir={tmp_path / 'b'}", cwd=tmp_path)
    assert resumed.returncode == 0 and f"resuming from step {done}" in resumed.stdout, resumed.stderr[-2000:]
    straight = train(*common, f"--num_batches={done + 2}", f"--checkpoint_dir={tmp_path / 'a'}", cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr[-2000:]
    _same_final_state(tmp_path / "a", tmp_path / "b", done + 2)


@pytest.mark.slow
def test_grace_period_ending_mid_write_keeps_a_usable_checkpoint(tmp_path, corpus):
    """SIGTERM, then SIGKILL 50 ms later (a grace period too short), while a checkpoint is written
    every step: the rerun resumes from the newest complete checkpoint and ends where an
    uninterrupted run does."""
    common = [*TINY, f"--data_path={corpus}", f"--log_dir={tmp_path / 'runs'}", "--checkpoint_every=1",
              "--validate_every=5"]
    proc = _start([*common, "--num_batches=100000", f"--checkpoint_dir={tmp_path / 'b'}"], tmp_path)
    for line in proc.stdout:
        if "step 10: validation loss" in line:
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.05)
            proc.kill()
            break
    proc.communicate(timeout=60)
    resumed = train(*common, "--num_batches=16", f"--checkpoint_dir={tmp_path / 'b'}", cwd=tmp_path)
    assert resumed.returncode == 0 and "resuming from step" in resumed.stdout, resumed.stderr[-2000:]
    straight = train(*common, "--num_batches=16", f"--checkpoint_dir={tmp_path / 'a'}", cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr[-2000:]
    _same_final_state(tmp_path / "a", tmp_path / "b", 16)


@pytest.mark.slow
def test_sigterm_on_one_host_stops_every_process_at_the_same_step(tmp_path, corpus):
    """Two processes (jax.distributed on CPU, gloo collectives) train one model; SIGTERM reaches only
    process 1. JAX's preemption sync point makes both save the same step and exit 75; the same two
    commands resume from that step. Saves on the minute clock happen at the same logging steps in both."""
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    # The minute clock (due at once) is read at logging steps (--log_every=5), process 0 deciding.
    common = [*TINY, f"--data_path={corpus}", f"--log_dir={tmp_path / 'runs'}", "--checkpoint_every=0",
              "--checkpoint_every_minutes=1e-9", "--validate_every=5", f"--checkpoint_dir={tmp_path / 'c'}",
              f"--coordinator_address=localhost:{port}", "--num_processes=2"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"}

    def start(num_batches: int) -> list[subprocess.Popen]:
        return [subprocess.Popen([sys.executable, str(ROOT / "train.py"), *common, f"--num_batches={num_batches}",
                                  f"--process_id={i}"], cwd=tmp_path, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]

    procs = start(100000)
    for line in procs[0].stdout:
        if "step 10: validation loss" in line:
            procs[1].send_signal(signal.SIGTERM)
            break
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [75, 75], [err[-1500:] for _, err in outs]
    steps = {int(re.search(r"preempted \(SIGTERM\): saved step (\d+) to ", out).group(1)) for out, _ in outs}
    assert len(steps) == 1, steps
    (done,) = steps
    saved = sorted(int(p.name) for p in (tmp_path / "c").iterdir() if p.name.isdigit())
    assert saved[-1] == done and len(saved) > 1 and all(step % 5 == 0 for step in saved[:-1]), saved
    procs = start(done + 2)
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-1500:] for _, err in outs]
    assert f"resuming from step {done}" in outs[0][0]


def test_save_clock(monkeypatch):
    """--checkpoint_every_minutes: due once the minutes have passed since the last save, not before."""
    sys.path.insert(0, str(ROOT))
    import train as train_module

    now = [1000.0]
    monkeypatch.setattr(train_module.time, "monotonic", lambda: now[0])
    clock = train_module.SaveClock(2.0, multi_process=False)
    now[0] += 119.9
    assert not clock.due(5, log_every=10)
    now[0] += 0.1
    assert clock.due(6, log_every=10)
    clock.saved()
    assert not clock.due(7, log_every=10)
    assert not train_module.SaveClock(0.0, multi_process=False).due(8, log_every=10)  # 0: off


@pytest.mark.slow
def test_checkpoint_every_minutes(tmp_path, corpus):
    """--checkpoint_every_minutes saves on the clock as well as every N steps (here a few nanoseconds:
    every step)."""
    run = train(*TINY, f"--data_path={corpus}", f"--log_dir={tmp_path}", f"--checkpoint_dir={tmp_path / 'c'}",
                "--num_batches=6", "--checkpoint_every=0", "--checkpoint_every_minutes=1e-9",
                "--keep_checkpoints=10", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert sorted(int(p.name) for p in (tmp_path / "c").iterdir() if p.name.isdigit()) == [1, 2, 3, 4, 5, 6]


def test_resume_with_another_model_is_refused(tmp_path, corpus, trained):
    shutil.copytree(trained[1] / "ckpt", tmp_path / "c")  # refusing moves nothing, but the copy is the test's own
    run = train(*TINY, f"--data_path={corpus}", f"--checkpoint_dir={tmp_path / 'c'}", f"--log_dir={tmp_path}",
                "--num_batches=64", "--dim=48", cwd=tmp_path)
    assert run.returncode == 2
    assert "dim: 32 in the checkpoint, 48 now" in run.stderr and "Traceback" not in run.stderr


def test_missing_data_path_is_one_line(tmp_path):
    run = train("--data_path=/no/such/enwik8.gz", cwd=tmp_path)
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0 and "/no/such/enwik8.gz" in run.stderr, run.stderr


def test_unknown_flag_is_one_line(tmp_path):
    run = train("--no_such_flag=1", cwd=tmp_path)
    assert run.returncode == 2 and "no_such_flag" in run.stderr and "Traceback" not in run.stderr


def test_flagfiles_parse():
    sys.path.insert(0, str(ROOT))
    import train as train_module

    train_module.FLAGS.unparse_flags()
    train_module.FLAGS(["train.py", f"--flagfile={ROOT / 'configs' / 'enwik8.flags'}"])
    model, cfg, run_name = train_module.configs_from_flags()
    assert model == ModelConfig()  # the seed's model
    assert (cfg.batch_size, cfg.grad_accum_every, cfg.learning_rate, cfg.seq_len, cfg.num_batches) == (4, 4, 1e-4, 512, 100_000)
    assert run_name == "sparse-attn: compress size 16 | fine size 16 | 4 selected"
    assert train_module.FLAGS.use_pallas_nsa and train_module.FLAGS.data_path == "data/enwik8.gz"

    train_module.FLAGS.unparse_flags()
    train_module.FLAGS(["train.py", f"--flagfile={ROOT / 'configs' / 'quickstart.flags'}", "--seq_len=64"])
    model, cfg, run_name = train_module.configs_from_flags()
    assert (model.dim, cfg.seq_len, run_name) == (128, 64, "quickstart")

    train_module.FLAGS.unparse_flags()  # an ablation gets its own default run (and checkpoint directory)
    train_module.FLAGS(["train.py", f"--flagfile={ROOT / 'configs' / 'enwik8.flags'}", "--nsa_branches=compressed,sliding"])
    model, cfg, run_name = train_module.configs_from_flags()
    assert model.nsa_branches == "compressed,sliding"
    assert run_name == "sparse-attn: compress size 16 | fine size 16 | 4 selected | branches compressed,sliding"
    train_module.FLAGS.unparse_flags()


@pytest.mark.parametrize("name,writer", [
    ("enwik8", lambda p, b: p.write_bytes(b)),
    ("enwik8.gz", lambda p, b: p.write_bytes(gzip.compress(b))),
    ("enwik8.zip", lambda p, b: zipfile.ZipFile(p, "w").writestr("enwik8", b)),
])
def test_enwik8_formats_and_seed_split(tmp_path, name, writer):
    raw = np.random.default_rng(0).integers(0, 256, 1000, dtype=np.uint8).tobytes()
    writer(tmp_path / name, raw)
    train_bytes, valid_bytes = data.load_corpus(str(tmp_path / name), enwik8_split=(950, 900))
    assert train_bytes.tobytes() == raw[:900] and valid_bytes.tobytes() == raw[900:950]


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_other_files_split_by_fraction(tmp_path, suffix):
    raw = np.random.default_rng(1).integers(0, 256, 1000, dtype=np.uint8).tobytes()
    path = tmp_path / f"corpus.bin{suffix}"
    path.write_bytes(gzip.compress(raw) if suffix else raw)
    train_bytes, valid_bytes = data.load_corpus(str(path), valid_fraction=0.1)
    assert train_bytes.tobytes() == raw[:900] and valid_bytes.tobytes() == raw[900:]


def test_builtin_stdlib_corpus_is_deterministic():
    a, b = data.stdlib_corpus(2**20), data.stdlib_corpus(2**20)
    assert a == b and len(a) == 2**20 and b"def " in a


def test_sampler_state_round_trip():
    corpus = np.arange(1000, dtype=np.uint8)
    sampler = data.CropSampler(corpus, seq_len=16, seed=3)
    sampler.sample(4)
    state = sampler.state()
    expected = sampler.sample(2, 4)
    other = data.CropSampler(corpus, seq_len=16, seed=99)
    other.set_state(state)
    np.testing.assert_array_equal(other.sample(2, 4), expected)
    assert expected.shape == (2, 4, 17)
    np.testing.assert_array_equal(np.diff(expected, axis=-1) % 256, 1)  # contiguous crops


def test_corpus_shorter_than_a_crop_is_a_clear_error():
    with pytest.raises(data.DataError, match="fewer than seq_len"):
        data.CropSampler(np.zeros(10, np.uint8), seq_len=16, seed=0)


@pytest.mark.slow
def test_periodic_generation_then_sample_py(tmp_path, corpus):
    ckpt = tmp_path / "ckpt"
    run = train(*TINY, f"--data_path={corpus}", "--num_batches=6", "--generate_every=5", "--prime_length=8",
                "--generate_length=16", f"--checkpoint_dir={ckpt}", f"--log_dir={tmp_path}", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (run.stdout + run.stderr).count("-" * 40) == 2  # generated at steps 0 and 5
    sample = subprocess.run([sys.executable, str(ROOT / "sample.py"), f"--checkpoint_dir={ckpt}", "--prime=def f(",
                             "--length=24", "--seed=3"], capture_output=True, text=True, timeout=300)
    assert sample.returncode == 0, sample.stderr[-2000:]
    text = sample.stdout.rstrip("\n")
    assert text.startswith("def f(") and len(text) == len("def f(") + 24, repr(text)
    greedy = [subprocess.run([sys.executable, str(ROOT / "sample.py"), f"--checkpoint_dir={ckpt}", "--prime=abc",
                              "--length=10", "--temperature=0", f"--seed={seed}"], capture_output=True, text=True,
                             timeout=300).stdout for seed in (0, 1)]
    assert greedy[0] == greedy[1] and greedy[0].startswith("abc")  # greedy ignores the seed


@pytest.mark.parametrize("setup,needle", [
    (lambda d: None, "not found"),
    (lambda d: d.mkdir(), "no checkpoint"),
])
def test_sample_py_errors_are_one_line(tmp_path, setup, needle):
    directory = tmp_path / "ckpt"
    setup(directory)
    run = subprocess.run([sys.executable, str(ROOT / "sample.py"), f"--checkpoint_dir={directory}"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and needle in run.stderr and run.stderr.strip().count("\n") == 0, run.stderr


def test_document_separators_and_packed_crops():
    assert data.parse_separator(None, "data/enwik8.gz") == b"<page>"
    assert data.parse_separator(None, "notes.txt") == b"\n\n"
    assert data.parse_separator(r"\n---\n", "notes.txt") == b"\n---\n"
    with pytest.raises(data.DataError, match="--document_separator is empty"):
        data.parse_separator("", "notes.txt")
    corpus = np.frombuffer(b"intro<page>one<page>two two<page>3", np.uint8)
    starts = data.document_starts(corpus, b"<page>")
    np.testing.assert_array_equal(starts, [0, 5, 14, 27])
    sampler = data.PackedCropSampler(corpus, 9, seed=0, starts=starts)
    plain = data.CropSampler(corpus, 9, seed=0)
    tokens, segment_ids = sampler.sample(3, 2)
    np.testing.assert_array_equal(tokens, plain.sample(3, 2))  # the same crops as without packing
    assert tokens.shape == segment_ids.shape == (3, 2, 10) and segment_ids.dtype == np.int32
    text = corpus.tobytes()
    for crop, ids in zip(tokens.reshape(-1, 10), segment_ids.reshape(-1, 10)):
        start = text.find(bytes(crop.astype(np.uint8)))
        want = np.searchsorted(starts, np.arange(start, start + 10), side="right")
        np.testing.assert_array_equal(ids, want)  # the document each byte belongs to
        assert all((ids[i] != ids[i + 1]) == (start + i + 1 in starts) for i in range(9))


@pytest.mark.slow
def test_pack_documents_trains_and_resumes_exactly(tmp_path, corpus):
    """train.py --pack_documents (blank-line documents) lowers the loss and resumes bit for bit."""
    common = [*TINY, f"--data_path={corpus}", "--pack_documents", "--validate_every=20", "--nouse_pallas_nsa",
              f"--log_dir={tmp_path / 'runs'}"]
    full = train(*common, "--num_batches=40", f"--checkpoint_dir={tmp_path / 'a'}", cwd=tmp_path)
    assert full.returncode == 0, full.stderr[-2000:]
    losses = [float(x) for x in re.findall(r"validation loss ([0-9.]+)", full.stdout + full.stderr)]
    assert len(losses) == 2 and losses[-1] < losses[0] - 0.5, losses
    first = train(*common, "--num_batches=20", f"--checkpoint_dir={tmp_path / 'b'}", cwd=tmp_path)
    again = train(*common, "--num_batches=40", f"--checkpoint_dir={tmp_path / 'b'}", cwd=tmp_path)
    assert first.returncode == 0 and again.returncode == 0, (first.stderr + again.stderr)[-2000:]
    _, want = final_params(tmp_path / "a")
    _, got = final_params(tmp_path / "b")
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_array_equal(a, b)


def test_flat_optimizer_gives_the_tree_optimizers_update():
    """make_optimizer(flat=True) (clip and Adam over one vector) updates every parameter as the
    per-array optimizer does, with the gradient norm above the clip (so clipping acts) and below."""
    rng = np.random.default_rng(3)
    params = {"a": jnp.asarray(rng.standard_normal((7, 5)), jnp.float32),
              "b": {"c": jnp.asarray(rng.standard_normal((11,)), jnp.float32)}}
    for scale in (10.0, 1e-3):
        tree, flat = make_optimizer(1e-2, 0.5), make_optimizer(1e-2, 0.5, flat=True)
        p_tree, p_flat = params, params
        s_tree, s_flat = tree.init(params), flat.init(params)
        for _ in range(3):
            grads = jax.tree.map(lambda x: jnp.asarray(scale * rng.standard_normal(x.shape), jnp.float32), params)
            u_tree, s_tree = tree.update(grads, s_tree, p_tree)
            u_flat, s_flat = flat.update(grads, s_flat, p_flat)
            p_tree, p_flat = optax.apply_updates(p_tree, u_tree), optax.apply_updates(p_flat, u_flat)
        for x, y in zip(jax.tree.leaves(p_tree), jax.tree.leaves(p_flat)):
            np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-6, atol=1e-7)
        assert not np.allclose(np.asarray(p_tree["a"]), np.asarray(params["a"]))  # the steps moved them


def test_accumulation_loop_reads_per_layer_parameters():
    """The micro-batch loop takes the parameters already sliced into layers (done once per step):
    given the stacked arrays, XLA copied each layer's slice in every micro-batch (1.0 ms of the
    seed step on an H200)."""
    from flax import nnx

    def equations(jaxpr):  # every equation, those of nested jaxprs (calls, custom rules) included
        for eqn in jaxpr.eqns:
            yield eqn
            for param in eqn.params.values():
                for sub in param if isinstance(param, (tuple, list)) else (param,):
                    sub = getattr(sub, "jaxpr", sub)
                    if hasattr(sub, "eqns"):
                        yield from equations(sub)

    cfg = ModelConfig(dim=32, depth=3, heads=4, kv_heads=2, dim_head=8, sliding_window_size=8, compress_block_size=4,
                      compress_block_sliding_stride=4, selection_block_size=4, num_selected_blocks=2)
    trainer = Trainer(cfg.build(nnx.Rngs(0)), make_optimizer(1e-3))
    state = trainer.init_state()
    batches = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 2, 17)), jnp.int32)
    jaxpr = jax.make_jaxpr(trainer._train_step)(state, batches).jaxpr
    scans = [eqn for eqn in jaxpr.eqns if eqn.primitive.name == "scan"]
    assert len(scans) == 1
    stacked = {v.shape for k, v in state.params.items() if k.startswith("layers.*.")}
    assert stacked
    slicing = {"slice", "dynamic_slice", "gather", "squeeze"}
    body = list(equations(scans[0].params["jaxpr"].jaxpr))
    assert any(eqn.primitive.name == "pallas_call" or eqn.primitive.name == "dot_general" for eqn in body)
    sliced = [(eqn.primitive.name, v.aval.shape) for eqn in body if eqn.primitive.name in slicing
              for v in eqn.invars if getattr(v.aval, "shape", None) in stacked]
    assert not sliced, f"the micro-batch loop slices stacked parameters: {sliced[:3]}"
    outside = [eqn for eqn in equations(jaxpr) if eqn.primitive.name in slicing
               and any(getattr(v.aval, "shape", None) in stacked for v in eqn.invars)]
    assert len(outside) >= cfg.depth  # the slices are there, before the loop


def test_trainer_keeps_one_copy_of_the_parameters():
    """Once the model that built it is gone, the trainer's device arrays are its state alone: the
    stacked parameters and Adam's moments, no second per-layer copy of the parameters."""
    import gc

    from flax import nnx

    from nsa_jax.training import tree_size

    cfg = ModelConfig(dim=32, depth=2, heads=4, kv_heads=2, dim_head=8, sliding_window_size=8, compress_block_size=4,
                      compress_block_sliding_stride=4, selection_block_size=4, num_selected_blocks=2)
    gc.collect()
    before = {id(x) for x in jax.live_arrays()}
    model = cfg.build(nnx.Rngs(0))
    trainer = Trainer(model, make_optimizer(1e-3))
    del model
    gc.collect()
    held = sum(x.size for x in jax.live_arrays() if id(x) not in before)
    state_size = tree_size(trainer.init_state())
    params_size = tree_size(trainer.init_state().params)
    assert state_size <= held < state_size + params_size // 2, (held, state_size, params_size)


@pytest.mark.slow  # moved from the quick tier to keep it under 5 minutes
def test_checkpoint_of_per_layer_parameters_is_converted_on_restore(tmp_path):
    """A checkpoint saved before the state layout was recorded (per-layer parameters and Adam
    moments, no "state_layout" in its metadata) restores into the stacked layout with the same
    values; one that records a layout this version does not read is refused and left in place."""
    from flax import nnx

    from nsa_jax.checkpoint import CheckpointError
    from nsa_jax.training import STATE_LAYOUT, TrainState

    cfg = ModelConfig(dim=32, depth=2, heads=4, kv_heads=2, dim_head=8, sliding_window_size=8, compress_block_size=4,
                      compress_block_sliding_stride=4, selection_block_size=4, num_selected_blocks=2)
    trainer = Trainer(cfg.build(nnx.Rngs(0)), make_optimizer(1e-3))
    params = trainer.layers.unstack(trainer.init_state().params)
    rng = np.random.default_rng(4)
    grads = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), params)
    _, moments = trainer.optimizer.update(grads, trainer.optimizer.init(params), params)
    checkpointer = Checkpointer(tmp_path / "old")
    checkpointer.save(7, TrainState(params, moments), dict(model_config=cfg.to_dict()))
    checkpointer.wait()

    step, state, _ = Checkpointer(tmp_path / "old").restore_newest(
        trainer.init_state(), cfg, layout=STATE_LAYOUT, convert=(trainer.per_layer_state(), trainer.from_per_layer))
    want = TrainState(trainer.layers.stack(params), trainer.layers.stack_tree(moments))
    assert step == 7 and jax.tree.structure(state) == jax.tree.structure(want)
    for got, expected in zip(jax.tree.leaves(state), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
    assert np.abs(np.asarray(state.opt_state[1][0].mu["layers.*.attn.to_qkv.kernel"])).max() > 0

    other = Checkpointer(tmp_path / "other")
    other.save(3, trainer.init_state(), dict(model_config=cfg.to_dict(), state_layout="something else"))
    other.wait()
    with pytest.raises(CheckpointError, match="holds its state as 'something else'"):
        Checkpointer(tmp_path / "other").restore_newest(trainer.init_state(), cfg, layout=STATE_LAYOUT,
                                                        convert=(trainer.per_layer_state(), trainer.from_per_layer))
    assert (tmp_path / "other" / "3").is_dir()


def _small_trainer(monkeypatch=None, joined=True):
    from flax import nnx

    from nsa_jax import stacking

    if not joined:
        monkeypatch.setattr(stacking, "JOINED", ())
    cfg = ModelConfig(dim=32, depth=2, heads=4, kv_heads=2, dim_head=8, sliding_window_size=8, compress_block_size=4,
                      compress_block_sliding_stride=4, selection_block_size=4, num_selected_blocks=2)
    return cfg, Trainer(cfg.build(nnx.Rngs(0)), make_optimizer(1e-3))


def test_compress_networks_are_joined_and_split_back():
    """The train state holds each of the keys' and values' GroupedMLP parameters as one array
    (keys' heads first); `unstack` gives each network its own, and `split_tree` / `join_tree`
    convert a whole state between that layout and the one before ("layers stacked")."""
    _, trainer = _small_trainer()
    state = trainer.init_state()
    rng = np.random.default_rng(7)  # the two networks start as clones: fresh values tell them apart
    state = state._replace(params=jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype),
                                               state.params))
    joined = state.params["layers.*.attn.{k,v}_compress.kernel_in"]
    assert joined.shape == (2, 4, 32, 32) and not any(".k_compress." in key for key in state.params)
    layers = trainer.layers.unstack(state.params)
    for i in range(2):
        attn = layers["layers"][i]["attn"]
        np.testing.assert_array_equal(np.asarray(attn["k_compress"]["kernel_in"].get_value()), np.asarray(joined[i, :2]))
        np.testing.assert_array_equal(np.asarray(attn["v_compress"]["kernel_in"].get_value()), np.asarray(joined[i, 2:]))
    restacked = trainer.layers.stack(layers)
    for key, value in state.params.items():
        np.testing.assert_array_equal(np.asarray(restacked[key]), np.asarray(value))
    apart = trainer.layers.split_tree(state)
    assert apart.params["layers.*.attn.v_compress.kernel_in"].shape == (2, 2, 32, 32)
    assert jax.tree.structure(apart.opt_state) != jax.tree.structure(state.opt_state)
    back = trainer.layers.join_tree(apart)
    assert jax.tree.structure(back) == jax.tree.structure(state)
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_joined_compress_networks_give_the_step_of_separate_ones(monkeypatch):
    """Two train steps with the compress networks' parameters joined (keys' and values' networks
    run as one) update every parameter as with them apart."""
    batches = jnp.asarray(np.random.default_rng(5).integers(0, 256, (2, 2, 17)), jnp.int32)
    results = []
    for joined in (True, False):
        _, trainer = _small_trainer(monkeypatch, joined)
        state = trainer.init_state()
        for _ in range(2):
            state, metrics = trainer.train_step(state, batches)
        results.append((trainer.layers.unstack(state.params), float(metrics["loss"])))
    (got, loss), (want, want_loss) = results
    assert loss == pytest.approx(want_loss, rel=1e-6)
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_checkpoint_of_separate_compress_networks_is_converted_on_restore(tmp_path):
    """A checkpoint in the "layers stacked" layout (keys' and values' compress network parameters
    and their Adam moments apart) restores into the joined layout with the same values."""
    from nsa_jax.training import STATE_LAYOUT

    cfg, trainer = _small_trainer()
    state = trainer.init_state()
    rng = np.random.default_rng(6)
    grads = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), state.params)
    _, moments = trainer.optimizer.update(grads, state.opt_state, state.params)
    state = state._replace(opt_state=moments)
    checkpointer = Checkpointer(tmp_path / "old")
    checkpointer.save(9, trainer.layers.split_tree(state), dict(model_config=cfg.to_dict(), state_layout="layers stacked"))
    checkpointer.wait()
    step, restored, _ = Checkpointer(tmp_path / "old").restore_newest(
        trainer.init_state(), cfg, layout=STATE_LAYOUT, convert=trainer.layout_converters())
    assert step == 9 and jax.tree.structure(restored) == jax.tree.structure(state)
    for got, expected in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
    mu = restored.opt_state[1][0].mu["layers.*.attn.{k,v}_compress.kernel_in"]
    assert np.abs(np.asarray(mu)).min() > 0  # both halves came back, not zeros

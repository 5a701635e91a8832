"""Reliability: one-line user errors, kill -9 and corrupted checkpoints, non-finite steps, determinism.

The end-to-end runs (kill -9, damaged checkpoints, non-finite runs, same-seed runs) are in the slow tier.
"""

from __future__ import annotations

import glob
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from nsa_jax.training import Trainer

sys.path.insert(0, str(Path(__file__).parent))
from test_train import ROOT, TINY, corpus, final_params, train  # noqa: E402,F401  (fixtures and helpers)


def assert_user_error(run: subprocess.CompletedProcess, *needles: str) -> None:
    assert run.returncode == 2, (run.returncode, run.stderr[-1500:])
    err = run.stderr.strip()
    assert "Traceback" not in err and err.count("\n") <= 2, err
    for needle in needles:
        assert needle in err, err


@pytest.mark.parametrize("args,needles", [
    (["--heads=8", "--kv_heads=3"], ["kv_heads"]),
    (["--compress_block_sliding_stride=32"], ["compress_block_sliding_stride"]),
    (["--compress_block_sliding_stride=0"], ["compress_block_sliding_stride"]),
    (["--fine_block_size=24"], ["fine_block_size", "interpolated_importance_score"]),
    (["--sliding_window_size=-1"], ["sliding_window_size"]),
    (["--num_fine_selected=-1"], ["num_fine_selected"]),
    (["--seq_len=0"], ["--seq_len"]),
    (["--batch_size=0"], ["--batch_size"]),
    (["--checkpoint_every_minutes=-1"], ["--checkpoint_every_minutes"]),
    (["--flagfile=/no/such.flags"], ["/no/such.flags"]),
    (["--log_dir=/etc/passwd/runs"], ["--log_dir", "/etc/passwd/runs"]),
    (["--checkpoint_dir=/etc/passwd/ckpt"], ["--checkpoint_dir", "/etc/passwd/ckpt"]),
])
def test_user_errors_are_one_line_exit_2(tmp_path, args, needles):
    assert_user_error(train("--data_path=stdlib", f"--log_dir={tmp_path}", *args, cwd=tmp_path), *needles)


def test_data_shorter_than_a_crop(tmp_path):
    small = tmp_path / "small.txt"
    small.write_bytes(b"x" * 300)
    assert_user_error(train(f"--data_path={small}", "--seq_len=512", f"--log_dir={tmp_path}", cwd=tmp_path),
                      "the training split has 285 bytes", "seq_len")


def test_validation_split_shorter_than_a_crop_names_valid_fraction(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(b"x" * 2000)  # 5%: 100 validation bytes
    assert_user_error(train(f"--data_path={corpus}", "--seq_len=512", f"--log_dir={tmp_path}", cwd=tmp_path),
                      "the validation split has 100 bytes", "--valid_fraction")


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume(tmp_path, corpus):
    """SIGKILL mid-run (checkpoints are written every step, so kills land in writes too); the rerun
    resumes from the newest complete checkpoint and ends exactly where an uninterrupted run does."""
    common = [*TINY, f"--data_path={corpus}", f"--log_dir={tmp_path / 'runs'}", "--num_batches=40",
              "--checkpoint_every=1", "--keep_checkpoints=2"]
    straight = train(*common, f"--checkpoint_dir={tmp_path / 'straight'}", cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr[-2000:]
    rng = random.Random(7)
    killed_dir = tmp_path / "killed"
    for attempt in range(3):
        proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *common, f"--checkpoint_dir={killed_dir}"],
                                cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 120
        # wait until training is under way (a checkpoint beyond the previous ones exists), then a random delay
        while time.time() < deadline and proc.poll() is None:
            steps = [int(Path(p).name) for p in glob.glob(str(killed_dir / "[0-9]*")) if Path(p).name.isdigit()]
            if steps and max(steps) > attempt * 5:
                break
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.6))
        assert proc.poll() is None, "the run ended before the kill: nothing was tested"
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
        proc.stdout.close()
        saved = [int(p.name) for p in killed_dir.iterdir() if p.name.isdigit()]
        assert saved and max(saved) < 40, f"the kill landed mid-training: newest checkpoint {max(saved)} of 40"
    final = train(*common, f"--checkpoint_dir={killed_dir}", cwd=tmp_path)
    assert final.returncode == 0, final.stdout[-1500:] + final.stderr[-1500:]
    assert "resuming from step" in final.stdout
    step_a, state_a = final_params(tmp_path / "straight")
    step_b, state_b = final_params(killed_dir)
    assert step_a == step_b == 40
    for x, y in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _truncate_arrays(step_dir: Path) -> None:
    files = [p for p in step_dir.rglob("*") if p.is_file() and "ocdbt.process_0" in str(p) and "/d/" in str(p)]
    assert files, "the checkpoint layout holds array data files"
    for f in files:
        with open(f, "r+b") as handle:
            handle.truncate(8)


@pytest.mark.slow
def test_corrupted_newest_checkpoint_falls_back(tmp_path, corpus):
    common = [*TINY, f"--data_path={corpus}", f"--log_dir={tmp_path}", f"--checkpoint_dir={tmp_path / 'c'}",
              "--checkpoint_every=2"]
    assert train(*common, "--num_batches=4", cwd=tmp_path).returncode == 0
    _truncate_arrays(tmp_path / "c" / "4")
    run = train(*common, "--num_batches=6", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    out = run.stdout + run.stderr
    assert "checkpoint step 4" in out and "unreadable" in out and "resuming from step 2" in out, out[-2000:]
    assert (tmp_path / "c" / "corrupt-4").is_dir() and (tmp_path / "c" / "6").is_dir()


@pytest.mark.slow
def test_no_readable_checkpoint_is_a_clear_error(tmp_path, corpus):
    common = [*TINY, f"--data_path={corpus}", f"--log_dir={tmp_path}", f"--checkpoint_dir={tmp_path / 'c'}",
              "--checkpoint_every=0"]
    assert train(*common, "--num_batches=2", cwd=tmp_path).returncode == 0
    _truncate_arrays(tmp_path / "c" / "2")
    run = train(*common, "--num_batches=4", cwd=tmp_path)
    assert run.returncode == 2 and "no readable checkpoint" in run.stderr and "Traceback" not in run.stderr
    assert (tmp_path / "c" / "2").is_dir()  # nothing moved or deleted


@pytest.mark.slow
def test_nonfinite_steps_stop_the_run_without_saving(tmp_path, corpus):
    ckpt = tmp_path / "c"
    run = train(*TINY, f"--data_path={corpus}", f"--log_dir={tmp_path}", f"--checkpoint_dir={ckpt}",
                "--learning_rate=1e30", "--max_nonfinite_steps=3", "--num_batches=50", "--log_every=1",
                "--checkpoint_every=0", cwd=tmp_path)
    assert run.returncode == 3, run.stderr[-1500:]
    assert "3 consecutive steps" in run.stderr and "Traceback" not in run.stderr
    assert not [p for p in ckpt.iterdir() if p.name.isdigit()]


class _Poisonable(nnx.Module):
    """loss = mean((w x)^2), or NaN when the batch holds a negative id."""

    def __init__(self):
        self.w = nnx.Param(jnp.ones((4,)))

    def __call__(self, batch, return_loss=True):
        x = batch.astype(jnp.float32)
        poison = jnp.where(jnp.any(batch < 0), jnp.nan, 0.0)
        return jnp.mean((self.w[...] * x[..., :4]) ** 2) + poison


def test_nonfinite_step_skips_the_update():
    trainer = Trainer(_Poisonable(), optax.adam(0.1))
    state = trainer.init_state()
    good = jnp.ones((2, 1, 5), jnp.int32)
    state, metrics = trainer.train_step(state, good)
    assert not bool(metrics["skipped"])
    before = jax.tree.map(np.asarray, state)
    state, metrics = trainer.train_step(state, good.at[1, 0, 0].set(-1))
    assert bool(metrics["skipped"])
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(state)):
        np.testing.assert_array_equal(x, np.asarray(y))


@pytest.mark.slow
def test_same_seed_same_losses(tmp_path, corpus):
    common = [*TINY, f"--data_path={corpus}", f"--log_dir={tmp_path}", "--num_batches=12", "--validate_every=4"]
    runs = [train(*common, f"--checkpoint_dir={tmp_path / name}", *extra, cwd=tmp_path)
            for name, extra in (("a", []), ("b", []), ("c", ["--seed=1"]))]
    assert all(r.returncode == 0 for r in runs)
    losses = [[line for line in (r.stdout + r.stderr).splitlines() if "validation loss" in line] for r in runs]
    assert len(losses[0]) == 3 and losses[0] == losses[1] and losses[0] != losses[2]


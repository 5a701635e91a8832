"""The bench scripts run end to end on small settings (their real runs are on the GPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quality_script_writes_json_and_plot(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(b"".join(sorted(p.read_bytes() for p in (ROOT / "nsa_jax").glob("*.py"))))
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "quality.py"), f"--data_path={corpus}", "--model=tiny",
                          "--seq_len=32", "--steps=6", "--eval_every=3", "--eval_batches=2", "--grad_accum_every=1",
                          f"--out={tmp_path / 'out'}", "--name=q"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads((tmp_path / "out" / "q.json").read_text())
    for name in ("nsa", "dense"):
        points = result["results"][name]["points"]
        assert [p["step"] for p in points] == [0, 3, 6]
        assert all(p["bits_per_byte"] > 0 for p in points)
    assert (tmp_path / "out" / "q.png").stat().st_size > 10_000


def test_train_step_bench_runs(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "train_step.py"), "--variants=reference,dense",
                          "--seq_lens=32", "--batch_size=1", "--grad_accum_every=1", "--repeats=2",
                          f"--out={tmp_path}"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    (result,) = tmp_path.glob("train_step-*.json")
    assert {r["variant"] for r in json.loads(result.read_text())["results"]} == {"reference", "dense"}

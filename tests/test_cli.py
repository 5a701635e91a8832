"""train.py and sample.py on the command line: --help, --helpfull and one-line flag errors.

Subprocesses, as users run the scripts; each answers before jax is imported (a tenth of a second).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OWN_FLAGS = {  # a few of each program's own flags (booleans print as --[no]name)
    "train.py": ["seq_len", "num_fine_selected", "use_pallas_nsa", "log_dir", "flagfile"],
    "sample.py": ["checkpoint_dir", "temperature", "prime", "use_cache_kv"],
}
FIRST_LINE = {
    "train.py": "Train a byte-level language model with Native Sparse Attention",
    "sample.py": "Generate text from a training checkpoint.",
}


def run(script: str, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, script, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def lists(output: str, flag: str) -> bool:
    return re.search(rf"^\s+(-\w+,)?--(\[no\])?{flag}:", output, re.MULTILINE) is not None  # -v,--verbosity


@pytest.fixture(scope="module")
def train_help() -> subprocess.CompletedProcess:
    return run("train.py", "--help")  # as `python train.py --help` in the repository


@pytest.mark.parametrize("script", ["train.py", "sample.py"])
def test_help_prints_the_usage_and_the_programs_flags(script, train_help, tmp_path):
    # sample.py from another directory: absl files a script's flags under the path as typed
    result = train_help if script == "train.py" else run(str(ROOT / script), "--help", cwd=tmp_path)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stdout.startswith(FIRST_LINE[script])
    for flag in OWN_FLAGS[script]:
        assert lists(result.stdout, flag), flag
    assert not lists(result.stdout, "undefok")  # absl's own flags: only in --helpfull
    assert "--helpfull" in result.stdout


@pytest.mark.parametrize("alias", ["-h", "--helpshort"])
def test_help_aliases(alias, train_help):
    result = run("train.py", alias)
    assert result.returncode == 0 and result.stdout == train_help.stdout


@pytest.mark.parametrize("script", ["train.py", "sample.py"])
def test_helpfull_lists_every_flag(script, tmp_path):
    result = run(str(ROOT / script), "--helpfull", cwd=tmp_path)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stdout.startswith(FIRST_LINE[script])
    for flag in [*OWN_FLAGS[script], "flagfile", "undefok", "helpfull"]:
        assert lists(result.stdout, flag), flag


@pytest.mark.parametrize("script,args,needle", [
    ("train.py", ["--seq_lenn=64"], "Did you mean: seq_len"),
    ("train.py", ["--nouse_pallas_nsa=1"], "does not take an argument"),  # a bare ValueError inside absl
    ("train.py", ["configs/quickstart.flags"], "unexpected argument 'configs/quickstart.flags'"),
    ("train.py", ["--fsdp", "--shard_optimizer"], "pass --fsdp or --shard_optimizer, not both"),
    ("sample.py", ["--temperature=hot"], "--temperature=hot"),
])
def test_flag_errors_are_one_line_exit_2(script, args, needle):
    result = run(script, *args)
    err = result.stderr.strip()
    assert result.returncode == 2 and err.count("\n") == 0 and "Traceback" not in err, err[-2000:]
    assert err.startswith("error: ") and needle in err and err.endswith(f"(see python {script} --help)"), err
    assert result.stdout == ""

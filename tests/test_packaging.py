"""The package as a user outside this repository gets it: `python -m build` makes a wheel and an
sdist; the wheel holds every module of nsa_jax and kernels, their py.typed markers and the
version of `nsa_jax.__version__`, and, installed on its own (away from this checkout), imports
and runs a SparseAttention layer and the functional op (with its gradient), and the examples
of examples/ train against it."""

from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import nsa_jax

ROOT = Path(__file__).resolve().parent.parent

SMOKE = """
import jax, jax.numpy as jnp, sys
from flax import nnx
import kernels, nsa_jax
from nsa_jax import SparseAttention
assert nsa_jax.__file__.startswith(sys.argv[1]) and kernels.__file__.startswith(sys.argv[1]), nsa_jax.__file__
attn = SparseAttention(dim=32, dim_head=8, heads=4, kv_heads=2, sliding_window_size=4, compress_block_size=4,
                       selection_block_size=4, num_selected_blocks=2, rngs=nnx.Rngs(0))
out = attn(jnp.ones((1, 16, 32)))
assert out.shape == (1, 16, 32) and bool(jnp.all(jnp.isfinite(out)))
from nsa_jax.ops import native_sparse_attention
q, kv, g = jnp.ones((1, 16, 4, 8)), jnp.ones((1, 16, 2, 8)), jnp.full((1, 16, 4), 0.5)
grad = jax.grad(lambda q: native_sparse_attention(q, kv, kv, g_cmp=g, g_slc=g, block_size=4, block_count=2).sum())(q)
assert grad.shape == q.shape and bool(jnp.all(jnp.isfinite(grad)))
print(nsa_jax.__version__)
"""


def sources(package: str) -> set[str]:
    return {p.relative_to(ROOT).as_posix() for p in (ROOT / package).rglob("*.py")}


@pytest.mark.slow
def test_wheel_and_sdist_install_and_run_outside_the_checkout(tmp_path):
    dist = tmp_path / "dist"
    run = subprocess.run([sys.executable, "-m", "build", "--outdir", str(dist), str(ROOT)],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    (wheel,) = dist.glob("nsa_jax-*.whl")
    (sdist,) = dist.glob("nsa_jax-*.tar.gz")
    assert wheel.name.startswith(f"nsa_jax-{nsa_jax.__version__}-")
    assert sdist.name == f"nsa_jax-{nsa_jax.__version__}.tar.gz"

    names = set(zipfile.ZipFile(wheel).namelist())
    missing = (sources("nsa_jax") | sources("kernels") | {"nsa_jax/py.typed", "kernels/py.typed"}) - names
    assert not missing, f"not in the wheel: {sorted(missing)}"
    metadata = zipfile.ZipFile(wheel).read(f"nsa_jax-{nsa_jax.__version__}.dist-info/METADATA").decode()
    assert f"Version: {nsa_jax.__version__}" in metadata
    with tarfile.open(sdist) as tar:
        assert f"nsa_jax-{nsa_jax.__version__}/nsa_jax/attention.py" in tar.getnames()

    site = tmp_path / "site"
    run = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    # The installed wheel alone (its dependencies from this environment), from a directory
    # without the checkout on the path.
    env = {"PYTHONPATH": str(site), "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}
    run = subprocess.run([sys.executable, "-c", SMOKE, str(site)], capture_output=True, text=True, timeout=600,
                         cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().endswith(nsa_jax.__version__)
    # The examples, copied out of the checkout, train against the installed wheel.
    for name in ("nnx_attention", "linen_attention"):
        script = tmp_path / f"{name}.py"
        script.write_text((ROOT / "examples" / f"{name}.py").read_text())
        run = subprocess.run([sys.executable, str(script), "--steps", "2", "--seq_len", "32"], capture_output=True,
                             text=True, timeout=600, cwd=tmp_path, env=env)
        assert run.returncode == 0, run.stderr[-3000:]
        assert "after 2 steps" in run.stdout, run.stdout[-2000:]

"""The examples in examples/ run end to end, and their layers give the same output on both backends.

The scripts run as a user runs them (`python examples/<name>.py` from the repository root); the
in-process tests load each script as a module and compare its attention layer's forward on the
reference backend with the Pallas kernels (interpreted on CPU).
"""

from __future__ import annotations

import importlib.util
import math
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ["nnx_attention", "linen_attention"]
LAYER = dict(dim=64, heads=4, kv_heads=2, block_size=16, block_count=4, window_size=16)


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # Linen's dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def relative_difference(a: jax.Array, b: jax.Array) -> float:
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


@pytest.mark.parametrize("name", [pytest.param(name, marks=() if name == "nnx_attention" else pytest.mark.slow)
                                  for name in EXAMPLES])
def test_example_script_trains(name):
    run = subprocess.run([sys.executable, f"examples/{name}.py", "--steps", "3", "--seq_len", "64"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    match = re.search(r"^loss (\S+) -> (\S+) after 3 steps$", run.stdout, re.MULTILINE)
    assert match, run.stdout[-2000:]
    assert all(math.isfinite(float(x)) for x in match.groups()), match.group(0)


@pytest.mark.slow
def test_nnx_layer_reference_matches_pallas():
    from flax import nnx

    example = load_example("nnx_attention")
    x = jax.random.normal(jax.random.key(1), (2, 64, LAYER["dim"]))  # [b, n, dim]
    layer = example.NSAAttention(**LAYER, backend="reference", rngs=nnx.Rngs(0))
    reference = layer(x)
    layer.backend = "pallas"
    pallas = layer(x)
    assert reference.shape == x.shape
    assert np.all(np.isfinite(reference))
    assert relative_difference(pallas, reference) < 1e-5


@pytest.mark.slow
def test_linen_layer_reference_matches_pallas():
    example = load_example("linen_attention")
    x = jax.random.normal(jax.random.key(1), (2, 64, LAYER["dim"]))  # [b, n, dim]
    layer = example.NSAAttention(**LAYER, backend="reference")
    params = layer.init(jax.random.key(0), x)
    reference = layer.apply(params, x)
    pallas = layer.clone(backend="pallas").apply(params, x)
    assert reference.shape == x.shape
    assert np.all(np.isfinite(reference))
    assert relative_difference(pallas, reference) < 1e-5

"""Test-wide settings.

Float32 parity tests compare against tolerances of ~1e-5, so every test runs with IEEE float32
matmuls. The library itself follows JAX's default (TF32 tensor cores for float32 on the GPU);
on CPU the setting changes nothing.
"""

import os

# The tests' programs are tiny: XLA's CPU backend spends far longer in LLVM's optimisation passes
# than in running them, so they compile unoptimised (LLVM's -O0; XLA's own graph passes still run,
# and the arithmetic stays IEEE: no fast math). Set before JAX starts its backend; test scripts run
# in subprocesses inherit it (`simulated_devices.cpu_devices_env` keeps it).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

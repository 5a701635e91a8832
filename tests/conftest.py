"""Test-wide settings.

Float32 parity tests compare against tolerances of ~1e-5, so every test runs with IEEE float32
matmuls. The library itself follows JAX's default (TF32 tensor cores for float32 on the GPU);
on CPU the setting changes nothing.
"""

import jax

jax.config.update("jax_default_matmul_precision", "highest")

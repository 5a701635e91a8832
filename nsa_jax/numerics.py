"""Small numeric helpers shared by the model, the reference core and the kernels."""

from __future__ import annotations

import jax.numpy as jnp

F32 = jnp.float32  # softmax, accumulation and selection scores run in float32 whatever the inputs


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for non-negative integers."""
    return -(-a // b)


def round_up(a: int, b: int) -> int:
    """The smallest multiple of b that is >= a."""
    return cdiv(a, b) * b

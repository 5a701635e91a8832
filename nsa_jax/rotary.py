"""Rotary position embedding, interleaved pairs, as `rotary_embedding_torch.RotaryEmbedding(dim)`.

Pairs (x[2i], x[2i+1]) rotate by angle pos * theta^(-2i/dim) over the full head dim.
Angles are computed in float32 from float32 positions, whatever the input dtype.
(The PyTorch library builds positions in the input's dtype, so in bfloat16 positions
above 256 get rounded; we do not copy that: see README, "Differences".)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def inverse_frequencies(dim: int, theta: float = 10000.0) -> jax.Array:  # [dim // 2]
    exponents = jnp.arange(0, dim, 2, dtype=jnp.float32)[: dim // 2] / dim
    return 1.0 / (theta ** exponents)


def apply_rotary(x: jax.Array, positions: jax.Array, theta: float = 10000.0) -> jax.Array:
    """Rotate x [b, n, h, d] by integer positions [n] (or [b, n])."""
    d = x.shape[-1]
    freqs = positions.astype(jnp.float32)[..., None] * inverse_frequencies(d, theta)  # [.., n, d/2]
    freqs = jnp.repeat(freqs, 2, axis=-1)  # [.., n, d]: f0 f0 f1 f1 ...
    if freqs.ndim == 2:
        freqs = freqs[None]
    cos = jnp.cos(freqs)[:, :, None, :]
    sin = jnp.sin(freqs)[:, :, None, :]
    xf = x.astype(jnp.float32)
    pairs = xf.reshape(*xf.shape[:-1], d // 2, 2)
    rotated_half = jnp.stack((-pairs[..., 1], pairs[..., 0]), axis=-1).reshape(xf.shape)
    return (xf * cos + rotated_half * sin).astype(x.dtype)

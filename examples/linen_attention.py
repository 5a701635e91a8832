"""Native Sparse Attention inside your own Flax Linen model.

Shows a `flax.linen` attention layer (`nn.Dense` q/k/v/gate/out projections, grouped-query heads,
rotary embedding) that calls the functional op `nsa_jax.ops.native_sparse_attention`, used in a
2-block byte-level model trained for a few Adam steps (`jax.jit` + `jax.value_and_grad` over the
params) on this file's own bytes.

Run from the repository root:

    python examples/linen_attention.py --steps 20 --seq_len 128
"""

from __future__ import annotations

import argparse
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from nsa_jax.ops import native_sparse_attention


def rotary(x: jax.Array, positions: jax.Array) -> jax.Array:  # x [b, n, h, d], positions [n]
    """Rotary position embedding (rotate-half form)."""
    half = x.shape[-1] // 2
    angles = positions[:, None] * 10000.0 ** (-jnp.arange(half) / half)  # [n, d/2]
    cos, sin = jnp.cos(angles)[:, None, :], jnp.sin(angles)[:, None, :]  # [n, 1, d/2]
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


class NSAAttention(nn.Module):
    """Projections + gates around the NSA op; the op itself has no parameters."""

    dim: int
    heads: int
    kv_heads: int
    block_size: int
    block_count: int
    window_size: int
    backend: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [b, n, dim] -> [b, n, dim]
        b, n, _ = x.shape
        h, kh, d = self.heads, self.kv_heads, self.dim // self.heads
        positions = jnp.arange(n)
        q = rotary(nn.Dense(h * d, use_bias=False, name="to_q")(x).reshape(b, n, h, d), positions)  # [b, n, h, d]
        k = rotary(nn.Dense(kh * d, use_bias=False, name="to_k")(x).reshape(b, n, kh, d), positions)  # [b, n, kh, d]
        v = nn.Dense(kh * d, use_bias=False, name="to_v")(x).reshape(b, n, kh, d)  # [b, n, kh, d]
        gates = jax.nn.sigmoid(nn.Dense(3 * h, name="to_gates")(x))  # one gate per branch and head
        g_cmp, g_slc, g_swa = jnp.split(gates, 3, axis=-1)  # 3 x [b, n, h]
        o = native_sparse_attention(
            q, k, v, g_cmp=g_cmp, g_slc=g_slc, g_swa=g_swa,
            block_size=self.block_size, block_count=self.block_count, window_size=self.window_size,
            backend=self.backend)  # [b, n, h, d]
        return nn.Dense(self.dim, use_bias=False, name="to_out")(o.reshape(b, n, h * d))


class TinyModel(nn.Module):
    """Byte embedding, `depth` pre-norm residual blocks (NSA attention + MLP), logits over 256 bytes."""

    block_size: int
    block_count: int
    window_size: int
    backend: str | None = None
    dim: int = 64
    heads: int = 4
    kv_heads: int = 2
    depth: int = 2

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:  # [b, n] int -> [b, n, 256]
        x = nn.Embed(256, self.dim)(tokens)
        for _ in range(self.depth):
            x = x + NSAAttention(self.dim, self.heads, self.kv_heads, self.block_size, self.block_count,
                                 self.window_size, self.backend)(nn.RMSNorm()(x))
            x = x + nn.Dense(self.dim)(nn.gelu(nn.Dense(4 * self.dim)(nn.RMSNorm()(x))))
        return nn.Dense(256)(nn.RMSNorm()(x))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--block_size", type=int, default=16)
    parser.add_argument("--block_count", type=int, default=4)
    parser.add_argument("--window_size", type=int, default=16)
    parser.add_argument("--backend", choices=["reference", "pallas"], default=None,
                        help="default: pallas on GPU, reference elsewhere")
    args = parser.parse_args(argv)

    model = TinyModel(args.block_size, args.block_count, args.window_size, args.backend)
    params = model.init(jax.random.key(0), jnp.zeros((1, args.seq_len), jnp.int32))["params"]
    tx = optax.adam(3e-3)
    opt_state = tx.init(params)

    def loss_fn(params, batch: jax.Array) -> jax.Array:  # batch [b, n + 1] int
        logits = model.apply({"params": params}, batch[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

    @jax.jit
    def train_step(params, opt_state, batch: jax.Array):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    data = np.frombuffer(Path(__file__).read_bytes(), dtype=np.uint8).astype(np.int32)  # train on this file
    rng = np.random.default_rng(0)
    losses = []
    for step in range(args.steps):
        starts = rng.integers(0, len(data) - args.seq_len - 1, size=args.batch_size)
        batch = jnp.asarray(np.stack([data[s:s + args.seq_len + 1] for s in starts]))  # [b, n + 1]
        params, opt_state, loss = train_step(params, opt_state, batch)
        losses.append(float(loss))
        print(f"step {step:3d}  loss {losses[-1]:.4f}")
    print(f"loss {losses[0]:.2f} -> {losses[-1]:.2f} after {args.steps} steps")


if __name__ == "__main__":
    main()

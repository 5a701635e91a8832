"""Native Sparse Attention inside your own Flax NNX model.

Shows a plain `nnx.Module` attention layer (q/k/v/gate/out projections, grouped-query heads,
rotary embedding) that calls the functional op `nsa_jax.ops.native_sparse_attention`, used in a
2-block byte-level model trained for a few Adam steps on this file's own bytes.

Run from the repository root:

    python examples/nnx_attention.py --steps 20 --seq_len 128
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from nsa_jax.ops import native_sparse_attention


def rotary(x: jax.Array, positions: jax.Array) -> jax.Array:  # x [b, n, h, d], positions [n]
    """Rotary position embedding (rotate-half form)."""
    half = x.shape[-1] // 2
    angles = positions[:, None] * 10000.0 ** (-jnp.arange(half) / half)  # [n, d/2]
    cos, sin = jnp.cos(angles)[:, None, :], jnp.sin(angles)[:, None, :]  # [n, 1, d/2]
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


class NSAAttention(nnx.Module):
    """Projections + gates around the NSA op; the op itself has no parameters."""

    def __init__(self, dim: int, heads: int, kv_heads: int, *, block_size: int, block_count: int,
                 window_size: int, backend: str | None = None, rngs: nnx.Rngs):
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.block_size, self.block_count, self.window_size = block_size, block_count, window_size
        self.backend = backend
        self.to_q = nnx.Linear(dim, heads * self.head_dim, use_bias=False, rngs=rngs)
        self.to_k = nnx.Linear(dim, kv_heads * self.head_dim, use_bias=False, rngs=rngs)
        self.to_v = nnx.Linear(dim, kv_heads * self.head_dim, use_bias=False, rngs=rngs)
        self.to_gates = nnx.Linear(dim, 3 * heads, rngs=rngs)  # one gate per branch and head
        self.to_out = nnx.Linear(heads * self.head_dim, dim, use_bias=False, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:  # [b, n, dim] -> [b, n, dim]
        b, n, _ = x.shape
        positions = jnp.arange(n)
        q = rotary(self.to_q(x).reshape(b, n, self.heads, self.head_dim), positions)  # [b, n, h, d]
        k = rotary(self.to_k(x).reshape(b, n, self.kv_heads, self.head_dim), positions)  # [b, n, kh, d]
        v = self.to_v(x).reshape(b, n, self.kv_heads, self.head_dim)  # [b, n, kh, d]
        g_cmp, g_slc, g_swa = jnp.split(jax.nn.sigmoid(self.to_gates(x)), 3, axis=-1)  # 3 x [b, n, h]
        o = native_sparse_attention(
            q, k, v, g_cmp=g_cmp, g_slc=g_slc, g_swa=g_swa,
            block_size=self.block_size, block_count=self.block_count, window_size=self.window_size,
            backend=self.backend)  # [b, n, h, d]
        return self.to_out(o.reshape(b, n, -1))


class Block(nnx.Module):
    """Pre-norm residual block: x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, heads: int, kv_heads: int, *, rngs: nnx.Rngs, **attention_kwargs):
        self.norm1, self.norm2 = nnx.RMSNorm(dim, rngs=rngs), nnx.RMSNorm(dim, rngs=rngs)
        self.attention = NSAAttention(dim, heads, kv_heads, rngs=rngs, **attention_kwargs)
        self.up, self.down = nnx.Linear(dim, 4 * dim, rngs=rngs), nnx.Linear(4 * dim, dim, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:  # [b, n, dim]
        x = x + self.attention(self.norm1(x))
        return x + self.down(jax.nn.gelu(self.up(self.norm2(x))))


class TinyModel(nnx.Module):
    """Byte embedding, `depth` blocks, logits over the 256 byte values."""

    def __init__(self, dim: int = 64, heads: int = 4, kv_heads: int = 2, depth: int = 2, *, rngs: nnx.Rngs,
                 **attention_kwargs):
        self.embed = nnx.Embed(256, dim, rngs=rngs)
        self.blocks = nnx.List([Block(dim, heads, kv_heads, rngs=rngs, **attention_kwargs) for _ in range(depth)])
        self.norm = nnx.RMSNorm(dim, rngs=rngs)
        self.to_logits = nnx.Linear(dim, 256, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:  # [b, n] int -> [b, n, 256]
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.to_logits(self.norm(x))


def loss_fn(model: TinyModel, batch: jax.Array) -> jax.Array:  # batch [b, n + 1] int
    """Next-byte cross entropy."""
    logits = model(batch[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


@nnx.jit
def train_step(model: TinyModel, optimizer: nnx.Optimizer, batch: jax.Array) -> jax.Array:
    loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
    optimizer.update(model, grads)
    return loss


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

    model = TinyModel(block_size=args.block_size, block_count=args.block_count, window_size=args.window_size,
                      backend=args.backend, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)
    data = np.frombuffer(Path(__file__).read_bytes(), dtype=np.uint8).astype(np.int32)  # train on this file
    rng = np.random.default_rng(0)
    losses = []
    for step in range(args.steps):
        starts = rng.integers(0, len(data) - args.seq_len - 1, size=args.batch_size)
        batch = jnp.asarray(np.stack([data[s:s + args.seq_len + 1] for s in starts]))  # [b, n + 1]
        losses.append(float(train_step(model, optimizer, batch)))
        print(f"step {step:3d}  loss {losses[-1]:.4f}")
    print(f"loss {losses[0]:.2f} -> {losses[-1]:.2f} after {args.steps} steps")


if __name__ == "__main__":
    main()

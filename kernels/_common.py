"""Helpers shared by the Pallas kernels: interpret mode, padding, tile matmuls, constants."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import triton as plgpu

from nsa_jax.numerics import F32, cdiv, round_up  # noqa: F401  (re-exported for the kernels)

LOG2E = math.log2(math.e)
# Masked logits (base-2 domain). Finite, so that a tile whose keys are all masked gives
# exp2(MASK - MASK) = 1 instead of NaN; the running-max correction removes those terms as
# soon as a visible key arrives (every real query row has one).
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
# Triton's tensor cores need every matmul dimension >= 16.
MIN_DOT = 16


def interpret_mode() -> bool:
    """Kernels run through the Pallas interpreter where there is no GPU (CPU CI)."""
    return jax.default_backend() == "cpu"


def cudnn_flash_usable(q: jax.Array) -> bool:
    """cuDNN's flash attention (`jax.nn.dot_product_attention(implementation="cudnn")`) can take
    q: on a GPU, half precision, head dim a multiple of 8 up to 128."""
    return (jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
            and q.shape[-1] % 8 == 0 and q.shape[-1] <= 128)


def next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (x - 1).bit_length()


def div_up(x: jax.Array, b: int) -> jax.Array:
    """ceil(x / b) of a non-negative traced int inside a kernel (truncating division)."""
    return lax.div(x + (b - 1), b)


def pad_axis(x: jax.Array, axis: int, size: int) -> jax.Array:
    """Zero-pad `axis` of x up to `size` (no-op when already that size)."""
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    pads = [(0, 0)] * x.ndim
    pads[axis] = (0, extra)
    return jnp.pad(x, pads)


def mm(a: jax.Array, b: jax.Array, *, trans_a: bool = False, trans_b: bool = False) -> jax.Array:
    """2-D matmul with f32 accumulation inside a kernel.

    Its precision is JAX's `jax_default_matmul_precision` setting, which `lax.dot_general`
    resolves when the kernel is traced: float32 kernels use TF32 tensor cores by default on the
    GPU, as XLA's own float32 matmuls do, and IEEE float32 under
    `jax.default_matmul_precision("highest")` (what the parity tests use); bf16 takes the
    native bf16 path either way.

    Uses the matrix unit (`lax.dot_general`) when every dimension is >= 16, as Triton requires;
    otherwise (few query rows, e.g. one head per query) a broadcast multiply-reduce in f32.
    """
    m_dim = a.shape[1] if trans_a else a.shape[0]
    k_dim = a.shape[0] if trans_a else a.shape[1]
    n_dim = b.shape[0] if trans_b else b.shape[1]
    if min(m_dim, k_dim, n_dim) >= MIN_DOT:
        dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
        return lax.dot_general(a, b, dims, preferred_element_type=F32)
    a32, b32 = a.astype(F32), b.astype(F32)
    if trans_a and trans_b:
        raise NotImplementedError("mm: transpose one operand at most")
    if trans_b:  # a [m, k], b [n, k]
        return jnp.sum(a32[:, None, :] * b32[None, :, :], axis=2)
    if trans_a:  # a [k, m], b [k, n]
        return jnp.sum(a32[:, :, None] * b32[:, None, :], axis=0)
    return jnp.sum(a32[:, :, None] * b32[None, :, :], axis=1)  # a [m, k], b [k, n]


def softmax_init(rows: int, d: int, sum_tile: int | None = None):
    """The online softmax's carry before the first key tile: (acc [R, d], row max [R], row sum [R]);
    with `sum_tile` the row sums stay a [R, sum_tile] tile (see `online_softmax_step`)."""
    l_shape = (rows,) if sum_tile is None else (rows, sum_tile)
    return jnp.zeros((rows, d), F32), jnp.full((rows,), -jnp.inf, F32), jnp.zeros(l_shape, F32)


def softmax_finish(carry) -> tuple[jax.Array, jax.Array]:
    """(normalised output [R, d] float32, base-2 log-sum-exp [R]). A row that saw no key (padding
    rows only) gets output 0 and lse +inf, so that its backward probabilities exp2(s - lse) are 0."""
    acc, m_i, l_i = carry
    seen = l_i > 0
    l_safe = jnp.where(seen, l_i, 1.0)
    return acc / l_safe[:, None], jnp.where(seen, m_i + jnp.log2(l_safe), jnp.inf)


def tokens_to_rows(x: jax.Array, g: int) -> jax.Array:
    """Per-token values [BQ, ...] -> per-row [BQ * g, ...] for tiles whose row r is token r // g."""
    return jnp.broadcast_to(x[:, None], (x.shape[0], g, *x.shape[1:])).reshape(x.shape[0] * g, *x.shape[1:])


def softmax_delta(o: jax.Array, do: jax.Array) -> jax.Array:
    """The backward's row term delta = sum(o * do) over the head dimension, in float32."""
    return jnp.sum(o.astype(F32) * do.astype(F32), axis=-1)


def online_softmax_step(carry, s, v):
    """One key tile of flash attention in base 2: carry (acc [R, d], row max [R], row sum [R]),
    logits s [R, BK] already scaled by log2(e), values v [BK, d]. A row-sum tile [R, BK] in the carry
    (`softmax_init(..., sum_tile=BK)`) takes p whole, for the caller to sum once after the last tile:
    where the tile's columns are split over warps, a per-tile row sum crosses them every tile."""
    acc, m_i, l_i = carry
    m_new = jnp.maximum(m_i, s.max(axis=1))
    corr = jnp.exp2(m_i - m_new)
    p = jnp.exp2(s - m_new[:, None])
    l_new = l_i * corr[:, None] + p if l_i.ndim == 2 else l_i * corr + p.sum(axis=1)
    acc = acc * corr[:, None] + mm(p.astype(v.dtype), v)
    return acc, m_new, l_new


def add_phantom_keys(carry, count: jax.Array):
    """Fold `count` [R] zero keys (logit 0, value 0) into the online softmax's carry: the zero
    padding a packed document alone would have past its end."""
    acc, m_i, l_i = carry
    m_new = jnp.maximum(m_i, jnp.where(count > 0, 0.0, -jnp.inf))
    corr = jnp.exp2(m_i - m_new)
    return acc * corr[:, None], m_new, l_i * corr + count * jnp.exp2(-m_new)


def compiler_params(num_warps: int, num_stages: int = 2) -> plgpu.CompilerParams:
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def iota(n: int) -> jax.Array:
    return lax.broadcasted_iota(jnp.int32, (n,), 0)


def in_xla(reference_fn, *args):
    """`impl="xla"`: `reference_fn(*args)` (a reference branch, its settings bound) as plain XLA, its
    backward recomputing the forward from the inputs (`jax.checkpoint`) instead of keeping its
    dense [n, n] logits."""
    return jax.checkpoint(reference_fn)(*args)

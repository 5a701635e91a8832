"""Per-head matmuls of the grouped compress network, as Pallas kernels.

The seed model's compress networks (`nsa_jax.compress_networks.GroupedMLP`, keys' and values'
joined) multiply each kv head's windows [rows, 1024] by its own [1024, 1024] weights: eight
products per layer whose M (batch x windows: 128 at B = 4, T = 512) is short against wide weights.
XLA tiles them into fewer programs than the GPU has SMs, each streaming a large weight slice
(H200, B = 4, T = 512: 36 us for a forward product whose 34 MB of weights take 7 us to read).
These kernels tile the weights finer, so that every SM streams its share, and fuse the input
layer's bias and ReLU into the forward product.

    relu_linear(x, w, b)                    # relu(x @ w + b) per head, with its VJP
    relu_linear(x, w, b, stacked, layer)    # the same, the weights read in place in their layer stack
    batched_matmul(a, b, trans_b=...)       # the per-head product itself

Reference: `relu_linear_reference` (plain einsum), which the tests compare against.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels._common import F32, compiler_params, interpret_mode, mm


@dataclasses.dataclass(frozen=True)
class MatmulTiles:
    """Tiles of one per-head product C [m, n] = A [m, k] @ B [k, n]: output tile [block_m, block_n],
    k in steps of block_k."""

    block_m: int = 64
    block_n: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3


@dataclasses.dataclass(frozen=True)
class GroupedMatmulTiles:
    """Tiles of `relu_linear`'s kernels: the forward product and d(input). Defaults: the fastest of
    ten tilings for the seed model at B = 4, T = 512 (8 heads x [128, 1024] x [1024, 1024], float32,
    H200, 2026-12-02, GPU us: forward with bias and ReLU 22.8, XLA in the train step 39.4; d(input)
    19.0, XLA 30)."""

    fwd: MatmulTiles = MatmulTiles(block_m=128, block_n=32, block_k=64)
    dx: MatmulTiles = MatmulTiles(block_m=64, block_n=64, block_k=64)


def _matmul_kernel(a_ref, b_ref, *rest, trans_b: bool, block_k: int, bias: bool, relu: bool):
    """One output tile: a_ref [bm, K], b_ref [K, bn] ([bn, K] trans_b)."""
    o_ref = rest[-1]

    def step(i, acc):
        ks = pl.ds(pl.multiple_of(i * block_k, block_k), block_k)
        b = b_ref[:, ks] if trans_b else b_ref[ks, :]
        return acc + mm(a_ref[:, ks], b, trans_b=trans_b)

    acc = lax.fori_loop(0, a_ref.shape[1] // block_k, step, jnp.zeros(o_ref.shape, F32))
    if bias:
        acc = acc + rest[0][...].astype(F32)[None, :]
    if relu:
        acc = jnp.maximum(acc, 0.0)
    o_ref[...] = acc.astype(o_ref.dtype)


def fits(m: int, n: int, k: int, tiles: MatmulTiles) -> bool:
    """Whether the kernel takes these sizes: each a multiple of its tile."""
    return m % tiles.block_m == 0 and n % tiles.block_n == 0 and k % tiles.block_k == 0


@functools.partial(jax.jit, static_argnames=("trans_b", "relu", "layer", "tiles"))
def batched_matmul(a: jax.Array, b: jax.Array, bias: jax.Array | None = None, *, trans_b: bool = False,
                   relu: bool = False, layer: int | None = None, tiles: MatmulTiles = MatmulTiles()) -> jax.Array:
    """Per head h: a[h] @ b[h] (+ bias[h], ReLU), float32 accumulation, in a's dtype.

    a [h, m, k], b [h, k, n] ([h, n, k] with trans_b), bias [h, n] -> [h, m, n].
    With `layer`, b and bias are stacks [layers, h, ...] read at that layer in place (a slice passed
    to a kernel would be copied first). m, n, k must be multiples of the tiles (`fits`)."""
    h, m, k = a.shape
    b_dims = b.shape[1:] if layer is not None else b.shape
    n = b_dims[1] if trans_b else b_dims[2]
    if not fits(m, n, k, tiles):
        raise ValueError(f"batched_matmul: m={m}, n={n}, k={k} are not multiples of the tiles {tiles}")
    bm, bn = tiles.block_m, tiles.block_n
    # Program (i, j, head): i fastest, so the programs that run together share b's column tile
    # (the weights) and read it from L2 once.
    a_spec = pl.BlockSpec((None, bm, k), lambda i, j, g: (g, i, 0))
    b_spec = (pl.BlockSpec((None, bn, k), lambda i, j, g: (g, j, 0)) if trans_b
              else pl.BlockSpec((None, k, bn), lambda i, j, g: (g, 0, j)))
    if layer is not None:  # the same tiles, one layer of the stack
        b_index = b_spec.index_map
        b_spec = pl.BlockSpec((None, *b_spec.block_shape), lambda i, j, g: (layer, *b_index(i, j, g)))
    in_specs, args = [a_spec, b_spec], [a, b]
    if bias is not None:
        in_specs.append(pl.BlockSpec((None, bn), lambda i, j, g: (g, j)) if layer is None
                        else pl.BlockSpec((None, None, bn), lambda i, j, g: (layer, g, j)))
        args.append(bias)
    kernel = functools.partial(_matmul_kernel, trans_b=trans_b, block_k=tiles.block_k, bias=bias is not None,
                               relu=relu)
    return pl.pallas_call(
        kernel,
        grid=(m // bm, n // bn, h),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, bm, bn), lambda i, j, g: (g, i, j)),
        out_shape=jax.ShapeDtypeStruct((h, m, n), a.dtype),
        compiler_params=compiler_params(tiles.num_warps, tiles.num_stages),
        interpret=interpret_mode(),
        name="nsa_compress_matmul",
    )(*args)


def relu_linear_reference(x: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
    """relu(x[h] @ w[h] + b[h]) per head: x [h, m, k], w [h, k, n], b [h, n] -> [h, m, n]."""
    return jax.nn.relu(jnp.einsum("hmk,hkn->hmn", x, w) + b[:, None])


def relu_linear_fits(m: int, k: int, n: int, tiles: GroupedMatmulTiles = GroupedMatmulTiles()) -> bool:
    """Whether `relu_linear`'s kernels take x [h, m, k] and weights [h, k, n]."""
    return fits(m, n, k, tiles.fwd) and fits(m, k, n, tiles.dx)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def relu_linear(x: jax.Array, w: jax.Array, b: jax.Array, stacked: tuple[jax.Array, jax.Array] | None = None,
                layer: int | None = None, tiles: GroupedMatmulTiles = GroupedMatmulTiles()) -> jax.Array:
    """relu(x[h] @ w[h] + b[h]) per head (`relu_linear_reference`): x [h, m, k], w [h, k, n], b [h, n]
    -> [h, m, n]; sizes must suit the tiles (`relu_linear_fits`).

    stacked: None, or the stacks (weights [layers, h, k, n], biases [layers, h, n]) whose layer
    `layer` w and b are. The kernels then read them there in place, and w and b only receive their
    gradients: nothing reads them, so XLA drops the slices (which, handed to a kernel, would be
    copied: 34 MB of weights per layer in the seed model).
    The forward product and d(input) are kernels; d(weights) stays XLA's, which reads no weights."""
    (weights, bias), at = ((w, b), None) if stacked is None else (stacked, layer)
    return batched_matmul(x, weights, bias, relu=True, layer=at, tiles=tiles.fwd)


def _relu_linear_fwd(x, w, b, stacked, layer, tiles):
    out = relu_linear(x, w, b, stacked, layer, tiles)
    return out, (x, w if stacked is None else None, stacked, out)


def _relu_linear_bwd(layer, tiles, res, dout):
    x, w, stacked, out = res
    weights, at = (w, None) if stacked is None else (stacked[0], layer)
    dh = jnp.where(out > 0, dout, 0).astype(x.dtype)  # [h, m, n]; relu'(0) = 0, as jax.nn.relu
    dx = batched_matmul(dh, weights, trans_b=True, layer=at, tiles=tiles.dx)  # [h, m, k]
    dw = jnp.einsum("hmk,hmn->hkn", x, dh)
    db = jnp.sum(dh.astype(F32), axis=1)
    return dx, dw.astype(weights.dtype), db.astype(weights.dtype), None  # the stacks: no gradient of their own


relu_linear.defvjp(_relu_linear_fwd, _relu_linear_bwd)


# "auto" takes the kernels up to this many rows per head (batch x windows), where they measured
# faster than XLA's products in the train step: 128 rows (B = 4, T = 512) forward 22.8 against 39.4 us,
# d(input) 19.0 against 30, the step 0.14 ms faster; at 256 rows (B = 1, T = 4096) the step was 0.18 ms
# slower, and at 1024 rows (T = 16384) XLA hands the products to cuBLAS and the kernels are ~2x slower
# (169 against 85 us forward, 98 against 50 d(input); H200, seed model, float32, 2026-12-02).
AUTO_MAX_ROWS = 128


def use_kernels(impl: str, rows: int, k: int, n: int, dtype, tiles: GroupedMatmulTiles) -> bool:
    """Whether `relu_linear` takes a compress network's input layer: x [h, rows, k] -> [h, rows, n].

    impl: `KernelSettings.compress_impl`. Never for shapes the tiles do not divide, for other
    dtypes than float32, or where the batch is split over devices outside `shard_map` (XLA
    cannot partition a kernel; it would gather the batch onto every device)."""
    if impl == "xla" or dtype != jnp.float32 or not relu_linear_fits(rows, k, n, tiles):
        return False
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and any(size > 1 and name not in mesh.manual_axes
                              for name, size in zip(mesh.axis_names, mesh.axis_sizes)):
        return False
    return impl == "pallas" or (not interpret_mode() and rows <= AUTO_MAX_ROWS)

"""Flash attention over a band of keys, with GQA groups in the tile rows.

The compressed branch and the sliding window are both "each query sees an interval of
keys, decided by its position": this module is that kernel once, forward and backward,
parameterized by a static `Visibility` (which keys a query row sees, and the key / query
intervals a tile must visit). `compressed_attention.py` and `sliding_window.py` are thin
wrappers around it.

Layout: q [b, n, kh, g, d] (a free view of [b, n, h, d]); the g query heads of kv head k
and BQ consecutive tokens form the R = BQ * g rows of one tile, so each K/V tile is
loaded once per group. Row r is token r // g, head r % g. Logits are kept in base 2
(scale * log2(e) folded in); the saved log-sum-exp is base 2 too.

Grids: forward and dq over (query tiles, b, kh), looping over the key tiles the band
allows; dk/dv over (key tiles, splits, b, kh), looping over the query tiles that see the
key tile. The compressed branch has few key tiles (n / stride keys) and each is seen by
most queries, so its query range is split over several programs whose partial dk/dv
(float32) XLA adds up; the sliding window needs no split.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels._common import (
    F32, LOG2E, MASK_VALUE, MIN_DOT, add_phantom_keys, cdiv, compiler_params, div_up, iota, mm, next_pow2,
    online_softmax_step, pad_axis, round_up, softmax_delta, softmax_finish, softmax_init, tokens_to_rows,
)
from kernels.settings import Tiles


@dataclasses.dataclass(frozen=True)
class Visibility:
    """Which keys a query sees (static).

    kind "compressed": keys are [num_mem memory entries, compressed blocks]; when causal,
        compressed entry c (key index num_mem + c) is visible to query t iff
        (c + 1) * stride - 1 < t; memory is always visible.
    kind "window": key j is visible to query t iff t - window <= j <= t (causal) or
        |t - j| <= window.
    Keys at index >= num_keys are padding and never visible.
    packed: packed documents; each query also has key bounds [lo, hi) (an input of the
        kernels): for "compressed" its document's visible entries (memory stays visible, the
        causal rule above is replaced by the bounds), for "window" its document's tokens.
    phantom: each query also counts some zero keys (logit 0, value 0; an input of the
        kernels): the zero padding its document alone would have (the package's non-causal
        sliding-window quirk).
    offset: the queries are a run of a longer sequence, row t at position off + t (off an
        input of the kernels, traced: a sequence shard under context parallelism); the rules
        above apply to the positions. Not with packed or phantom.
    """

    kind: str
    causal: bool
    num_keys: int
    num_mem: int = 0
    stride: int = 1
    window: int = 0
    packed: bool = False
    phantom: bool = False
    offset: bool = False

    def mask(self, t: jax.Array, j: jax.Array, bounds=None) -> jax.Array:
        """t [R, 1] query positions, j [1, K] key indices (or transposed: [1, R], [K, 1]);
        bounds (packed): the rows' (lo, hi), shaped as t -> bool [R, K] (or [K, R])."""
        visible = j < self.num_keys
        if self.kind == "compressed":
            if self.packed:
                lo, hi = bounds
                visible = visible & ((j < self.num_mem) | ((j >= lo) & (j < hi)))
            elif self.causal:
                visible = visible & ((j < self.num_mem) | ((j - self.num_mem + 1) * self.stride <= t))
        else:
            dist = t - j
            if self.causal:
                visible = visible & (dist >= 0) & (dist <= self.window)
            else:
                visible = visible & (dist <= self.window) & (dist >= -self.window)
            if self.packed:
                lo, hi = bounds
                visible = visible & (j >= lo) & (j < hi)
        return visible

    def key_tiles(self, t0, t1, block_k: int, bounds=None) -> list:
        """Key tile ranges [(first, end)] that queries t0..t1 visit; packed "compressed": the
        memory's tiles, then those of the rows' bounds (bounds: the tile's rows' (lo, hi) [R])."""
        if self.kind == "compressed" and self.packed:
            lo, hi = bounds
            mem_end = cdiv(self.num_mem, block_k)
            return [(0, mem_end), (jnp.maximum(mem_end, lax.div(jnp.min(lo), block_k)), div_up(jnp.max(hi), block_k))]
        lo, hi = self.key_range(t0, t1)
        return [(lax.div(lo, block_k), div_up(hi, block_k))]

    def key_range(self, t0, t1):
        """Keys [lo, hi) that queries t0..t1 may see (scalars, possibly traced)."""
        if self.kind == "compressed":
            if not self.causal:
                return 0, self.num_keys
            return 0, jnp.minimum(self.num_keys, self.num_mem + lax.div(t1, self.stride))
        lo = jnp.maximum(t0 - self.window, 0)
        hi = t1 + 1 if self.causal else t1 + self.window + 1
        return lo, jnp.minimum(hi, self.num_keys)

    def query_range(self, j0, j1, num_queries: int):
        """Queries [lo, hi) that may see some key in j0..j1."""
        if self.kind == "compressed":
            if not self.causal:
                return 0, num_queries
            lo = jnp.where(j0 < self.num_mem, 0, (j0 - self.num_mem + 1) * self.stride)
            return jnp.minimum(lo, num_queries), num_queries
        lo = j0 if self.causal else jnp.maximum(j0 - self.window, 0)
        return jnp.minimum(lo, num_queries), jnp.minimum(j1 + self.window + 1, num_queries)

    def unmasked_key_tiles(self, t0, t1, block_k: int):
        """Key tiles [a, b) that every query t0..t1 sees whole, so their logits need no mask
        (traced ints; an empty range when packed). The kernels mask only the tiles around it."""
        if self.packed:
            return 0, 0
        whole = self.num_keys // block_k  # tiles without padding keys
        if self.kind == "compressed":
            if not self.causal:
                return 0, whole
            return 0, jnp.minimum(whole, lax.div(self.num_mem + lax.div(t0, self.stride), block_k))
        lo = jnp.maximum(t1 - self.window, 0)  # keys >= lo: seen by the last query
        hi = t0 + 1 if self.causal else t0 + self.window + 1  # keys < hi: seen by the first
        return div_up(lo, block_k), jnp.minimum(whole, lax.div(hi, block_k))

    def max_query_span(self, block_k: int, num_queries: int) -> int:
        """The most queries that can see one key tile (static), to size the dk/dv split."""
        if self.kind == "compressed":
            return num_queries
        span = block_k + self.window + (0 if self.causal else self.window)
        return min(span, num_queries)


@dataclasses.dataclass(frozen=True)
class _Config:
    vis: Visibility
    scale: float
    g: int
    n_pad: int
    block_q_fwd: int
    block_k_fwd: int
    block_q_dq: int
    block_k_dq: int
    block_q_dkv: int
    block_k_dkv: int
    dkv_splits: int
    fused_bwd: bool  # the sliding window's dq from its dk/dv kernel (one split; see `_dkdv_kernel`)
    num_warps: int  # backward kernels
    num_warps_fwd: int
    num_stages: int
    interpret: bool


class _Extras(NamedTuple):
    """The per-query inputs of packed documents (None when absent): key bounds lo, hi [b, n_pad]
    int32; phantom zero-key counts [b, n_pad] float32; per dk/dv key tile the queries that may
    see it, q_lo, q_hi [b, key tiles] int32 (packed "compressed" only); the queries' first
    position, offset [b, 1] int32 (`Visibility.offset`), the kernels' last input."""

    lo: jax.Array | None = None
    hi: jax.Array | None = None
    phantom: jax.Array | None = None
    q_lo: jax.Array | None = None
    q_hi: jax.Array | None = None
    offset: jax.Array | None = None


def _masked_around(first, end, plain: tuple, body, carry):
    """fori_loop of body(i, carry, masked) over [first, end): masked=False on the tiles of the
    `plain` range [a, b) (no mask needed), True on those before and after it."""
    a = jnp.minimum(jnp.maximum(first, plain[0]), end)
    b = jnp.minimum(jnp.maximum(a, plain[1]), end)
    carry = lax.fori_loop(first, a, functools.partial(body, masked=True), carry)
    carry = lax.fori_loop(a, b, functools.partial(body, masked=False), carry)
    return lax.fori_loop(b, end, functools.partial(body, masked=True), carry)


def _fwd_kernel(q_ref, k_ref, v_ref, *refs, cfg: _Config):
    *extra, o_ref, lse_ref = refs
    block_q, block_k, g = cfg.block_q_fwd, cfg.block_k_fwd, cfg.g
    rows, d = block_q * g, q_ref.shape[-1]
    t0 = pl.program_id(0) * block_q + (extra[-1][0] if cfg.vis.offset else 0)  # the tile's first position
    q = q_ref[...].reshape(rows, d)  # [R, d]
    t = t0 + lax.div(iota(rows), g)  # [R] position of each row
    bounds = (tokens_to_rows(extra[0][...], g), tokens_to_rows(extra[1][...], g)) if cfg.vis.packed else None
    row_bounds = None if bounds is None else (bounds[0][:, None], bounds[1][:, None])

    def body(kt, carry, masked):
        start = kt * block_k
        k = k_ref[pl.ds(start, block_k), :]  # [BK, d]
        v = v_ref[pl.ds(start, block_k), :]
        s = mm(q, k, trans_b=True) * (cfg.scale * LOG2E)  # [R, BK]
        if masked:
            s = jnp.where(cfg.vis.mask(t[:, None], (start + iota(block_k))[None, :], row_bounds), s, MASK_VALUE)
        return online_softmax_step(carry, s, v)

    carry = softmax_init(rows, d)
    # Only the key tiles around the fully visible ones are masked (H200, T = 64k: the compressed
    # forward 3.7 -> 3.4 ms in fla's configuration, 13.3 -> 12.2 in the paper's).
    plain = cfg.vis.unmasked_key_tiles(t0, t0 + block_q - 1, block_k)
    for first, end in cfg.vis.key_tiles(t0, t0 + block_q - 1, block_k, bounds):
        carry = _masked_around(first, end, plain, body, carry)
    if cfg.vis.phantom:
        carry = add_phantom_keys(carry, tokens_to_rows(extra[-1][...], g))
    o, lse = softmax_finish(carry)  # only padding rows see no key
    o_ref[...] = o.reshape(block_q, g, d).astype(o_ref.dtype)
    lse_ref[...] = lse.reshape(block_q, g)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, cfg: _Config):
    *extra, dq_ref = refs
    block_q, block_k, g = cfg.block_q_dq, cfg.block_k_dq, cfg.g
    rows, d = block_q * g, q_ref.shape[-1]
    t0 = pl.program_id(0) * block_q + (extra[-1][0] if cfg.vis.offset else 0)  # the tile's first position
    q = q_ref[...].reshape(rows, d)
    do = do_ref[...].reshape(rows, d)
    lse = lse_ref[...].reshape(rows)
    delta = delta_ref[...].reshape(rows)
    t = t0 + lax.div(iota(rows), g)
    bounds = (tokens_to_rows(extra[0][...], g), tokens_to_rows(extra[1][...], g)) if cfg.vis.packed else None
    row_bounds = None if bounds is None else (bounds[0][:, None], bounds[1][:, None])

    def body(kt, dq):
        start = kt * block_k
        k = k_ref[pl.ds(start, block_k), :]
        v = v_ref[pl.ds(start, block_k), :]
        s = mm(q, k, trans_b=True) * (cfg.scale * LOG2E)
        visible = cfg.vis.mask(t[:, None], (start + iota(block_k))[None, :], row_bounds)
        p = jnp.where(visible, jnp.exp2(s - lse[:, None]), 0.0)  # [R, BK]
        dp = mm(do, v, trans_b=True)
        ds = p * (dp - delta[:, None])
        return dq + mm(ds.astype(k.dtype), k)

    # Every tile masked: masking only around the fully visible tiles, as the forward does, made
    # this kernel slower (H200, T = 64k: fla config 3.9 -> 4.2 ms, paper 13.7 -> 14.2).
    dq = jnp.zeros((rows, d), F32)
    for first, end in cfg.vis.key_tiles(t0, t0 + block_q - 1, block_k, bounds):
        dq = lax.fori_loop(first, end, body, dq)
    dq_ref[...] = (dq * cfg.scale).reshape(block_q, g, d).astype(dq_ref.dtype)


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, cfg: _Config):
    """One key tile's dk, dv. Works on transposed scores [BK, R] (keys in the matmul M
    dimension, as the Triton tutorial does) so no tile is transposed in registers; q, do
    [n_pad, g, d] are read as row tiles [R, d] (row r: token r // g, head r % g) through
    index arrays, so they need no transposed copy in XLA.

    cfg.fused_bwd (the sliding window, one split): also each visited query tile's share of dq,
    ds @ k, stored in the slot of this key tile among the key tiles that query tile sees
    (dq_ref [slots, n_pad, g, d]; XLA sums the slots), so that no dq kernel computes the logits
    once more. A window spans few key tiles, so the slots are few; the first key tile of a query
    tile zeroes the slots past its last."""
    *extra, dk_ref, dv_ref = refs
    if cfg.fused_bwd:
        *extra, dk_ref, dv_ref, dq_ref = refs
    block_q, block_k, g = cfg.block_q_dkv, cfg.block_k_dkv, cfg.g
    rows, d = block_q * g, q_ref.shape[-1]
    head = lax.rem(iota(rows), g)  # [R]
    kt = pl.program_id(0)
    j0 = kt * block_k
    split = pl.program_id(1)
    k = k_ref[...]  # [BK, d]
    v = v_ref[...]
    j = j0 + iota(block_k)
    shift = extra[-1][0] if cfg.vis.offset else 0  # the first query's position
    if cfg.vis.packed and cfg.vis.kind == "compressed":
        lo, hi = extra[2][0], extra[3][0]  # the queries that may see this key tile
    else:
        lo, hi = cfg.vis.query_range(j0, j0 + block_k - 1, shift + cfg.n_pad)  # positions
        lo, hi = jnp.maximum(lo - shift, 0), jnp.maximum(hi - shift, 0)  # rows
    lo, hi = lax.div(lo, block_q), div_up(hi, block_q)  # query tiles
    per_split = div_up(jnp.maximum(hi - lo, 0), cfg.dkv_splits)
    lo, hi = lo + split * per_split, jnp.minimum(hi, lo + (split + 1) * per_split)

    def body(qt, carry):
        dk, dv = carry
        t = qt * block_q + lax.div(iota(rows), g)  # [R] each row's token
        q = q_ref[t, head, :]  # [R, d]
        do = do_ref[t, head, :]
        lse = lse_ref[t, head]  # [R]
        delta = delta_ref[t, head]
        pos = t + shift  # [R] each row's position
        tokens = pl.ds(qt * block_q, block_q)
        bounds = None
        if cfg.vis.packed:
            bounds = (tokens_to_rows(extra[0][tokens], g)[None, :], tokens_to_rows(extra[1][tokens], g)[None, :])
        s_t = mm(k, q, trans_b=True) * (cfg.scale * LOG2E)  # [BK, R]
        p_t = jnp.where(cfg.vis.mask(pos[None, :], j[:, None], bounds), jnp.exp2(s_t - lse[None, :]), 0.0)
        dv = dv + mm(p_t.astype(do.dtype), do)  # [BK, d]
        dp_t = mm(v, do, trans_b=True)  # [BK, R]
        ds_t = (p_t * (dp_t - delta[None, :])).astype(q.dtype)
        dk = dk + mm(ds_t, q)
        if cfg.fused_bwd:
            dq = mm(ds_t, k, trans_a=True) * cfg.scale  # [R, d]
            [(first, end)] = cfg.vis.key_tiles(qt * block_q + shift, qt * block_q + shift + block_q - 1, block_k)
            dq_ref[kt - first, tokens] = dq.reshape(block_q, g, d).astype(dq_ref.dtype)
            for slot in range(1, dq_ref.shape[0]):
                @pl.when((kt == first) & (slot >= end - first))
                def _zero():
                    dq_ref[slot, tokens] = jnp.zeros((block_q, g, d), dq_ref.dtype)

        return dk, dv

    zeros = jnp.zeros((block_k, d), F32)
    dk, dv = lax.fori_loop(lo, hi, body, (zeros, zeros))  # masked throughout (splitting: no gain)
    dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _window_slots(cfg: _Config) -> int:
    """The most key tiles of `block_k_dkv` keys that one query tile's window spans."""
    span = cfg.block_q_dkv + cfg.vis.window + (0 if cfg.vis.causal else cfg.vis.window)  # keys a tile may see
    return cdiv(span - 1, cfg.block_k_dkv) + 1


def _forward(cfg: _Config, q, k, v, extras: _Extras):
    """q [b, n_pad, kh, g, d], k/v [b, nk_pad, kh, d] -> o like q, lse [b, n_pad, kh, g] (base 2)."""
    b, n_pad, kh, g, d = q.shape
    nk_pad = k.shape[1]
    bq = cfg.block_q_fwd
    q_spec = pl.BlockSpec((None, bq, None, g, d), lambda i, bi, hi: (bi, i, hi, 0, 0))
    kv_spec = pl.BlockSpec((None, nk_pad, None, d), lambda i, bi, hi: (bi, 0, hi, 0))
    token_spec = pl.BlockSpec((None, bq), lambda i, bi, hi: (bi, i))
    rows = [x for x in (extras.lo, extras.hi, extras.phantom) if x is not None]
    offset = [extras.offset] if extras.offset is not None else []
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg),
        grid=(n_pad // bq, b, kh),
        in_specs=[q_spec, kv_spec, kv_spec] + [token_spec] * len(rows)
                 + [pl.BlockSpec((None, 1), lambda i, bi, hi: (bi, 0))] * len(offset),
        out_specs=[q_spec, pl.BlockSpec((None, bq, None, g), lambda i, bi, hi: (bi, i, hi, 0))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, n_pad, kh, g), F32)],
        compiler_params=compiler_params(cfg.num_warps_fwd, cfg.num_stages),
        interpret=cfg.interpret,
        name=f"nsa_{cfg.vis.kind}_fwd",
    )(q, k, v, *rows, *offset)


def _backward(cfg: _Config, q, k, v, o, lse, do, extras: _Extras):
    delta = softmax_delta(o, do)  # [b, n_pad, kh, g]
    bounds = [x for x in (extras.lo, extras.hi) if x is not None]
    offset = [extras.offset] if extras.offset is not None else []
    dq = None if cfg.fused_bwd else _dq(cfg, q, k, v, do, lse, delta, bounds, offset)
    dk, dv, dq_fused = _dkdv(cfg, q, k, v, do, lse, delta, extras, bounds, offset)
    return (dq_fused if cfg.fused_bwd else dq), dk, dv


def _dq(cfg: _Config, q, k, v, do, lse, delta, bounds: list, offset: list):
    """dq from `_dq_kernel`, one program per query tile."""
    b, n_pad, kh, g, d = q.shape
    nk_pad = k.shape[1]
    bq = cfg.block_q_dq
    q_tile = pl.BlockSpec((None, bq, None, g, d), lambda i, bi, hi: (bi, i, hi, 0, 0))
    row_tile = pl.BlockSpec((None, bq, None, g), lambda i, bi, hi: (bi, i, hi, 0))
    kv_full = pl.BlockSpec((None, nk_pad, None, d), lambda i, bi, hi: (bi, 0, hi, 0))
    token_tile = pl.BlockSpec((None, bq), lambda i, bi, hi: (bi, i))
    return pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg),
        grid=(n_pad // bq, b, kh),
        in_specs=[q_tile, kv_full, kv_full, q_tile, row_tile, row_tile] + [token_tile] * len(bounds)
                 + [pl.BlockSpec((None, 1), lambda i, bi, hi: (bi, 0))] * len(offset),
        out_specs=q_tile,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=compiler_params(cfg.num_warps, cfg.num_stages),
        interpret=cfg.interpret,
        name=f"nsa_{cfg.vis.kind}_dq",
    )(q, k, v, do, lse, delta, *bounds, *offset)


def _dkdv(cfg: _Config, q, k, v, do, lse, delta, extras: _Extras, bounds: list, offset: list):
    """dk, dv, and with cfg.fused_bwd also dq (else None)."""
    b, n_pad, kh, g, d = q.shape
    nk_pad = k.shape[1]
    bk, splits = cfg.block_k_dkv, cfg.dkv_splits
    q_full = pl.BlockSpec((None, n_pad, None, g, d), lambda j, sp, bi, hi: (bi, 0, hi, 0, 0))
    row_full = pl.BlockSpec((None, n_pad, None, g), lambda j, sp, bi, hi: (bi, 0, hi, 0))
    kv_tile = pl.BlockSpec((None, bk, None, d), lambda j, sp, bi, hi: (bi, j, hi, 0))
    out_tile = pl.BlockSpec((None, None, bk, None, d), lambda j, sp, bi, hi: (sp, bi, j, hi, 0))
    tokens_full = pl.BlockSpec((None, n_pad), lambda j, sp, bi, hi: (bi, 0))
    key_tile = pl.BlockSpec((None, 1), lambda j, sp, bi, hi: (bi, j))
    tile_ranges = [x for x in (extras.q_lo, extras.q_hi) if x is not None]
    out_dtype = F32 if splits > 1 else k.dtype  # partial sums stay in f32
    out_specs, out_shape = [out_tile, out_tile], [jax.ShapeDtypeStruct((splits, *k.shape), out_dtype)] * 2
    if cfg.fused_bwd:  # dq's slots: float32, summed below
        slots = _window_slots(cfg)
        out_specs.append(pl.BlockSpec((slots, None, n_pad, None, g, d), lambda j, sp, bi, hi: (0, bi, 0, hi, 0, 0)))
        out_shape.append(jax.ShapeDtypeStruct((slots, *q.shape), F32))
    dk, dv, *dq = pl.pallas_call(
        functools.partial(_dkdv_kernel, cfg=cfg),
        grid=(nk_pad // bk, splits, b, kh),
        in_specs=[q_full, kv_tile, kv_tile, q_full, row_full, row_full]
                 + [tokens_full] * len(bounds) + [key_tile] * len(tile_ranges)
                 + [pl.BlockSpec((None, 1), lambda j, sp, bi, hi: (bi, 0))] * len(offset),
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=compiler_params(cfg.num_warps, cfg.num_stages),
        interpret=cfg.interpret,
        name=f"nsa_{cfg.vis.kind}_dkdvq" if cfg.fused_bwd else f"nsa_{cfg.vis.kind}_dkdv",
    )(q, k, v, do, lse, delta, *bounds, *tile_ranges, *offset)
    dq = dq[0].sum(axis=0).astype(q.dtype) if cfg.fused_bwd else None
    return dk.sum(axis=0).astype(k.dtype), dv.sum(axis=0).astype(v.dtype), dq


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg: _Config, q, k, v, extras: _Extras):
    return _forward(cfg, q, k, v, extras)[0]


def _flash_fwd(cfg: _Config, q, k, v, extras: _Extras):
    o, lse = _forward(cfg, q, k, v, extras)
    return o, (q, k, v, o, lse, extras)


def _flash_bwd(cfg: _Config, res, do):
    q, k, v, o, lse, extras = res
    dq, dk, dv = _backward(cfg, q, k, v, o, lse, do, extras)
    return dq, dk, dv, jax.tree.map(lambda _: None, extras)


_flash.defvjp(_flash_fwd, _flash_bwd)


def _rows_to_tokens(rows: int, g: int, n: int) -> int:
    """Query tokens per tile: `rows` rows of g heads, at least MIN_DOT rows, no more than needed."""
    block_q = max(1, rows // g, cdiv(MIN_DOT, g))
    return min(next_pow2(block_q), max(next_pow2(n), next_pow2(cdiv(MIN_DOT, g))))


def banded_attention(
    q: jax.Array,  # [b, n, h, d]
    k: jax.Array,  # [b, nk, kh, d]
    v: jax.Array,  # [b, nk, kh, d]
    vis: Visibility,
    *,
    scale: float,
    tiles: Tiles = Tiles(),
    interpret: bool = False,
    bounds: tuple[jax.Array, jax.Array] | None = None,  # vis.packed: each query's keys [lo, hi), [b, n] each
    phantom: jax.Array | None = None,  # vis.phantom: each query's zero keys, [b, n]
    key_queries: tuple[jax.Array, jax.Array] | None = None,  # packed compressed: the queries [lo, hi) of each key, [b, nk]
    offset: jax.Array | int | None = None,  # vis.offset: the first query's position (int scalar, may be traced)
) -> jax.Array:  # [b, n, h, d]
    """Softmax attention of each query over the keys `vis` lets it see (GQA, any n, d).

    Pads d to a power of two >= MIN_DOT, queries to the tile size and keys to the key tile (the
    padding is masked by `vis.num_keys`), then runs the kernels; every query row must see
    at least one key (the wrappers guarantee it or fall back).
    """
    b, n, h, d = q.shape
    kh = k.shape[2]
    g = h // kh
    dtype = jnp.result_type(q, k, v)
    d_pad = max(MIN_DOT, next_pow2(d))
    bq = [_rows_to_tokens(r, g, n) for r in (tiles.rows_fwd, tiles.rows_dq, tiles.rows_dkv)]
    key_cap = max(MIN_DOT, next_pow2(max(vis.num_keys, 1)))
    bk = [min(x, key_cap) for x in (tiles.block_k_fwd, tiles.block_k_dq, tiles.block_k_dkv)]
    n_pad = round_up(n, max(bq))
    nk_pad = round_up(max(k.shape[1], vis.num_keys, 1), max(bk))
    dkv_tiles = cdiv(vis.max_query_span(bk[2], n_pad), bq[2]) + 1
    programs = cdiv(nk_pad, bk[2]) * b * kh  # dk/dv programs per split
    fill = min(cdiv(tiles.dkv_target_programs, programs), dkv_tiles // tiles.min_dkv_tiles_per_program)
    dkv_splits = max(1, min(tiles.max_dkv_splits, max(dkv_tiles // tiles.dkv_tiles_per_program, fill),
                            tiles.dkv_partial_bytes // (2 * 4 * nk_pad * b * kh * d_pad)))
    fused_bwd = tiles.window_bwd == "fused" and vis.kind == "window" and not vis.offset
    cfg = _Config(
        vis=vis, scale=float(scale), g=g, n_pad=n_pad,
        block_q_fwd=bq[0], block_k_fwd=bk[0], block_q_dq=bq[1], block_k_dq=bk[1],
        block_q_dkv=bq[2], block_k_dkv=bk[2], dkv_splits=1 if fused_bwd else dkv_splits, fused_bwd=fused_bwd,
        num_warps=tiles.num_warps, num_warps_fwd=tiles.num_warps_fwd, num_stages=tiles.num_stages,
        interpret=interpret,
    )
    qp = pad_axis(pad_axis(q.astype(dtype), 3, d_pad), 1, n_pad).reshape(b, n_pad, kh, g, d_pad)
    kp = pad_axis(pad_axis(k.astype(dtype), 3, d_pad), 1, nk_pad)
    vp = pad_axis(pad_axis(v.astype(dtype), 3, d_pad), 1, nk_pad)
    extras = _Extras()
    if vis.packed:  # padding queries see no key beyond the memory
        pad_to = lambda x, value: jnp.pad(x.astype(jnp.int32), ((0, 0), (0, n_pad - n)), constant_values=value)  # noqa: E731
        extras = extras._replace(lo=pad_to(bounds[0], nk_pad), hi=pad_to(bounds[1], 0))
        if vis.kind == "compressed":
            bk_dkv = cfg.block_k_dkv
            q_lo = jnp.pad(key_queries[0].astype(jnp.int32), ((0, 0), (0, nk_pad - key_queries[0].shape[1])),
                           constant_values=n_pad)
            q_hi = jnp.pad(key_queries[1].astype(jnp.int32), ((0, 0), (0, nk_pad - key_queries[1].shape[1])))
            extras = extras._replace(q_lo=q_lo.reshape(b, -1, bk_dkv).min(axis=2),
                                     q_hi=q_hi.reshape(b, -1, bk_dkv).max(axis=2))
    if vis.phantom:
        extras = extras._replace(phantom=jnp.pad(phantom.astype(F32), ((0, 0), (0, n_pad - n))))
    if vis.offset:
        if vis.packed or vis.phantom or offset is None:
            raise ValueError("Visibility.offset takes an offset, and no packed or phantom inputs")
        extras = extras._replace(offset=jnp.broadcast_to(jnp.asarray(offset, jnp.int32), (b, 1)))
    o = _flash(cfg, qp, kp, vp, extras)  # [b, n_pad, kh, g, d_pad]
    return o.reshape(b, n_pad, h, d_pad)[:, :n, :, :d].astype(q.dtype)

"""Compressed-branch Pallas kernel against the reference: forward and d(q, ck, cv)."""

from __future__ import annotations

import functools

import jax
import pytest

from kernel_testing import DTYPES, check_vjp, randn
from kernels._flash import Tiles
from kernels.compressed_attention import compressed_attention
from nsa_jax import reference

# (n, heads, kv_heads, dim_head, stride, num_mem, causal): g = 1, 2, 4, 16; n from 1 to 300,
# multiples of the stride and not; no compressed block at all (n < stride).
CASES = [
    (1, 2, 2, 32, 4, 1, True),
    (37, 4, 4, 32, 4, 1, True),
    (100, 8, 4, 64, 16, 1, True),
    (100, 8, 4, 64, 16, 2, False),
    (150, 16, 4, 32, 8, 3, False),
    (61, 4, 1, 128, 2, 1, True),
    (255, 16, 1, 64, 4, 1, True),
    (300, 16, 1, 128, 16, 1, True),
    (40, 4, 2, 32, 4, 0, False),
    (40, 4, 2, 32, 4, 0, True),  # no memory, causal: documented fallback to the reference
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_compressed_attention_kernel_matches_reference(case, dtype):
    n, h, kh, d, stride, m, causal = case
    keys = jax.random.split(jax.random.key(hash(case) % 2**31), 4)
    nc = n // stride
    q = randn(keys[0], (2, n, h, d), dtype)
    ck, cv = (randn(key, (2, m + nc, kh, d), dtype) for key in keys[1:3])
    kw = dict(num_mem=m, stride=stride, causal=causal)
    check_vjp("compressed", functools.partial(compressed_attention, **kw),
              functools.partial(reference.compressed_attention, **kw),
              (q, ck, cv), ("q", "ck", "cv"), dtype, keys[3], case=str(case))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("case", [CASES[2], CASES[4]], ids=str)
def test_compressed_attention_kernel_split_dkdv(case, dtype):
    """dk/dv with each key tile's query range split over several programs (partial sums)."""
    n, h, kh, d, stride, m, causal = case
    keys = jax.random.split(jax.random.key(hash(case) % 2**31 + 1), 4)
    nc = n // stride
    q = randn(keys[0], (2, n, h, d), dtype)
    ck, cv = (randn(key, (2, m + nc, kh, d), dtype) for key in keys[1:3])
    kw = dict(num_mem=m, stride=stride, causal=causal)
    tiles = Tiles(rows_dkv=16, dkv_tiles_per_program=2)
    check_vjp("compressed", functools.partial(compressed_attention, tiles=tiles, **kw),
              functools.partial(reference.compressed_attention, **kw),
              (q, ck, cv), ("q", "ck", "cv"), dtype, keys[3], case=str(case) + "split")

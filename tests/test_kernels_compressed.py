"""Compressed-branch Pallas kernel against the reference: forward and d(q, ck, cv)."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_testing import BOTH, F32_ONLY, ON_GPU, check_vjp, grid, randn
from kernels._flash import Visibility
from kernels.compressed_attention import block_causal_attention, compressed_attention
from kernels.settings import Tiles
from nsa_jax import reference


class Case(NamedTuple):
    n: int
    heads: int
    kv_heads: int
    dim_head: int
    stride: int
    num_mem: int
    causal: bool


# g = 1, 2, 4, 16; n from 1 to 300, multiples of the stride and not; no compressed block at
# all (n < stride); no memory entry (non-causal; causal without memory falls back, below).
CASES = {
    "one_query": Case(1, 2, 2, 32, 4, 1, True),
    "g1": Case(37, 4, 4, 32, 4, 1, True),
    "g2_seed": Case(100, 8, 4, 64, 16, 1, True),
    "g2_noncausal_mem2": Case(100, 8, 4, 64, 16, 2, False),
    "g4_noncausal_mem3": Case(150, 16, 4, 32, 8, 3, False),
    "g4_d128_stride2": Case(61, 4, 1, 128, 2, 1, True),
    "g16": Case(255, 16, 1, 64, 4, 1, True),
    "g16_d128": Case(300, 16, 1, 128, 16, 1, True),
    "no_memory_noncausal": Case(40, 4, 2, 32, 4, 0, False),
}


def inputs(case: Case, dtype, seed: int):
    keys = jax.random.split(jax.random.key(seed), 4)
    nc = case.n // case.stride
    q = randn(keys[0], (2, case.n, case.heads, case.dim_head), dtype)
    ck, cv = (randn(key, (2, case.num_mem + nc, case.kv_heads, case.dim_head), dtype) for key in keys[1:3])
    return q, ck, cv, keys[3]


def check(case: Case, dtype, seed: int, tiles: Tiles = Tiles(), label: str = "compressed") -> None:
    q, ck, cv, key = inputs(case, dtype, seed)
    kw = dict(num_mem=case.num_mem, stride=case.stride, causal=case.causal)
    check_vjp(label, functools.partial(compressed_attention, tiles=tiles, **kw),
              functools.partial(reference.compressed_attention, **kw),
              (q, ck, cv), ("q", "ck", "cv"), dtype, key, case=str(case))


@pytest.mark.parametrize("case,dtype", grid(CASES, {"g2_seed": BOTH, "g4_noncausal_mem3": BOTH}))
def test_compressed_attention_kernel_matches_reference(case, dtype):
    check(case, dtype, hash(case) % 2**31)


@pytest.mark.parametrize("case,dtype", grid({n: CASES[n] for n in ("g2_seed", "g4_noncausal_mem3")},
                                            {"g2_seed": F32_ONLY}))
def test_compressed_attention_kernel_split_dkdv(case, dtype):
    """dk/dv with each key tile's query range split over several programs (partial sums)."""
    check(case, dtype, hash(case) % 2**31 + 1, Tiles(rows_dkv=16, dkv_tiles_per_program=2), "compressed split")


def test_causal_without_memory_is_the_reference():
    """Documented fallback, not a kernel: causal attention with no memory entry (queries before
    the first stride see no key; `SparseAttention` always has >= 1 memory entry) is computed by
    the reference, bit for bit."""
    q, ck, cv, _ = inputs(Case(40, 4, 2, 32, 4, 0, True), np.float32, 5)
    kw = dict(num_mem=0, stride=4, causal=True)
    np.testing.assert_array_equal(np.asarray(compressed_attention(q, ck, cv, **kw)),
                                  np.asarray(reference.compressed_attention(q, ck, cv, **kw)))


# The causal cases with one memory entry: block-causal attention (kernels.compressed_attention).
BLOCK_CAUSAL = {name: c for name, c in CASES.items() if c.causal and c.num_mem == 1}


@pytest.mark.parametrize("case,dtype", grid(BLOCK_CAUSAL, {"g16": F32_ONLY, "g2_seed": F32_ONLY}))
def test_block_causal_folding_matches_reference(case, dtype):
    """The cuDNN path's folding of each block's tokens into heads, run through XLA's attention
    (the same call as on the GPU but for the implementation): n a multiple of the stride and
    not, odd and even block counts, g = 1 to 16."""
    q, ck, cv, key = inputs(case, dtype, hash(case) % 2**31 + 2)
    kw = dict(num_mem=1, stride=case.stride, causal=True)
    check_vjp("compressed block-causal", functools.partial(block_causal_attention, stride=case.stride,
                                                           scale=case.dim_head**-0.5, implementation="xla"),
              functools.partial(reference.compressed_attention, **kw), (q, ck, cv), ("q", "ck", "cv"), dtype, key,
              case=str(case))


@pytest.mark.skipif(not ON_GPU, reason="cuDNN runs on the GPU only")
@pytest.mark.parametrize("case", list(BLOCK_CAUSAL.values()), ids=str)
def test_compressed_attention_cudnn_matches_reference(case):
    q, ck, cv, key = inputs(case, jnp.bfloat16, hash(case) % 2**31 + 3)
    kw = dict(num_mem=1, stride=case.stride, causal=True)
    check_vjp("compressed cudnn", functools.partial(compressed_attention, impl="cudnn", **kw),
              functools.partial(reference.compressed_attention, **kw), (q, ck, cv), ("q", "ck", "cv"),
              jnp.bfloat16, key, case=str(case))


@pytest.mark.parametrize("kw", [dict(num_mem=2, causal=True), dict(num_mem=1, causal=False)])
def test_compressed_attention_cudnn_refuses_what_it_cannot_compute(kw):
    q, ck, cv, _ = inputs(Case(40, 4, 2, 32, 4, kw["num_mem"], kw["causal"]), np.float32, 6)
    with pytest.raises(ValueError, match="cuDNN compressed branch serves causal attention with one memory entry"):
        compressed_attention(q, ck, cv, stride=4, impl="cudnn", **kw)


@pytest.mark.parametrize("vis", [
    Visibility("compressed", causal=True, num_keys=37, num_mem=1, stride=4),
    Visibility("compressed", causal=True, num_keys=70, num_mem=3, stride=2),
    Visibility("compressed", causal=False, num_keys=37, num_mem=2, stride=4),
    Visibility("window", causal=True, num_keys=150, window=40),
    Visibility("window", causal=False, num_keys=150, window=33),
], ids=lambda v: f"{v.kind}-{'causal' if v.causal else 'noncausal'}-{v.num_keys}")
def test_unmasked_key_tiles_are_exactly_the_fully_visible_ones(vis):
    """The forward skips the mask on `unmasked_key_tiles`: every key of those tiles must be
    visible to every query of the query tile, and the tiles just outside must not be."""
    block_k, block_q = 8, 4
    for t0 in range(0, 160, block_q):
        t1 = t0 + block_q - 1
        a, b = (int(x) for x in vis.unmasked_key_tiles(t0, t1, block_k))
        t = np.arange(t0, t1 + 1)[:, None]

        def whole(tile, t=t):
            j = np.arange(tile * block_k, (tile + 1) * block_k)[None, :]
            return bool(np.all(np.asarray(vis.mask(t, j))))

        assert all(whole(tile) for tile in range(a, b)), (t0, a, b)
        for tile in (a - 1, b):  # the neighbours (tiles without padding keys) need the mask
            if 0 <= tile < vis.num_keys // block_k:
                assert not whole(tile), (t0, tile, a, b)


@pytest.mark.parametrize("offset,m", [pytest.param(0, 48, marks=pytest.mark.slow),
                                      pytest.param(64, 48, marks=pytest.mark.slow), (200, 100), (37, 21)])
def test_sequence_shard_attends_as_its_rows_of_the_whole(offset, m):
    """Context parallelism (`kernels.shard_attention.compressed_attention_shard`): m queries at
    positions offset + [0, m) of a longer sequence (the offset traced; a multiple of the stride
    or not), against the whole sequence's compressed keys, in small tiles (masked and unmasked
    key tiles, dk/dv split): the reference's rows at those positions, and its gradients."""
    from kernels.shard_attention import compressed_attention_shard

    case = Case(300, 8, 4, 32, 4, 1, True)
    q, ck, cv, key = inputs(case, jnp.float32, offset)
    rows = slice(offset, offset + m)
    positions = offset + jnp.arange(m)
    tiles = Tiles(rows_fwd=16, rows_dq=16, rows_dkv=16, block_k_fwd=16, block_k_dq=16, block_k_dkv=16,
                  dkv_tiles_per_program=2)
    kw = dict(num_mem=case.num_mem, stride=case.stride, scale=case.dim_head**-0.5)
    check_vjp("compressed shard", lambda q, ck, cv: compressed_attention_shard(q, ck, cv, positions[0], tiles=tiles,
                                                                               **kw),
              lambda q, ck, cv: reference.compressed_attention(q, ck, cv, causal=True, q_positions=positions, **kw),
              (q[:, rows], ck, cv), ("q", "ck", "cv"), jnp.float32, key, case=f"offset {offset}")


@pytest.mark.parametrize("case,dtype", grid({n: CASES[n] for n in ("g2_seed", "g4_noncausal_mem3")}, {}))
def test_compressed_attention_xla_matches_reference(case, dtype):
    """impl="xla": the reference's masked attention, its backward recomputing the logits."""
    q, ck, cv, key = inputs(case, dtype, hash(case) % 2**31 + 2)
    kw = dict(num_mem=case.num_mem, stride=case.stride, causal=case.causal)
    check_vjp("compressed xla", functools.partial(compressed_attention, impl="xla", **kw),
              functools.partial(reference.compressed_attention, **kw),
              (q, ck, cv), ("q", "ck", "cv"), dtype, key, case=str(case))

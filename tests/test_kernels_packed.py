"""The Pallas kernels with packed documents (segments) against the reference with the same
segments (which tests/test_segments.py checks against each document alone): outputs and every
gradient, causal and non-causal, in documents shorter than a block, one block and many."""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np
import pytest

from kernel_testing import BOTH, F32_ONLY, check_vjp, grid, randn
from kernels.compressed_attention import compressed_attention
from kernels.sliding_window import sliding_window_attention
from nsa_jax import reference
from nsa_jax import segments as seg

LENGTHS = {"short": (3, 5, 2, 7, 6), "one_block": (16, 16, 16), "many": (3, 16, 41, 7, 60)}


class Case(NamedTuple):
    lengths: str
    heads: int
    kv_heads: int
    dim_head: int
    causal: bool
    stride: int = 4  # compressed
    num_mem: int = 1  # compressed
    window: int = 5  # sliding
    mask_padding: bool = False  # sliding


def packed(case: Case) -> seg.Segments:
    """Two rows: the documents in order, and reversed (other offsets)."""
    lengths = LENGTHS[case.lengths]
    rows = [np.concatenate([np.full(length, i) for i, length in enumerate(order)])
            for order in (lengths, lengths[::-1])]
    return seg.from_ids(np.stack(rows))


COMPRESSED = {
    "g2_causal_many": Case("many", 4, 2, 32, True),
    "g2_noncausal_short": Case("short", 4, 2, 32, False),
    "g1_causal_one_block_mem2": Case("one_block", 2, 2, 32, True, stride=8, num_mem=2),
    "g16_causal_many_d128": Case("many", 16, 1, 128, True, stride=16),
}
SLIDING = {
    "g2_causal_many": Case("many", 4, 2, 32, True),
    "g2_noncausal_quirk_short": Case("short", 4, 2, 32, False),
    "g2_noncausal_quirk_many_window8": Case("many", 4, 2, 32, False, window=8),
    "g4_noncausal_masked_many": Case("many", 8, 2, 64, False, mask_padding=True),
    "g1_causal_window0_one_block": Case("one_block", 2, 2, 32, True, window=0),
}


@pytest.mark.parametrize("case,dtype", grid(COMPRESSED, {"g2_causal_many": BOTH, "g2_noncausal_short": F32_ONLY}))
def test_compressed_attention_packed_matches_reference(case, dtype):
    segments = packed(case)
    b, n = segments.start.shape
    keys = jax.random.split(jax.random.key(hash(case) % 2**31), 4)
    nk = case.num_mem + n // case.stride
    q = randn(keys[0], (b, n, case.heads, case.dim_head), dtype)
    ck, cv = (randn(key, (b, nk, case.kv_heads, case.dim_head), dtype) for key in keys[1:3])
    kw = dict(num_mem=case.num_mem, stride=case.stride, causal=case.causal)
    check_vjp("compressed_packed", lambda q, ck, cv: compressed_attention(q, ck, cv, segments, **kw),
              lambda q, ck, cv: reference.compressed_attention(q, ck, cv, segments=segments, **kw),
              (q, ck, cv), ("q", "ck", "cv"), dtype, keys[3], case=str(case))


@pytest.mark.parametrize("case,dtype", grid(SLIDING, {"g2_noncausal_quirk_short": BOTH, "g2_causal_many": F32_ONLY}))
def test_sliding_window_packed_matches_reference(case, dtype):
    segments = packed(case)
    b, n = segments.start.shape
    keys = jax.random.split(jax.random.key(hash(case) % 2**31), 4)
    q = randn(keys[0], (b, n, case.heads, case.dim_head), dtype)
    k, v = (randn(key, (b, n, case.kv_heads, case.dim_head), dtype) for key in keys[1:3])
    kw = dict(window=case.window, causal=case.causal, mask_padding=case.mask_padding)
    check_vjp("sliding_packed", lambda q, k, v: sliding_window_attention(q, k, v, segments, impl="pallas", **kw),
              lambda q, k, v: reference.sliding_window_attention(q, k, v, segments=segments, **kw),
              (q, k, v), ("q", "k", "v"), dtype, keys[3], case=str(case))

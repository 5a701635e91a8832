"""Sliding-window attention (Pallas kernel; cuDNN on GPU for causal bf16) against the reference."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest

from kernel_testing import DTYPES, ON_GPU, check_vjp, randn
from kernels.sliding_window import sliding_window_attention
from nsa_jax import reference

# (n, heads, kv_heads, dim_head, window, causal, mask_padding): g = 1, 2, 4, 16; the
# package's non-causal zero-padding quirk with windows that do and do not divide n.
CASES = [
    (1, 2, 2, 32, 4, True, False),
    (37, 4, 4, 32, 5, True, False),
    (100, 8, 4, 64, 64, True, False),
    (100, 8, 4, 64, 16, False, False),
    (100, 8, 4, 64, 16, False, True),
    (150, 16, 4, 32, 0, True, False),
    (130, 16, 1, 128, 33, False, False),
    (257, 4, 2, 64, 300, True, False),
    (300, 16, 1, 128, 48, True, False),
]


def _run(case, dtype, impl):
    n, h, kh, d, w, causal, mask_padding = case
    keys = jax.random.split(jax.random.key(hash(case) % 2**31), 4)
    q = randn(keys[0], (2, n, h, d), dtype)
    k, v = (randn(key, (2, n, kh, d), dtype) for key in keys[1:3])
    kw = dict(window=w, causal=causal, mask_padding=mask_padding)
    check_vjp(f"sliding_{impl}", functools.partial(sliding_window_attention, impl=impl, **kw),
              functools.partial(reference.sliding_window_attention, **kw),
              (q, k, v), ("q", "k", "v"), dtype, keys[3], case=str(case))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_sliding_window_pallas_kernel_matches_reference(case, dtype):
    _run(case, dtype, "pallas")


@pytest.mark.skipif(not ON_GPU, reason="cuDNN runs on the GPU only")
@pytest.mark.parametrize("case", [c for c in CASES if c[5] and c[4] > 0], ids=str)
def test_sliding_window_kernel_cudnn_matches_reference(case):
    """cuDNN's local window, the default for long causal bf16 windows on GPU."""
    _run(case, jnp.bfloat16, "cudnn")

"""Shared pieces of the kernel tests: dtypes, tiers, the oracle, error checks.

On CPU the kernels run in Pallas interpret mode (CI); on a GPU the same tests run the Triton
kernels. Both in float32 and bfloat16. Each test file keeps a few cases per kernel, branch
and dtype in the quick tier (`pytest -q`) and the rest of its grid under the `slow` marker
(`pytest -q -m slow`); `cases()` builds such a parameter list. The oracle is the pure-JAX reference
evaluated in float32 on the same (possibly bf16-rounded) inputs with full-precision
matmuls, so TF32 never enters the comparison.

Error metric: max |kernel - oracle| / max |oracle| per output or gradient (float32), and the
norm-wise relative error ||kernel - oracle|| / ||oracle|| (bfloat16, whose elementwise errors
near zeros are meaningless). Set NSA_KERNEL_ERRLOG=path to append every measured error as a
JSON line (the GPU run summarises them per kernel and dtype).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ON_GPU = jax.default_backend() == "gpu"
DTYPES = [jnp.float32, jnp.bfloat16]
# float32: the tests run under jax_default_matmul_precision="highest" (tests/conftest.py), so the
# kernels use IEEE f32 matmuls and only summation order differs from the oracle.
# bfloat16: inputs, softmax weights and gradient tiles round to 8 bits inside the matmuls.
TOLERANCE = {jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.bfloat16): 1e-2}


def grid(named: dict, quick: dict[str, tuple] | None = None, dtypes=DTYPES) -> list:
    """pytest params (case, dtype) for every named case and dtype, id "name-dtype"; the pairs
    listed in `quick` ({name: dtypes}) run in the quick tier, the rest under the slow marker."""
    quick = quick or {}
    return [pytest.param(case, dtype, id=f"{name}-{jnp.dtype(dtype).name}",
                         marks=() if dtype in quick.get(name, ()) else pytest.mark.slow)
            for name, case in named.items() for dtype in dtypes]


BOTH = (jnp.float32, jnp.bfloat16)  # for `grid`'s quick pairs
F32_ONLY = (jnp.float32,)


def randn(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def oracle(fn, *args):
    """fn(*args) and its vjp, in float32 with full-precision matmuls."""
    args = [a.astype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a for a in args]
    with jax.default_matmul_precision("highest"):
        out, vjp = jax.vjp(jax.jit(fn), *args)
    return out, jax.jit(lambda ct: _highest(vjp, ct))


def _highest(vjp, ct):
    with jax.default_matmul_precision("highest"):
        return vjp(ct.astype(jnp.float32))


def relative_error(got: jax.Array, want: jax.Array, dtype) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    assert np.all(np.isfinite(got)), "non-finite values"
    if jnp.dtype(dtype) == jnp.float32:
        scale = np.abs(want).max()
        return float(np.abs(got - want).max() / scale) if scale > 0 else float(np.abs(got).max())
    scale = np.linalg.norm(want)
    return float(np.linalg.norm(got - want) / scale) if scale > 0 else float(np.linalg.norm(got))


def assert_close(kernel: str, what: str, got: jax.Array, want: jax.Array, dtype, tol: float | None = None,
                 **case) -> None:
    """tol: TOLERANCE of the dtype unless given (TF32-only kernels on the GPU)."""
    err = relative_error(got, want, dtype)
    path = os.environ.get("NSA_KERNEL_ERRLOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(dict(kernel=kernel, what=what, dtype=jnp.dtype(dtype).name, err=err,
                                    platform=jax.default_backend(), **case)) + "\n")
    tol = TOLERANCE[jnp.dtype(dtype)] if tol is None else tol
    assert err <= tol, f"{kernel} {what} ({jnp.dtype(dtype).name}): relative error {err:.3g} > {tol:g}"


def check_vjp(kernel: str, fn_kernel, fn_reference, diff_args, names, dtype, key, tol: float | None = None,
              **case) -> None:
    """Forward and every gradient of fn_kernel against the float32 oracle of fn_reference."""
    out, vjp = jax.vjp(jax.jit(fn_kernel), *diff_args)
    vjp = jax.jit(vjp)
    want, vjp_ref = oracle(fn_reference, *diff_args)
    assert out.dtype == diff_args[0].dtype, (out.dtype, diff_args[0].dtype)
    assert_close(kernel, "out", out, want, dtype, tol, **case)
    ct = randn(key, out.shape, dtype)
    for name, got, ref in zip(names, vjp(ct), vjp_ref(ct)):
        assert got.dtype == dict(zip(names, diff_args))[name].dtype
        assert_close(kernel, f"d{name}", got, ref, dtype, tol, **case)


def loops_outside_kernels(jaxpr) -> list[str]:
    """Loops XLA would run as while loops (a scan not fully unrolled, a while), outside Pallas kernels."""
    from jax._src import source_info_util

    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            continue
        length, unroll = eqn.params.get("length"), eqn.params.get("unroll")
        unrolled = unroll is True or unroll == length  # (not `in (True, length)`: 1 == True)
        if eqn.primitive.name == "while" or (eqn.primitive.name == "scan" and not unrolled):
            found.append(f"{eqn.primitive.name} at {source_info_util.summarize(eqn.source_info)}")
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found += loops_outside_kernels(inner)
    return found

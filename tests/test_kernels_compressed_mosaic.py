"""The Mosaic GPU compressed branch (`kernels.mosaic_compressed`) against the reference.

On the CPU the kernels run in the Mosaic GPU interpreter, which simulates the warpgroups, shared
memory, TMA and barriers and computes the matmuls in float32: the float32 tolerance applies. On a
GPU the hardware reads float32 as TF32 (truncated), whatever the matmul precision, so there the
tests run outside "highest" with a TF32 tolerance (measured: <= 2e-3 at T = 16384).
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_testing import ON_GPU, check_vjp
from kernels.compressed_attention import compressed_attention
from kernels.mosaic_compressed import compressed_attention_mosaic, mosaic_pays, mosaic_usable
from kernels.settings import MosaicTiles
from nsa_jax import reference
from test_kernels_compressed import Case, inputs

TF32_TOLERANCE = 5e-3

# g = 2 (the two heads of a kv head on the same rows), 1, 4, 16 (consecutive row blocks); lengths
# that need padding; several dk/dv chunks, some skipped (their queries see none of a key block).
CASES = {
    "g2_seed": (Case(200, 8, 4, 64, 16, 1, True), MosaicTiles()),
    "g1_d32_mem2_chunks": (Case(130, 2, 2, 32, 4, 2, True), MosaicTiles(block_kv=32, dkv_chunk=128)),
    "g4_stride8": (Case(300, 8, 2, 64, 8, 1, True), MosaicTiles(stages=3)),
    "g16_d32": (Case(256, 16, 1, 32, 16, 1, True), MosaicTiles(block_kv=96)),
    "g2_stride2_mem3": (Case(96, 4, 2, 64, 2, 3, True), MosaicTiles(block_kv=32, dkv_chunk=128)),
}
QUICK = ("g2_seed", "g1_d32_mem2_chunks")


def precision():
    """The matmul precision these kernels are checked under (see the module docstring)."""
    return jax.default_matmul_precision("tensorfloat32") if ON_GPU else contextlib.nullcontext()


@pytest.mark.parametrize("name", [n if n in QUICK else pytest.param(n, marks=pytest.mark.slow) for n in CASES])
def test_mosaic_compressed_matches_reference(name):
    case, tiles = CASES[name]
    q, ck, cv, key = inputs(case, jnp.float32, hash(name) % 2**31)
    kw = dict(num_mem=case.num_mem, stride=case.stride)
    with precision():
        check_vjp("compressed_mosaic", functools.partial(compressed_attention_mosaic, scale=case.dim_head**-0.5,
                                                         tiles=tiles, **kw),
                  functools.partial(reference.compressed_attention, causal=True, **kw),
                  (q, ck, cv), ("q", "ck", "cv"), jnp.float32, key, tol=TF32_TOLERANCE if ON_GPU else None,
                  case=f"{name} {case} {tiles}")


def test_mosaic_compressed_has_no_data_race():
    """The interpreter's race detector over the forward, dq and dk/dv kernels (CPU only: it
    watches the simulated shared memory)."""
    if ON_GPU:
        pytest.skip("the race detector is part of the CPU interpreter")
    import jax.experimental.pallas.mosaic_gpu as plgpu
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks

    case, tiles = CASES["g1_d32_mem2_chunks"]
    q, ck, cv, _ = inputs(case, jnp.float32, 3)
    f = functools.partial(compressed_attention_mosaic, num_mem=case.num_mem, stride=case.stride, scale=0.2,
                          tiles=tiles)
    with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams(detect_races=True)):
        out, vjp = jax.vjp(f, q[:1], ck[:1], cv[:1])
        grads = vjp(jnp.ones_like(out))
        jax.block_until_ready(grads)
        assert not gpu_callbacks.get_races().races_found


def test_compressed_attention_takes_mosaic_when_asked():
    """impl="mosaic" through `compressed_attention` is the Mosaic kernels (same numbers)."""
    case, _ = CASES["g2_seed"]
    q, ck, cv, _ = inputs(case, jnp.float32, 11)
    kw = dict(num_mem=case.num_mem, stride=case.stride)
    with precision():
        got = compressed_attention(q, ck, cv, causal=True, impl="mosaic", **kw)
        want = compressed_attention_mosaic(q, ck, cv, scale=case.dim_head**-0.5, **kw)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("change,reason", [
    (dict(causal=False), "non-causal"),
    (dict(dtype=jnp.bfloat16), "bfloat16"),
    (dict(dim_head=128), "head dim 128"),
    (dict(num_mem=0), "no memory entry"),
])
def test_mosaic_refuses_what_it_cannot_compute(change, reason):
    dtype = change.pop("dtype", jnp.float32)
    case = Case(64, 4, 2, change.pop("dim_head", 64), 16, change.pop("num_mem", 1), change.pop("causal", True))
    q, ck, cv, _ = inputs(case, dtype, 1)
    assert not mosaic_usable(q, ck, cv, num_mem=case.num_mem, causal=case.causal, packed=False), reason
    kw = dict(num_mem=case.num_mem, stride=case.stride, causal=case.causal)
    if case.num_mem == 0:  # causal without memory is the reference for every impl (documented fallback)
        np.testing.assert_array_equal(np.asarray(compressed_attention(q, ck, cv, impl="mosaic", **kw)),
                                      np.asarray(reference.compressed_attention(q, ck, cv, **kw)))
        return
    with pytest.raises(ValueError, match="Mosaic GPU compressed branch serves causal, unpacked float32"):
        compressed_attention(q, ck, cv, impl="mosaic", **kw)


def test_mosaic_refuses_packed_documents():
    from nsa_jax import segments as seg

    case = Case(64, 4, 2, 64, 16, 1, True)
    q, ck, cv, _ = inputs(case, jnp.float32, 2)
    segments = seg.from_ids(jnp.asarray(np.repeat([[1, 2]], 32, axis=1).repeat(2, axis=0)))
    assert not mosaic_usable(q, ck, cv, num_mem=1, causal=True, packed=True)
    with pytest.raises(ValueError, match="Mosaic GPU compressed branch"):
        compressed_attention(q, ck, cv, segments, num_mem=1, stride=16, causal=True, impl="mosaic")


def test_mosaic_is_chosen_only_where_it_measured_faster():
    """`impl="auto"`'s size rule (H200 timings in kernels.mosaic_compressed): enough compressed
    keys for one dk/dv program and enough query rows in the batch."""
    shape = lambda b, n, nk: (jnp.zeros((b, n, 8, 64)), jnp.zeros((b, nk, 4, 64)))  # noqa: E731
    assert mosaic_pays(*shape(1, 16384, 1025), 1)
    assert mosaic_pays(*shape(2, 2048, 129), 1)
    assert not mosaic_pays(*shape(1, 2048, 129), 1)  # 2048 rows
    assert not mosaic_pays(*shape(4, 1024, 65), 1)  # 64 keys
    assert not mosaic_pays(*shape(4, 512, 33), 1)  # the seed's B=4 T=512


@pytest.mark.parametrize("kw,message", [
    (dict(block_q=128), "block_q must be 64"),
    (dict(block_kv=48), "block_kv must be 32, 64, 96 or 128"),
    (dict(stages=1), "stages must be >= 2"),
    (dict(dkv_chunk=100), "dkv_chunk must be a positive multiple of 128"),
])
def test_mosaic_tiles_are_validated(kw, message):
    with pytest.raises(ValueError, match=message):
        MosaicTiles(**kw)

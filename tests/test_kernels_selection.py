"""Block selection without per-head compressed logits against the reference: the same valid
(block, probability) picks, the same blocks for rows with no valid pick where attention uses
them, and the same gradients of the probabilities in q and ck, under several kernel settings."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_testing import BOTH, F32_ONLY, assert_close, grid, loops_outside_kernels, randn, relative_error
from kernels import KernelSettings, get_backend
from kernels.selection import select_blocks
from kernels.settings import SelectionSettings
from nsa_jax import reference


class Case(NamedTuple):
    n: int
    heads: int
    kv_heads: int
    dim_head: int
    stride: int
    block: int  # selection block size
    num_selected: int
    causal: bool
    shared: bool
    interpolated: bool
    num_mem: int = 1
    sharpness: float = 1.0  # multiplies q and ck: logits sharpness**2 times as large


CASES = {
    "one_query": Case(1, 4, 2, 32, 4, 4, 2, True, True, False),
    "block_is_stride": Case(37, 4, 2, 32, 4, 4, 2, True, True, False),
    "per_head_two_mem": Case(100, 16, 1, 64, 4, 8, 3, True, False, False, num_mem=2),
    "interpolated_block6": Case(120, 4, 2, 32, 4, 6, 3, True, True, True),
    "interpolated_block_below_stride_noncausal": Case(77, 4, 2, 32, 4, 2, 2, False, True, True),
    "more_selected_than_blocks_noncausal": Case(64, 4, 4, 32, 4, 8, 16, False, True, False),
    "paper_like": Case(300, 32, 2, 128, 16, 64, 4, True, True, False),
    "seed_like": Case(200, 8, 4, 64, 16, 16, 4, True, True, False),
    "per_head_noncausal": Case(150, 8, 2, 64, 8, 8, 5, False, False, False),
    # one selection block, the own block of most queries: rows with no valid pick, whose
    # selected (invalid) blocks non-causal fine attention attends uniformly
    "own_block_only_noncausal": Case(8, 4, 2, 32, 2, 8, 2, False, True, False),
    "own_block_interpolated_noncausal": Case(10, 4, 2, 32, 4, 6, 2, False, False, True),
    "k32": Case(640, 4, 2, 32, 4, 4, 32, True, True, False),  # the most picks the issue asks for
    # logits 16x as large, the sharp selections of a trained model: a backward that recomputed
    # them from bf16 operands was off by 10% in dq against the forward's float32 lse (50% at 64x)
    "seed_like_sharp": Case(200, 8, 4, 64, 16, 16, 4, True, True, False, sharpness=4.0),
}
QUICK = {"seed_like": BOTH, "seed_like_sharp": BOTH, "interpolated_block6": F32_ONLY,
         "own_block_only_noncausal": F32_ONLY}


def valid_picks(values, indices) -> list[dict[int, float]]:
    values, indices = np.asarray(values, np.float64), np.asarray(indices)
    flat_v = values.reshape(int(np.prod(values.shape[:-1])), values.shape[-1])
    flat_i = indices.reshape(flat_v.shape)
    return [{int(i): float(p) for p, i in zip(pv, pi) if p > reference.SELECTION_THRESHOLD}
            for pv, pi in zip(flat_v, flat_i)]


def rows_without_valid_pick(values, indices) -> dict[int, list[int]]:
    """{row: its selected blocks, sorted} for the rows with no valid pick."""
    values, indices = np.asarray(values), np.asarray(indices)
    flat_v, flat_i = values.reshape(-1, values.shape[-1]), indices.reshape(-1, values.shape[-1])
    return {r: sorted(flat_i[r].tolist()) for r in range(flat_v.shape[0])
            if not np.any(flat_v[r] > reference.SELECTION_THRESHOLD)}


SETTINGS = {  # the defaults; small tiles (many chunks and query tiles, dbk splits); tall d(block keys) tiles
    "default": SelectionSettings(),
    "small_tiles": SelectionSettings(rows=16, block_keys=16, rows_dbk=16, block_keys_dbk=16, dbk_target_programs=64,
                                     min_dbk_tiles_per_split=1),
    "tall_dbk": SelectionSettings(rows=32, block_keys=32, rows_dbk=128, block_keys_dbk=32, num_warps_dbk=8),
    "xla": SelectionSettings(impl="xla"),  # no kernel: the reference in the inputs' dtype (float32 cases only)
    # the top-k kept per column lane; 16-block steps: several steps per 64-block chunk
    "lanes": SelectionSettings(top_k="lanes", lane_keys=16),
    "lanes_small": SelectionSettings(top_k="lanes", rows=16, block_keys=32, lane_keys=16, max_lane_picks=32),
}


def settings_grid() -> list:
    """Every case with the default settings (quick pairs as QUICK says); the other settings on every
    case in the slow tier, on the seed-like float32 case in the quick one."""
    params = []
    for tiles in SETTINGS:
        quick = QUICK if tiles in ("default", "lanes") else {} if tiles == "xla" else {"seed_like": F32_ONLY}
        params += [pytest.param(*p.values, tiles, id=f"{p.id}-{tiles}", marks=p.marks) for p in grid(CASES, quick)
                   if tiles != "xla" or (p.values[1] == jnp.float32 and p.id.split("-")[0] in QUICK)]
    return params


@pytest.mark.parametrize("case,dtype,tiles", settings_grid())
def test_select_blocks_kernel_matches_reference(case, dtype, tiles):
    keys = jax.random.split(jax.random.key(hash(case) % 2**31), 3)
    q = randn(keys[0], (2, case.n, case.heads, case.dim_head), dtype) * case.sharpness
    ck = randn(keys[1], (2, case.num_mem + case.n // case.stride, case.kv_heads, case.dim_head), dtype) * case.sharpness
    kw = dict(num_mem=case.num_mem, stride=case.stride, causal=case.causal, share_heads=case.shared,
              num_selected=case.num_selected, selection_block_size=case.block, interpolated=case.interpolated)
    kernel = functools.partial(select_blocks, settings=SETTINGS[tiles])
    values, indices = jax.jit(functools.partial(kernel, **kw))(q, ck)
    with jax.default_matmul_precision("highest"):
        ref_values, ref_indices = jax.jit(functools.partial(reference.select_blocks, **kw))(
            q.astype(jnp.float32), ck.astype(jnp.float32))
    assert values.shape == ref_values.shape and indices.shape == ref_indices.shape
    assert values.dtype == jnp.float32 and indices.dtype == jnp.int32
    got, want = valid_picks(values, indices), valid_picks(ref_values, ref_indices)
    assert [sorted(p) for p in got] == [sorted(p) for p in want], "different valid blocks"
    if not case.causal:  # non-causal fine attention attends a row's invalid picks when it has no valid one
        empty = rows_without_valid_pick(ref_values, ref_indices)
        assert rows_without_valid_pick(values, indices) == empty, "different blocks for rows with no valid pick"
        if case.n <= 10:
            assert empty, "the case meant to produce rows with no valid pick has none"
    if values.size == 0 or not any(want):
        return
    gp = np.array([p[i] for p in got for i in sorted(p)])
    wp = np.array([p[i] for p in want for i in sorted(p)])
    assert_close("selection", "probabilities", gp, wp, jnp.float32, case=str(case), tiles=tiles)

    # Gradient of a random functional of the valid probabilities (what diff top-k uses).
    weights = randn(keys[2], values.shape) * reference.valid_selection(ref_values)

    def loss(fn, q, ck):
        return jnp.sum(fn(q, ck, **kw)[0] * weights)

    grads = jax.jit(jax.grad(lambda q, ck: loss(kernel, q, ck), argnums=(0, 1)))(q, ck)
    with jax.default_matmul_precision("highest"):
        ref_grads = jax.jit(jax.grad(lambda q, ck: loss(reference.select_blocks, q, ck), argnums=(0, 1)))(
            q.astype(jnp.float32), ck.astype(jnp.float32))
    for name, g, r in zip(("q", "ck"), grads, ref_grads):
        assert g.dtype == dtype
        # Every matmul of the backward takes float32 operands (the bf16 gradient is float32's, rounded
        # once: test_bf16_inputs_get_the_float32_gradients_rounded_once).
        assert_close("selection", f"d{name}", g, r, jnp.float32 if dtype == jnp.float32 else dtype,
                     case=str(case), tiles=tiles)


def test_bf16_inputs_get_the_float32_gradients_rounded_once():
    """bf16 inputs: the kernel's gradients are those of the same values in float32, rounded to bf16.
    With dlogit^T q alone on bf16 operands (588df89), d(block keys) was off by 1.8x the rounding
    error here, and on the passkey task the bf16 seed model's gradient norm went above 100 in 19 of
    96 samples (up to 27,921), against 1 of 324 with float32 operands (H200, 2026-11-30)."""
    case = CASES["seed_like_sharp"]
    keys = jax.random.split(jax.random.key(7), 3)
    q = randn(keys[0], (2, case.n, case.heads, case.dim_head), jnp.bfloat16) * case.sharpness
    ck = randn(keys[1], (2, case.num_mem + case.n // case.stride, case.kv_heads, case.dim_head),
               jnp.bfloat16) * case.sharpness
    kw = dict(num_mem=case.num_mem, stride=case.stride, causal=case.causal, share_heads=case.shared,
              num_selected=case.num_selected, selection_block_size=case.block)
    values, _ = reference.select_blocks(q.astype(jnp.float32), ck.astype(jnp.float32), **kw)
    weights = randn(keys[2], values.shape) * reference.valid_selection(values)
    grad = jax.jit(jax.grad(lambda q, ck: jnp.sum(select_blocks(q, ck, **kw)[0] * weights), argnums=(0, 1)))
    for name, g16, g32 in zip(("dq", "dck"), grad(q, ck), grad(q.astype(jnp.float32), ck.astype(jnp.float32))):
        assert g16.dtype == jnp.bfloat16
        err = relative_error(g16, g32.astype(jnp.bfloat16), jnp.bfloat16)
        assert err <= 1e-3, f"{name}: bf16 inputs' gradient {err:.2g} from float32's rounded (bf16 operands inside?)"


def test_pallas_backend_serves_the_kernels():
    """The backend's functions are the kernels for the parallel forward (bound to the settings)
    and the reference for decoding (`q_positions`); one backend object per settings."""
    backend = get_backend("pallas")
    assert backend.name == "pallas" and get_backend("pallas") is backend
    assert get_backend("pallas", KernelSettings(sliding_impl="pallas")) is not backend
    q = randn(jax.random.key(0), (1, 12, 4, 16))
    ck = randn(jax.random.key(1), (1, 4, 2, 16))
    kw = dict(num_mem=1, stride=4, causal=True, share_heads=True, num_selected=2, selection_block_size=4)
    with jax.default_matmul_precision("highest"):
        ours = backend.select_blocks(q, ck, **kw)
        theirs = select_blocks(q, ck, **kw)
        decode = backend.select_blocks(q[:, -1:], ck, q_positions=jnp.array([11]), **kw)
        ref = reference.select_blocks(q[:, -1:], ck, q_positions=jnp.array([11]), **kw)
    for a, b in zip(ours + decode, theirs + ref):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("tiles", ["default", "lanes"])
@pytest.mark.parametrize("shared", [True, False])
def test_exact_ties_break_toward_the_lower_block_as_lax_top_k(shared, tiles):
    """Blocks with bitwise-equal logits (repeated compressed keys) are picked lower index first
    and listed in lax.top_k's order, so the kernel's picks equal the reference's exactly; only
    logits that differ by float rounding between the two can order differently, which is why
    the grid test above compares valid picks as sets."""
    # 24 blocks repeating every 4: equal blocks 16 apart share a column lane of the "lanes" top-k
    base = randn(jax.random.key(3), (1, 4, 2, 32))
    ck = jnp.concatenate([randn(jax.random.key(4), (1, 1, 2, 32)), jnp.tile(base, (1, 6, 1, 1))], axis=1)
    q = randn(jax.random.key(5), (1, 96, 4, 32))
    kw = dict(num_mem=1, stride=4, causal=True, share_heads=shared, num_selected=5, selection_block_size=4)
    with jax.default_matmul_precision("highest"):
        values, indices = jax.jit(functools.partial(select_blocks, settings=SETTINGS[tiles], **kw))(q, ck)
        ref_values, ref_indices = jax.jit(functools.partial(reference.select_blocks, **kw))(q, ck)
    valid = np.asarray(reference.valid_selection(ref_values))
    assert valid.sum() > 100, "too few valid picks to test ties"
    np.testing.assert_array_equal(np.asarray(reference.valid_selection(values)), valid)
    np.testing.assert_array_equal(np.asarray(indices)[valid], np.asarray(ref_indices)[valid])
    np.testing.assert_allclose(np.asarray(values)[valid], np.asarray(ref_values)[valid], rtol=1e-5)


@pytest.mark.slow  # the quick tier runs this path in tests/test_context.py's train step
@pytest.mark.parametrize("name,offset,tiles", [
    ("seed_like", 112, "small_tiles"), ("interpolated_block6", 48, "default"), ("block_is_stride", 20, "default"),
    ("per_head_two_mem", 64, "small_tiles"), ("seed_like", 0, "default")])
def test_sequence_shard_selects_as_its_rows_of_the_whole(name, offset, tiles):
    """Context parallelism: the queries of one sequence shard at positions offset + [0, m) (the
    offset traced), against the whole sequence's compressed keys, pick as the reference's
    queries at those positions, with the same gradients."""
    case = CASES[name]
    m = case.n - offset if offset else case.n // 2
    keys = jax.random.split(jax.random.key(7), 3)
    q = randn(keys[0], (2, m, case.heads, case.dim_head), jnp.float32)
    ck = randn(keys[1], (2, case.num_mem + case.n // case.stride, case.kv_heads, case.dim_head), jnp.float32)
    kw = dict(num_mem=case.num_mem, stride=case.stride, causal=case.causal, share_heads=case.shared,
              num_selected=case.num_selected, selection_block_size=case.block, interpolated=case.interpolated)
    shard = jax.jit(lambda q, ck, off: select_blocks(q, ck, q_offset=off, settings=SETTINGS[tiles], **kw))
    positions = offset + jnp.arange(m)
    ref = functools.partial(reference.select_blocks, q_positions=positions, **kw)
    values, indices = shard(q, ck, jnp.int32(offset))
    with jax.default_matmul_precision("highest"):
        ref_values, ref_indices = jax.jit(ref)(q, ck)
    got, want = valid_picks(values, indices), valid_picks(ref_values, ref_indices)
    assert [sorted(p) for p in got] == [sorted(p) for p in want], "different valid blocks"
    assert sum(map(len, want)) > m, "too few valid picks to test"
    gp = np.array([p[i] for p in got for i in sorted(p)])
    wp = np.array([p[i] for p in want for i in sorted(p)])
    assert_close("selection", "probabilities", gp, wp, jnp.float32, case=name)
    weights = randn(keys[2], values.shape) * reference.valid_selection(ref_values)
    grads = jax.jit(jax.grad(lambda q, ck: jnp.sum(shard(q, ck, jnp.int32(offset))[0] * weights), (0, 1)))(q, ck)
    with jax.default_matmul_precision("highest"):
        ref_grads = jax.jit(jax.grad(lambda q, ck: jnp.sum(ref(q, ck)[0] * weights), (0, 1)))(q, ck)
    for label, g, r in zip(("q", "ck"), grads, ref_grads):
        assert_close("selection", f"d{label}", g, r, jnp.float32, case=name)


def test_shard_offset_runs_no_while_loop():
    """A traced shard offset (context parallelism) needs the blocks visible at each query tile's end:
    an unrolled search, not a while loop of log2(blocks) steps per layer. Traced only."""
    q = jax.ShapeDtypeStruct((1, 256, 4, 16), jnp.float32)
    ck = jax.ShapeDtypeStruct((1, 1 + 256 // 16, 2, 16), jnp.float32)

    def fn(q, ck, off):
        return select_blocks(q, ck, q_offset=off, num_mem=1, stride=16, causal=True, share_heads=True,
                             num_selected=2, selection_block_size=16)

    jaxpr = jax.make_jaxpr(fn)(q, ck, jax.ShapeDtypeStruct((), jnp.int32)).jaxpr
    assert not loops_outside_kernels(jaxpr)
    assert "pallas_call" in str(jaxpr)

"""The causal compressed branch through Mosaic GPU: float32 operands as TF32 on Hopper's wgmma.

Why a second code generator: XLA's Triton pipeline rounds every float32 dot operand to TF32 in
registers and copies it back to shared memory on each loop step (BENCHMARKS.md, session 28), so
the Triton flash kernels run float32 at about 60-100 TFLOP/s. Mosaic GPU's warp-group MMA reads
float32 operands from shared memory as TF32 directly, with the loads done by TMA from a warpgroup
of their own. TF32 wgmma has two constraints that shape the kernels:
  - both operands come from shared memory, so P and dS are written there before their matmuls;
  - both are read along their contraction dimension, so the second matmul of each pair reads a
    transposed copy made by XLA: V^T (forward), K^T (dq), Q^T and dO^T (dk/dv).
The hardware truncates float32 to TF32 where Triton rounds; the error stays at TF32's level.

Semantics (`nsa_jax.reference.compressed_attention`, causal, unpacked): key j < num_mem always
visible; key j = num_mem + c to query t iff (c + 1) * stride <= t. Scope: float32, head dim a
multiple of 32 up to 64, num_mem >= 1, and a Hopper GPU outside `jax.default_matmul_precision(
"highest")` (TF32 is the only float32 mode of its MMA), or the Mosaic GPU interpreter on the CPU
(exact float32: how CI tests the kernels). `kernels.compressed_attention` takes the Triton kernels
otherwise.
"""

from __future__ import annotations

import functools

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax

from kernels._common import LOG2E, div_up, interpret_mode, pad_axis, round_up, softmax_delta
from kernels._flash import Visibility
from kernels.settings import MosaicTiles

# f32 tiles in shared memory: 128-byte swizzled rows of 32 elements (what wgmma reads).
_SMEM = (plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(128))
_COMPUTE_WGS = 2  # two compute warpgroups per program, plus one that only issues TMA loads
_DKV_KEYS = 64  # keys per compute warpgroup in the dk/dv kernel


def mosaic_usable(q: jax.Array, ck: jax.Array, cv: jax.Array, *, num_mem: int, causal: bool, packed: bool) -> bool:
    """Whether `compressed_attention_mosaic` can take this call (see the module docstring)."""
    d = q.shape[-1]
    tf32 = jax.config.jax_default_matmul_precision not in ("highest", "float32")
    return (causal and not packed and num_mem >= 1 and all(x.dtype == jnp.float32 for x in (q, ck, cv))
            and d % 32 == 0 and d <= 64 and (interpret_mode() or (hopper_gpu() and tf32)))


# Where `impl="auto"` takes these kernels: fwd+bwd GPU ms per layer, Triton -> Mosaic (H200, seed
# config, 2026-12-02): B x T = 4 x 512 0.033 -> 0.062, 1 x 1024 0.031 -> 0.056, 4 x 1024 0.065 -> 0.075,
# 1 x 2048 0.056 -> 0.065, 2 x 2048 0.090 -> 0.085, 4 x 2048 0.161 -> 0.128, 1 x 4096 0.131 -> 0.097,
# 1 x 8192 0.330 -> 0.206, 1 x 16384 0.94 -> 0.53. The dk/dv kernel needs keys (128 per program) and
# rows to fill the card.
MIN_KEYS = 128
MIN_ROWS = 4096


def mosaic_pays(q: jax.Array, ck: jax.Array, num_mem: int) -> bool:
    """Whether the Mosaic kernels measured faster than the Triton ones at this size (see above)."""
    return ck.shape[1] - num_mem >= MIN_KEYS and q.shape[0] * q.shape[1] >= MIN_ROWS


def hopper_gpu() -> bool:
    """Whether the default device is a Hopper GPU (compute capability 9.0: wgmma)."""
    return jax.default_backend() == "gpu" and getattr(jax.devices()[0], "compute_capability", "") == "9.0"


def _interpret():
    """The Mosaic GPU interpreter where there is no GPU (CPU CI), else compile."""
    return plgpu.InterpretGPUParams() if interpret_mode() else None


def _mma(a_smem, b_smem, shape, acc=None, interpret=None):
    """a @ b (+ acc) on the warpgroup's tensor cores, f32 accumulation. On the GPU an existing
    accumulator is updated in place; the interpreter has no `run_state`, so there it adds."""
    if acc is not None and interpret is None:
        def update(ref):
            plgpu.wgmma(ref, a_smem, b_smem)
        return pl.run_state(update)(plgpu.ACC.init(acc))

    def fresh(ref):
        plgpu.wgmma(ref, a_smem, b_smem)
        return ref[...]
    out = pl.run_scoped(fresh, plgpu.ACC(shape, jnp.float32))
    return out if acc is None else acc + out


def _iota(shape, dim, start):
    return start + plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)


class _Rows:
    """How a program's two compute warpgroups split the queries: with g = 2 they take the two
    heads of one kv head on the same rows (both read every K/V tile); otherwise consecutive
    row blocks of one head."""

    def __init__(self, h: int, kh: int, block_q: int):
        self.pair = h // kh == _COMPUTE_WGS
        self.rows = block_q if self.pair else _COMPUTE_WGS * block_q  # query rows per program
        self.grid_heads = kh if self.pair else h
        self.block_q, self.g = block_q, h // kh

    def place(self, wg):
        """(query head, kv head, first row) of compute warpgroup wg in this program."""
        head, qi = lax.axis_index("heads"), lax.axis_index("q_seq")
        if self.pair:
            return head * 2 + jnp.minimum(wg, 1), head, qi * self.rows
        return head, lax.div(head, jnp.int32(self.g)), qi * self.rows + jnp.minimum(wg, 1) * self.block_q


def _key_stream(streams, ready, free, *, bi, kvh, steps, stages: int, block_kv: int):
    """The memory warpgroup: TMA-load key tile s of every (ref, smem, transposed) stream (ref
    [b, nk, kh, d], or [b, kh, d, nk] if transposed) into slot s % stages, once the compute
    warpgroups released that slot; then wait for the last releases."""
    @pl.loop(0, steps)
    def _(s):
        slot = lax.rem(s, jnp.int32(stages))
        keys = pl.ds(s * block_kv, block_kv)
        for (ref, smem, transposed), rdy, fr in zip(streams, ready, free):
            @pl.when(s >= stages)
            def _():
                plgpu.barrier_wait(fr.at[slot])
            index = (bi, kvh, slice(None), keys) if transposed else (bi, keys, kvh)
            plgpu.copy_gmem_to_smem(ref.at[index], smem.at[slot], rdy.at[slot])

    @pl.loop(jnp.maximum(steps - stages, 0), steps)
    def _(s):
        for fr in free:
            plgpu.barrier_wait(fr.at[lax.rem(s, jnp.int32(stages))])


def _skip_tiles(first, steps, ready, free, stages: int):
    """A compute warpgroup's key tiles past its last visible one: wait and release them, so
    every barrier's phases are observed by everyone."""
    @pl.loop(first, steps)
    def _(s):
        slot = lax.rem(s, jnp.int32(stages))
        for rdy, fr in zip(ready, free):
            plgpu.barrier_wait(rdy.at[slot])
            plgpu.barrier_arrive(fr.at[slot])


class _KeyTiles:
    """The forward's and dq's key tiles, from `kernels._flash.Visibility` (the Triton kernels' rules)."""

    def __init__(self, vis: Visibility, block_kv: int):
        self.vis, self.block_kv = vis, block_kv
        self.padded = round_up(vis.num_keys, block_kv)

    def steps(self, t_last):
        """Key tiles the queries up to t_last visit."""
        return div_up(self.vis.key_range(t_last, t_last)[1], self.block_kv)

    def unmasked(self, t_first):
        """Leading tiles whose keys query t_first (hence every later one) sees."""
        return self.vis.unmasked_key_tiles(t_first, t_first, self.block_kv)[1]

    def visible(self, s, q0, block_q: int):
        """The [block_q, block_kv] mask of key tile s for queries q0..."""
        shape = (block_q, self.block_kv)
        return self.vis.mask(_iota(shape, 0, q0), _iota(shape, 1, s * self.block_kv))


def _query_block_program(rows: _Rows, keys: _KeyTiles, stages: int, streams, tile_bars, free_bars, compute):
    """The program of the forward and dq kernels: each compute warpgroup runs
    compute(bi, wg, head, q0, steps) over the key tiles its query block sees, then releases the
    tiles only the other one needs; the memory warpgroup streams the tiles of both."""
    bi, wg = lax.axis_index("batch"), lax.axis_index("wg")
    _, kvh, _ = rows.place(wg)
    block_steps = keys.steps(lax.axis_index("q_seq") * rows.rows + rows.rows - 1)

    @pl.when(wg < _COMPUTE_WGS)
    def _():
        plgpu.set_max_registers(232, action="increase")
        head, _, q0 = rows.place(wg)
        steps = keys.steps(q0 + rows.block_q - 1)
        compute(bi, wg, head, q0, steps)
        _skip_tiles(steps, block_steps, tile_bars, free_bars, stages)

    @pl.when(wg == _COMPUTE_WGS)
    def _():
        plgpu.set_max_registers(40, action="decrease")
        _key_stream(streams, tile_bars, free_bars, bi=bi, kvh=kvh, steps=block_steps, stages=stages,
                    block_kv=keys.block_kv)


def _forward(q, ck, cv, *, num_mem: int, stride: int, scale: float, tiles: MosaicTiles):
    """(o [b, n_pad, h, d], lse [b, h, n_pad]: base-2 log-sum-exp of the scaled logits)."""
    b, n_pad, h, d = q.shape
    kh = ck.shape[2]
    bq, bk, stages = tiles.block_q, tiles.block_kv, tiles.stages
    rows = _Rows(h, kh, bq)
    keys = _KeyTiles(_visibility(ck, num_mem, stride), bk)
    kp = pad_axis(ck, 1, keys.padded)
    vt = pad_axis(cv, 1, keys.padded).transpose(0, 2, 3, 1)  # [b, kh, d, nk_pad]
    qk_scale = scale * LOG2E
    interpret = _interpret()

    def kernel(q_ref, k_ref, vt_ref, o_ref, lse_ref, smem, tile_bars, free_bars, q_bar):
        q_smem2, k_smem, vt_smem, p_smem2, lse_smem2 = smem

        def compute(bi, wg, head, q0, steps):
            q_smem, p_smem, lse_smem = q_smem2.at[wg], p_smem2.at[wg], lse_smem2.at[wg]
            plgpu.copy_gmem_to_smem(q_ref.at[bi, pl.ds(q0, bq), head], q_smem, q_bar.at[wg])
            plgpu.barrier_wait(q_bar.at[wg])
            m = plgpu.layout_cast(jnp.full((bq,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
            l = plgpu.layout_cast(jnp.full((bq,), 0.0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
            acc = plgpu.layout_cast(jnp.full((bq, d), 0.0, jnp.float32), plgpu.Layout.WGMMA)

            def step(s, carry, masked: bool):
                acc, m, l = carry
                slot = lax.rem(s, jnp.int32(stages))
                plgpu.barrier_wait(tile_bars[0].at[slot])
                sc = _mma(q_smem, k_smem.at[slot].T, (bq, bk), interpret=interpret) * qk_scale
                plgpu.barrier_arrive(free_bars[0].at[slot])
                if masked:
                    sc = jnp.where(keys.visible(s, q0, bq), sc, -jnp.inf)
                m_new = jnp.maximum(m, sc.max(axis=1))
                alpha = jnp.exp2(m - m_new)
                p = jnp.exp2(sc - lax.broadcast_in_dim(m_new, sc.shape, [0]))
                l = l * alpha + p.sum(axis=1)
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                p_smem[...] = p
                plgpu.commit_smem()
                plgpu.barrier_wait(tile_bars[1].at[slot])
                acc = _mma(p_smem, vt_smem.at[slot].T, (bq, d), acc, interpret)
                plgpu.barrier_arrive(free_bars[1].at[slot])
                return acc, m_new, l

            full = keys.unmasked(q0)
            carry = lax.fori_loop(0, full, functools.partial(step, masked=False), (acc, m, l))
            acc, m, l = lax.fori_loop(full, steps, functools.partial(step, masked=True), carry)
            q_smem[...] = acc / lax.broadcast_in_dim(l, acc.shape, [0])
            lse_smem[...] = m + jnp.log2(l)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_smem, o_ref.at[bi, pl.ds(q0, bq), head])
            plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[bi, head, pl.ds(q0, bq)])
            plgpu.wait_smem_to_gmem(0)

        _query_block_program(rows, keys, stages, ((k_ref, k_smem, False), (vt_ref, vt_smem, True)), tile_bars,
                             free_bars, compute)

    scratch = (
        (plgpu.SMEM((_COMPUTE_WGS, bq, d), jnp.float32, transforms=_SMEM),
         plgpu.SMEM((stages, bk, d), jnp.float32, transforms=_SMEM),
         plgpu.SMEM((stages, d, bk), jnp.float32, transforms=_SMEM),
         plgpu.SMEM((_COMPUTE_WGS, bq, bk), jnp.float32, transforms=_SMEM),
         plgpu.SMEM((_COMPUTE_WGS, bq), jnp.float32)),
        (plgpu.Barrier(num_barriers=stages),) * 2,
        (plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=stages),) * 2,
        plgpu.Barrier(num_barriers=_COMPUTE_WGS),
    )
    out_type = (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct((b, h, n_pad), jnp.float32))
    return plgpu.kernel(
        kernel, out_type=out_type, scratch_types=scratch, grid=(rows.grid_heads, n_pad // rows.rows, b),
        grid_names=("heads", "q_seq", "batch"), num_threads=_COMPUTE_WGS + 1, thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True), interpret=interpret,
        kernel_name="nsa_mosaic_compressed_fwd",
    )(q, kp, vt)


def _dq(q, ck, cv, do, lse, delta, *, num_mem: int, stride: int, scale: float, tiles: MosaicTiles):
    """dq [b, n_pad, h, d]: per query block, the key tiles it sees; K, K^T and V streamed."""
    b, n_pad, h, d = q.shape
    kh = ck.shape[2]
    bq, bk, stages = tiles.block_q, tiles.block_kv, tiles.stages
    rows = _Rows(h, kh, bq)
    keys = _KeyTiles(_visibility(ck, num_mem, stride), bk)
    kp, vp = pad_axis(ck, 1, keys.padded), pad_axis(cv, 1, keys.padded)
    kt = kp.transpose(0, 2, 3, 1)  # [b, kh, d, nk_pad]
    qk_scale = scale * LOG2E
    interpret = _interpret()

    def kernel(q_ref, do_ref, lse_ref, delta_ref, k_ref, kt_ref, v_ref, dq_ref, smem, tile_bars, free_bars, row_bars):
        q_smem2, do_smem2, ds_smem2, lse_smem2, delta_smem2, k_smem, kt_smem, v_smem = smem

        def compute(bi, wg, head, q0, steps):
            q_smem, do_smem, ds_smem = q_smem2.at[wg], do_smem2.at[wg], ds_smem2.at[wg]
            span = pl.ds(q0, bq)
            for i, (src, dst) in enumerate(((q_ref.at[bi, span, head], q_smem), (do_ref.at[bi, span, head], do_smem),
                                            (lse_ref.at[bi, head, span], lse_smem2.at[wg]),
                                            (delta_ref.at[bi, head, span], delta_smem2.at[wg]))):
                plgpu.copy_gmem_to_smem(src, dst, row_bars.at[wg * 4 + i])
            for i in range(4):
                plgpu.barrier_wait(row_bars.at[wg * 4 + i])
            lse = plgpu.load(lse_smem2.at[wg], layout=plgpu.Layout.WGMMA.reduce(1))
            delta = plgpu.load(delta_smem2.at[wg], layout=plgpu.Layout.WGMMA.reduce(1))
            acc = plgpu.layout_cast(jnp.full((bq, d), 0.0, jnp.float32), plgpu.Layout.WGMMA)

            def step(s, acc):  # every tile masked: an unmasked fast path as in the forward is untimed
                slot = lax.rem(s, jnp.int32(stages))
                plgpu.barrier_wait(tile_bars[0].at[slot])
                sc = _mma(q_smem, k_smem.at[slot].T, (bq, bk), interpret=interpret)
                plgpu.barrier_arrive(free_bars[0].at[slot])
                p = jnp.exp2(sc * qk_scale - lax.broadcast_in_dim(lse, sc.shape, [0]))
                p = jnp.where(keys.visible(s, q0, bq), p, 0.0)
                plgpu.barrier_wait(tile_bars[2].at[slot])
                dp = _mma(do_smem, v_smem.at[slot].T, (bq, bk), interpret=interpret)
                plgpu.barrier_arrive(free_bars[2].at[slot])
                ds_smem[...] = p * (dp - lax.broadcast_in_dim(delta, dp.shape, [0]))
                plgpu.commit_smem()
                plgpu.barrier_wait(tile_bars[1].at[slot])
                acc = _mma(ds_smem, kt_smem.at[slot].T, (bq, d), acc, interpret)
                plgpu.barrier_arrive(free_bars[1].at[slot])
                return acc

            acc = lax.fori_loop(0, steps, step, acc)
            q_smem[...] = acc * scale
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[bi, span, head])
            plgpu.wait_smem_to_gmem(0)

        streams = ((k_ref, k_smem, False), (kt_ref, kt_smem, True), (v_ref, v_smem, False))
        _query_block_program(rows, keys, stages, streams, tile_bars, free_bars, compute)

    per_wg = lambda *shape: plgpu.SMEM((_COMPUTE_WGS, *shape), jnp.float32, transforms=_SMEM)  # noqa: E731
    slots = lambda *shape: plgpu.SMEM((stages, *shape), jnp.float32, transforms=_SMEM)  # noqa: E731
    scratch = (
        (per_wg(bq, d), per_wg(bq, d), per_wg(bq, bk), plgpu.SMEM((_COMPUTE_WGS, bq), jnp.float32),
         plgpu.SMEM((_COMPUTE_WGS, bq), jnp.float32), slots(bk, d), slots(d, bk), slots(bk, d)),
        (plgpu.Barrier(num_barriers=stages),) * 3,
        (plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=stages),) * 3,
        plgpu.Barrier(num_barriers=4 * _COMPUTE_WGS),
    )
    return plgpu.kernel(
        kernel, out_type=jax.ShapeDtypeStruct(q.shape, jnp.float32), scratch_types=scratch,
        grid=(rows.grid_heads, n_pad // rows.rows, b), grid_names=("heads", "q_seq", "batch"),
        num_threads=_COMPUTE_WGS + 1, thread_name="wg", compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret, kernel_name="nsa_mosaic_compressed_dq",
    )(q, do, lse, delta, kp, kt, vp)


def _dkdv(q, ck, cv, do, lse, delta, *, num_mem: int, stride: int, scale: float, chunk: int, tiles: MosaicTiles):
    """dk, dv [b, nk, kh, d]: one program per (kv head, 2 x 64 keys, chunk of queries).

    The two compute warpgroups take 64 keys each and share one pipeline over the chunk's (query
    tile, head of the group) steps: q, dO and their transposes (dK = dS^T Q and dV = P^T dO contract
    over queries), lse and delta. Chunks before a key block's first query are skipped; the
    others' partial sums are added here."""
    b, n_pad, h, d = q.shape
    nk, kh = ck.shape[1], ck.shape[2]
    g = h // kh
    bq, stages, bk = tiles.block_q, tiles.stages, _DKV_KEYS
    kblock = _COMPUTE_WGS * bk
    nkp = round_up(nk, kblock)
    n_chunks, tiles_per_chunk = n_pad // chunk, chunk // bq
    kp, vp = pad_axis(ck, 1, nkp), pad_axis(cv, 1, nkp)
    qt, dot = q.transpose(0, 2, 3, 1), do.transpose(0, 2, 3, 1)  # [b, h, d, n_pad]
    qk_scale = scale * LOG2E
    interpret = _interpret()

    vis = _visibility(ck, num_mem, stride)

    def kernel(q_ref, qt_ref, do_ref, dot_ref, lse_ref, delta_ref, k_ref, v_ref, dk_ref, dv_ref, smem, kv_bar):
        k_smem2, v_smem2, p_smem2 = smem
        bh, kb, c, wg = (lax.axis_index(a) for a in ("bkv", "kblock", "chunk", "wg"))
        bi, kvh = lax.div(bh, jnp.int32(kh)), lax.rem(bh, jnp.int32(kh))
        heads = pl.ds(kvh * g, g)

        def compute_context(pipeline):
            k_smem, v_smem = k_smem2.at[wg], v_smem2.at[wg]
            k0 = kb * kblock + wg * bk
            for src, dst in ((k_ref, k_smem), (v_ref, v_smem)):
                plgpu.copy_gmem_to_smem(src.at[bi, pl.ds(k0, bk), kvh], dst, kv_bar.at[wg])
                plgpu.barrier_wait(kv_bar.at[wg])
            zero = plgpu.layout_cast(jnp.full((bk, d), 0.0, jnp.float32), plgpu.Layout.WGMMA)
            dk, dv = pipeline((zero, zero))
            k_smem[...] = dk * scale
            v_smem[...] = dv
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[c, bi, pl.ds(k0, bk), kvh])
            plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[c, bi, pl.ds(k0, bk), kvh])
            plgpu.wait_smem_to_gmem(0)

        def body(idx, q_s, qt_s, do_s, dot_s, lse_s, delta_s, q_c, qt_c, do_c, dot_c, lse_c, delta_c, carry):
            dk, dv = carry
            k_smem, v_smem, p_smem = k_smem2.at[wg], v_smem2.at[wg], p_smem2.at[wg]
            t0 = c * chunk + idx[0] * bq
            st = _mma(k_smem, q_s.T, (bk, bq), interpret=interpret)  # S^T [keys, queries]
            plgpu.barrier_arrive(q_c)
            lse = plgpu.load(lse_s, layout=plgpu.Layout.WGMMA.reduce(0))
            plgpu.barrier_arrive(lse_c)
            pt = jnp.exp2(st * qk_scale - lax.broadcast_in_dim(lse, st.shape, [1]))
            pt = jnp.where(vis.mask(_iota((bk, bq), 1, t0), _iota((bk, bq), 0, kb * kblock + wg * bk)), pt, 0.0)
            dpt = _mma(v_smem, do_s.T, (bk, bq), interpret=interpret)
            plgpu.barrier_arrive(do_c)
            delta = plgpu.load(delta_s, layout=plgpu.Layout.WGMMA.reduce(0))
            plgpu.barrier_arrive(delta_c)
            dst = pt * (dpt - lax.broadcast_in_dim(delta, st.shape, [1]))
            p_smem[...] = pt
            plgpu.commit_smem()
            dv = _mma(p_smem, dot_s.T, (bk, d), dv, interpret)
            plgpu.barrier_arrive(dot_c)
            p_smem[...] = dst
            plgpu.commit_smem()
            dk = _mma(p_smem, qt_s.T, (bk, d), dk, interpret)
            plgpu.barrier_arrive(qt_c)
            return dk, dv

        sq = pl.Squeezed()
        row = lambda i, hh: (c * tiles_per_chunk + i, hh, 0)  # noqa: E731
        col = lambda i, hh: (hh, 0, c * tiles_per_chunk + i)  # noqa: E731
        vec = lambda i, hh: (hh, c * tiles_per_chunk + i)  # noqa: E731
        pipeline = plgpu.emit_pipeline_warp_specialized(
            body, grid=(tiles_per_chunk, g), memory_registers=40, max_concurrent_steps=stages, wg_axis="wg",
            num_compute_wgs=_COMPUTE_WGS, manual_consumed_barriers=True, compute_context=compute_context,
            in_specs=[plgpu.BlockSpec((bq, sq, d), row, transforms=_SMEM),
                      plgpu.BlockSpec((sq, d, bq), col, transforms=_SMEM),
                      plgpu.BlockSpec((bq, sq, d), row, transforms=_SMEM),
                      plgpu.BlockSpec((sq, d, bq), col, transforms=_SMEM),
                      plgpu.BlockSpec((sq, bq), vec),
                      plgpu.BlockSpec((sq, bq), vec)])

        @pl.when((c + 1) * chunk > vis.query_range(kb * kblock, kb * kblock + kblock - 1, n_pad)[0])
        def _():
            pipeline(q_ref.at[bi, :, heads], qt_ref.at[bi, heads], do_ref.at[bi, :, heads], dot_ref.at[bi, heads],
                     lse_ref.at[bi, heads], delta_ref.at[bi, heads])

    scratch = ((plgpu.SMEM((_COMPUTE_WGS, bk, d), jnp.float32, transforms=_SMEM),
                plgpu.SMEM((_COMPUTE_WGS, bk, d), jnp.float32, transforms=_SMEM),
                plgpu.SMEM((_COMPUTE_WGS, bk, bq), jnp.float32, transforms=_SMEM)),
               plgpu.Barrier(num_barriers=_COMPUTE_WGS))
    part = jax.ShapeDtypeStruct((n_chunks, b, nkp, kh, d), jnp.float32)
    dk_p, dv_p = plgpu.kernel(
        kernel, out_type=(part, part), scratch_types=scratch, grid=(b * kh, nkp // kblock, n_chunks),
        grid_names=("bkv", "kblock", "chunk"), num_threads=_COMPUTE_WGS + 1, thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True), interpret=interpret,
        kernel_name="nsa_mosaic_compressed_dkdv",
    )(q, qt, do, dot, lse, delta, kp, vp)
    # Skipped programs never write their partial sums: select, do not multiply (garbage may be NaN).
    blocks = jnp.arange(0, nkp, kblock)
    first = vis.query_range(blocks, blocks + kblock - 1, n_pad)[0]  # [key blocks]
    ran = jnp.repeat(jnp.arange(1, n_chunks + 1)[:, None] * chunk > first[None], kblock, axis=1)  # [chunks, nkp]
    ran = ran[:, None, :, None, None]
    return tuple(jnp.where(ran, x, 0.0).sum(0)[:, :nk] for x in (dk_p, dv_p))


def _visibility(ck: jax.Array, num_mem: int, stride: int) -> Visibility:
    return Visibility("compressed", causal=True, num_keys=ck.shape[1], num_mem=num_mem, stride=stride)


def compressed_attention_mosaic(
    q: jax.Array,  # [b, n, h, d] float32
    ck: jax.Array,  # [b, num_mem + nc, kh, d]
    cv: jax.Array,  # [b, num_mem + nc, kh, d]
    *,
    num_mem: int,
    stride: int,
    scale: float,
    tiles: MosaicTiles = MosaicTiles(),
) -> jax.Array:  # [b, n, h, d]
    """Causal compressed-branch attention (see the module docstring), differentiable."""
    return _attention(q, ck, cv, num_mem, stride, float(scale), tiles)


def _padding(n: int, h: int, kh: int, tiles: MosaicTiles) -> tuple[int, int]:
    """(padded length, dk/dv chunk): the chunk divides the padded length, a multiple of the rows."""
    rows = _Rows(h, kh, tiles.block_q).rows
    chunk = min(tiles.dkv_chunk, round_up(n, max(rows, tiles.block_q * _COMPUTE_WGS)))
    return round_up(n, chunk), chunk


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _attention(q, ck, cv, num_mem, stride, scale, tiles):
    return _attention_fwd(q, ck, cv, num_mem, stride, scale, tiles)[0]


def _attention_fwd(q, ck, cv, num_mem, stride, scale, tiles):
    n = q.shape[1]
    n_pad, _ = _padding(n, q.shape[2], ck.shape[2], tiles)
    o, lse = _forward(pad_axis(q, 1, n_pad), ck, cv, num_mem=num_mem, stride=stride, scale=scale, tiles=tiles)
    return o[:, :n], (q, ck, cv, o, lse)


def _attention_bwd(num_mem, stride, scale, tiles, res, do):
    q, ck, cv, o, lse = res
    n = q.shape[1]
    n_pad, chunk = _padding(n, q.shape[2], ck.shape[2], tiles)
    qp, dop = pad_axis(q, 1, n_pad), pad_axis(do.astype(jnp.float32), 1, n_pad)
    delta = softmax_delta(o, dop).transpose(0, 2, 1)  # [b, h, n_pad]: rowsum(o * dO) in float32; 0 on padding
    kw = dict(num_mem=num_mem, stride=stride, scale=scale, tiles=tiles)
    dq = _dq(qp, ck, cv, dop, lse, delta, **kw)[:, :n]
    dk, dv = _dkdv(qp, ck, cv, dop, lse, delta, chunk=chunk, **kw)
    return dq, dk, dv


_attention.defvjp(_attention_fwd, _attention_bwd)

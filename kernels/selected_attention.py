"""Selected (fine) attention: the entry point, which lays the inputs out for a kernel family.

Each query attends to the keys of its valid selected blocks (their logits multiplied by
the diff-top-k gate) plus, when causal, its own block up to itself (non-causal with no
selectable block, k' = 0: its whole own block, zero padding included), exactly as
`nsa_jax.reference.selected_attention`.

Two kernel families compute it (`SelectedSettings.impl`; both measured on an H100 in
BENCHMARKS.md, "Kernel settings"):
- `kernels.selected_query`: one program per query and selection group; the choice for
  groups of >= 16 rows (the paper's 16 query heads per kv head), where a group fills the
  matrix unit by itself.
- `kernels.selected_tiled`: one program per tile of queries walking the union of their
  blocks; the choice for smaller groups (the seed model's 2 heads per kv head).
Both compute dk/dv without atomics, deterministically.

Reference quirk reproduced: non-causal, k' > 0, a query group with no valid block attends
uniformly to the tokens of all its selected blocks.

Packed documents (`segments`): both families take the picks as block slots with a table of
their first tokens, and the documents' bounds for the own block (`kernels._selected_common`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from kernels._common import F32, MIN_DOT, cdiv, in_xla, next_pow2, pad_axis
from kernels._selected_common import Packed, packed_inputs, slot_indices
from kernels.selected_query import QueryConfig, query_selected
from kernels.selected_tiled import tiled_selected_attention
from kernels.settings import SelectedSettings, query_dkv_splits
from nsa_jax import reference
from nsa_jax import segments as seg


class Layout(NamedTuple):
    """How one call is laid out (static): the kernel family and the padded sizes."""

    impl: str  # "query" or "tiled"
    rows: int  # rows of a selection group: g heads (padded to a power of two) when shared, else 1
    groups_per_kv: int  # selection groups per kv head: 1 when shared, else g
    d_pad: int  # head dimension padded to a power of two >= MIN_DOT
    sbp: int  # keys loaded per block: a power of two >= the block (>= MIN_DOT on the matrix-unit paths)
    nb: int  # key blocks
    kp: int  # k' padded to a power of two
    dkv_splits: int  # per-query dk/dv: programs sharing one key block's query list


def layout(q_shape, k_shape, indices_shape, *, block_size: int, settings: SelectedSettings) -> Layout:
    """The layout of a call with these shapes (q [b, nq, h, d], k [b, nk, kh, d], indices [b, nq, sh, k'])."""
    _, nq, h, d = q_shape
    nk, kh = k_shape[1], k_shape[2]
    sh, num_sel = indices_shape[2], indices_shape[3]
    g = h // kh
    shared = sh == kh
    rows = next_pow2(g) if shared else 1
    upk = 1 if shared else g
    impl = settings.impl if settings.impl != "auto" else ("tiled" if rows < MIN_DOT else "query")
    sbp = next_pow2(block_size)
    if rows >= MIN_DOT or impl == "tiled":  # matrix-unit tiles: every dimension >= MIN_DOT
        sbp = max(sbp, MIN_DOT)
    nb = cdiv(nk, block_size)
    dkv_splits = query_dkv_splits(settings, nq, num_sel, upk, nb)
    return Layout(impl=impl, rows=rows, groups_per_kv=upk, d_pad=max(MIN_DOT, next_pow2(d)), sbp=sbp, nb=nb,
                  kp=next_pow2(max(num_sel, 1)), dkv_splits=dkv_splits)


def selected_attention(
    q: jax.Array,  # [b, nq, h, d], rotated
    k: jax.Array,  # [b, nk, kh, d], rotated
    v: jax.Array,  # [b, nk, kh, d]
    indices: jax.Array,  # [b, nq, sh, k'] selected block indices (sh = kh or h)
    valid: jax.Array,  # [b, nq, sh, k'] bool
    gates: jax.Array | None,  # [b, nq, sh, k'] multiplies the selected keys, or None
    segments: seg.Segments | None = None,  # packed documents (indices local to each document)
    *,
    block_size: int,
    causal: bool,
    scale: float | None = None,
    settings: SelectedSettings = SelectedSettings(),
) -> jax.Array:  # [b, nq, h, d]
    """`nsa_jax.reference.selected_attention` for the parallel forward (no `q_positions`).

    The tiled family needs the valid indices of a query to be distinct, as top-k gives them.
    With `segments`, indices are blocks of the query's document (NO_PICK = -1 past its k'), as
    `select_blocks` gives them with segments.
    """
    if settings.impl == "xla":
        return in_xla(lambda q, k, v, indices, valid, gates, segments: reference.selected_attention(
            q, k, v, indices, valid, gates, block_size=block_size, causal=causal, scale=scale, segments=segments),
            q, k, v, indices, valid, gates, segments)
    lay = layout(q.shape, k.shape, indices.shape, block_size=block_size, settings=settings)
    packed = None
    if segments is not None:
        packed = packed_inputs(segments, sb=block_size, sbp=lay.sbp, nb=lay.nb, nk_alloc=packed_keys(lay, block_size),
                               causal=causal)
        indices = slot_indices(indices, segments, block_size)
    return run_kernels(q, k, v, indices, valid, gates, packed, block_size=block_size, causal=causal, scale=scale,
                       settings=settings)


def packed_keys(lay: Layout, block_size: int) -> int:
    """Keys allocated when blocks are slots that start anywhere: every [token, + sbp) load in bounds."""
    return lay.nb * block_size + lay.sbp


def run_kernels(q, k, v, indices, valid, gates, packed: Packed | None, *, block_size: int, causal: bool,
                scale: float | None, settings: SelectedSettings) -> jax.Array:
    """`selected_attention` with its inputs laid out: unpacked, or packed (indices are block
    slots, `packed` their table and the queries' bounds, sized by `packed_keys`)."""
    b, nq, h, d = q.shape
    kh = k.shape[2]
    g = h // kh
    sh, num_sel = indices.shape[2], indices.shape[3]
    lay = layout(q.shape, k.shape, indices.shape, block_size=block_size, settings=settings)
    scale = float(d**-0.5 if scale is None else scale)
    dtype = jnp.result_type(q, k, v)

    # [b, nq, h, d] -> [b, nq, groups, rows, d_pad]; shared groups padded to a power of two.
    qg = q.astype(dtype).reshape(b, nq, kh, g, d)
    qg = pad_axis(pad_axis(qg, 4, lay.d_pad), 3, lay.rows * lay.groups_per_kv).reshape(b, nq, sh, lay.rows, lay.d_pad)
    # every [blk * sb, + sbp) load in bounds
    nk_alloc = packed_keys(lay, block_size) if packed is not None else lay.nb * block_size + (lay.sbp - block_size)
    kp_, vp_ = (pad_axis(pad_axis(x.astype(dtype), 3, lay.d_pad), 1, nk_alloc) for x in (k, v))
    if num_sel == 0:
        idx = jnp.zeros((b, nq, sh, lay.kp), jnp.int32)
        val = jnp.zeros((b, nq, sh, lay.kp), jnp.int32)
        gate = jnp.ones((b, nq, sh, lay.kp), F32)
    else:
        idx = pad_axis(indices.astype(jnp.int32), 3, lay.kp)
        val = pad_axis(valid.astype(jnp.int32), 3, lay.kp)
        gate = jnp.ones(indices.shape, F32) if gates is None else gates.astype(F32)
        gate = jnp.concatenate([gate, jnp.ones((b, nq, sh, lay.kp - num_sel), F32)], axis=-1)
    gate_grad = gates is not None and num_sel > 0  # else the gates are constant ones: no dgate work
    if lay.impl == "tiled":
        o = tiled_selected_attention(qg, kp_, vp_, idx, val, gate, packed, sb=block_size, sbp=lay.sbp, nb=lay.nb,
                                     num_sel=num_sel, kp=lay.kp, upk=lay.groups_per_kv, causal=causal, scale=scale,
                                     settings=settings, gate_grad=gate_grad)
    else:
        cfg = QueryConfig.from_settings(settings, packed=packed is not None, sb=block_size, sbp=lay.sbp, nb=lay.nb,
                                        nq=nq, num_sel=num_sel, kp=lay.kp, rows=lay.rows,
                                        groups_per_kv=lay.groups_per_kv, causal=causal, scale=scale,
                                        gate_grad=gate_grad)
        o = query_selected(cfg, qg, kp_, vp_, idx, val, gate, packed)  # [b, nq, sh, rows, d_pad]
    o = o.reshape(b, nq, kh, lay.groups_per_kv * lay.rows, lay.d_pad)[:, :, :, :g, :d]
    return o.reshape(b, nq, h, d).astype(q.dtype)

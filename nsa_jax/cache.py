"""Fixed-shape per-layer KV caches for jitted generation, and the one-query reads over them.

Every array has its final size from the start (max length L = the `seq_len` of `sample`), so
one compiled decode step serves every position: positions not yet written hold zeros and
are excluded by the same causal masks as in the parallel forward. The position (`length`)
is a traced int32 scalar.

The reads here (`selected_attention_one`, `sliding_window_one`, `dense_attention_one`) are
the decode-time counterparts of `nsa_jax.reference`: one query at position t, touching only
the selected blocks, the own block and the last w + 1 keys instead of the whole cache. They
compute the same softmax over the same keys (masked keys get probability exactly 0 in both),
so they agree with the reference to float rounding; tests/test_sampling.py checks it.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from nsa_jax import reference
from nsa_jax.numerics import F32, round_up


class SparseCache(NamedTuple):
    """One SparseAttention layer's cache after `length` tokens.

    k, v hold Lp = L rounded up to a selection block (so blocks can be gathered by reshape);
    ck, cv hold L // stride entries, the number the parallel forward over L tokens has.
    The tail holds the un-rotated k/v of positions length - cb .. length - 1 (zeros before
    position 0, as the compression windows' left padding), i.e. the next window to compress.
    """

    k: jax.Array  # [b, Lp, kh, d] rotated keys
    v: jax.Array  # [b, Lp, kh, d]
    ck: jax.Array  # [b, L // stride, kh, d] compressed keys, without the memory entries
    cv: jax.Array  # [b, L // stride, kh, d]
    tail_k: jax.Array  # [b, cb, kh, d] un-rotated
    tail_v: jax.Array  # [b, cb, kh, d]
    length: jax.Array  # int32 []: tokens written = position of the next token


class DenseCache(NamedTuple):
    """One dense Attention layer's cache: rotated keys and values of positions < length."""

    k: jax.Array  # [b, L, kh, d]
    v: jax.Array  # [b, L, kh, d]
    length: jax.Array  # int32 []


def sparse_cache_from_prompt(
    k_rot: jax.Array,  # [b, P, kh, d]
    v: jax.Array,  # [b, P, kh, d]
    k: jax.Array,  # [b, P, kh, d] un-rotated
    ck: jax.Array,  # [b, P // stride, kh, d]
    cv: jax.Array,
    *,
    max_len: int,
    stride: int,
    compress_block_size: int,
    selection_block_size: int,
) -> SparseCache:
    """Place a prompt's keys, values and compressed entries into caches of length max_len."""
    b, p, kh, d = k.shape
    if p > max_len:
        raise ValueError(f"prompt length ({p}) exceeds the cache length ({max_len})")
    lp = round_up(max_len, selection_block_size)
    pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0)))
    cb = compress_block_size
    # the last cb un-rotated tokens, zeros before position 0
    tail = lambda x: pad(x[:, ::-1][:, :cb], cb)[:, ::-1]
    return SparseCache(
        k=pad(k_rot, lp), v=pad(v, lp), ck=pad(ck, max_len // stride), cv=pad(cv, max_len // stride),
        tail_k=tail(k), tail_v=tail(v), length=jnp.asarray(p, jnp.int32))


def dense_cache_from_prompt(k_rot: jax.Array, v: jax.Array, *, max_len: int) -> DenseCache:
    """[b, P, kh, d] rotated keys and values -> a DenseCache of length max_len."""
    p = k_rot.shape[1]
    if p > max_len:
        raise ValueError(f"prompt length ({p}) exceeds the cache length ({max_len})")
    pad = lambda x: jnp.pad(x, ((0, 0), (0, max_len - p), (0, 0), (0, 0)))
    return DenseCache(pad(k_rot), pad(v), jnp.asarray(p, jnp.int32))


def write_at(buffer: jax.Array, x: jax.Array, position: jax.Array) -> jax.Array:
    """buffer [b, L, ...] with x [b, 1, ...] written at `position` along axis 1."""
    return jax.lax.dynamic_update_slice_in_dim(buffer, x.astype(buffer.dtype), position, axis=1)


def push_tail(tail: jax.Array, x: jax.Array) -> jax.Array:
    """Shift the running tail [b, cb, ..] left by one token and append x [b, 1, ..]."""
    return jnp.concatenate([tail[:, 1:], x.astype(tail.dtype)], axis=1)


# --------------------------------------------------------------------------------------
# one-query reads


def selected_attention_one(
    q: jax.Array,  # [b, 1, h, d], rotated
    k: jax.Array,  # [b, Lp, kh, d], rotated; Lp a multiple of block_size
    v: jax.Array,  # [b, Lp, kh, d]
    indices: jax.Array,  # [b, 1, sh, k'] selected blocks (sh = kh, or h when heads select separately)
    valid: jax.Array,  # [b, 1, sh, k'] bool
    gates: jax.Array | None,  # [b, 1, sh, k'] multiplies the selected keys' logits, or None
    position: jax.Array,  # int32 []: the query's position t
    *,
    block_size: int,
    scale: float,
) -> jax.Array:  # [b, 1, h, d]
    """Causal fine attention of one query: its valid selected blocks plus its own block up to t.

    Gathers k' + 1 blocks instead of masking all Lp keys (`reference.selected_attention`).
    A valid block is never the own block nor a future one (their probability is 0), so the
    two key sets are disjoint, as the reference's union of masks.
    """
    b, _, h, d = q.shape
    lp, kh = k.shape[1], k.shape[2]
    g = h // kh
    sh, num_sel = indices.shape[2], indices.shape[3]
    sb = block_size
    kv_head = jnp.arange(sh) if sh == kh else jnp.arange(sh) // g  # [sh] kv head of each selecting head
    qs = q.reshape(b, sh, h // sh, d)  # [b, sh, gq, d]; query head s * gq + j

    own_start = (position // sb) * sb
    own = lambda x: jax.lax.dynamic_slice_in_dim(x, own_start, sb, axis=1)[:, :, kv_head].transpose(0, 2, 1, 3)
    keys, values = own(k), own(v)  # [b, sh, sb, d]
    mask = jnp.broadcast_to(own_start + jnp.arange(sb) <= position, (b, sh, sb))
    gate = None
    if num_sel > 0:
        bi = jnp.arange(b)[:, None, None]
        idx = indices[:, 0]  # [b, sh, k']
        gather = lambda x: x.reshape(b, lp // sb, sb, kh, d)[bi, idx, :, kv_head[None, :, None], :]
        sel_k, sel_v = gather(k), gather(v)  # [b, sh, k', sb, d]
        keys = jnp.concatenate([sel_k.reshape(b, sh, num_sel * sb, d), keys], axis=2)
        values = jnp.concatenate([sel_v.reshape(b, sh, num_sel * sb, d), values], axis=2)
        sel_valid = valid[:, 0]  # [b, sh, k']
        mask = jnp.concatenate([jnp.repeat(sel_valid, sb, axis=-1), mask], axis=-1)
        if gates is not None:  # as the reference: 1 + (gate - 1) on valid selected blocks, 1 elsewhere
            per_block = 1.0 + jnp.where(sel_valid, gates[:, 0].astype(F32) - 1.0, 0.0)
            gate = jnp.concatenate([jnp.repeat(per_block, sb, axis=-1), jnp.ones((b, sh, sb), F32)], axis=-1)

    sim = jnp.einsum("bsgd,bsjd->bsgj", qs, keys, preferred_element_type=F32) * scale  # [b, sh, gq, nk]
    if gate is not None:
        sim = sim * gate[:, :, None, :]
    sim = jnp.where(mask[:, :, None, :], sim, reference._neg_max(F32))
    attn = jax.nn.softmax(sim, axis=-1)
    out = jnp.einsum("bsgj,bsjd->bsgd", attn, values.astype(F32))
    return out.reshape(b, 1, h, d).astype(q.dtype)


def sliding_window_one(
    q: jax.Array,  # [b, 1, h, d], rotated
    k: jax.Array,  # [b, Lp, kh, d], rotated
    v: jax.Array,  # [b, Lp, kh, d]
    position: jax.Array,  # int32 []
    *,
    window: int,
    scale: float,
) -> jax.Array:  # [b, 1, h, d]
    """Causal sliding window of one query: keys t - window .. t, read as one slice of window + 1."""
    lp = k.shape[1]
    if window + 1 >= lp:
        return reference.sliding_window_attention(q, k, v, window=window, causal=True, scale=scale,
                                                  q_positions=position[None])
    start = jnp.clip(position - window, 0, lp - window - 1)
    k_win = jax.lax.dynamic_slice_in_dim(k, start, window + 1, axis=1)
    v_win = jax.lax.dynamic_slice_in_dim(v, start, window + 1, axis=1)
    return reference.sliding_window_attention(q, k_win, v_win, window=window, causal=True, scale=scale,
                                              q_positions=(position - start)[None])


def dense_attention_one(
    q: jax.Array,  # [b, 1, h, d], rotated; query head j * kh + c reads kv head c
    k: jax.Array,  # [b, L, kh, d], rotated
    v: jax.Array,  # [b, L, kh, d]
    position: jax.Array,  # int32 []
) -> jax.Array:  # [b, 1, h, d]
    """Causal softmax attention of one query over the cache (keys <= position)."""
    b, _, h, d = q.shape
    kh = k.shape[2]
    qg = q.reshape(b, h // kh, kh, d)
    sim = jnp.einsum("bgcd,bjcd->bgcj", qg, k, preferred_element_type=F32) * d**-0.5
    sim = jnp.where(jnp.arange(k.shape[1]) <= position, sim, -jnp.inf)
    attn = jax.nn.softmax(sim, axis=-1)
    out = jnp.einsum("bgcj,bjcd->bgcd", attn, v.astype(F32))
    return out.reshape(b, 1, h, d).astype(q.dtype)

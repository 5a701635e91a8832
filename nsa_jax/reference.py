"""The pure-JAX NSA core: the oracle every kernel is tested against.

Written for clarity, not speed: each branch builds its mask densely over
[queries, keys]. Layout is [b, n, heads, d] throughout (JAX's attention layout);
query head `k * g + j` belongs to kv head `k` (g = heads // kv_heads).

The pipeline, as `native-sparse-attention-pytorch` 0.2.3 runs it (its `SparseAttention.forward`;
the golden fixtures in tests/golden pin this module to it):

    compression_windows -> (compress networks, in the module) -> compressed_attention
    ; select_blocks (importance_scores -> block_importance -> softmax -> top-k)
    -> selected_attention ; sliding_window_attention ; gated sum (module)

`compressed_attention`, `select_blocks`, `selected_attention` and `sliding_window_attention`
are the four functions a kernel backend replaces (same signatures). Selection is its own
function so that a kernel can pick blocks without writing the [n, n / stride] scores.
Every function accepts `q_positions` so that cached decoding (a few queries at the end of a
longer key sequence) runs through the same code as the parallel forward, and `segments`
(`nsa_jax.segments`) for packed documents: each token then gets what its document alone
would give it (the grids of compressed entries and selection blocks per document, as that
module lays them out).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nsa_jax import segments as seg
from nsa_jax.numerics import F32, cdiv, round_up

IMPORTANCE_PAD_LOGIT = -1e3  # the package prepends this column before the block softmax
SELECTION_THRESHOLD = 1e-10  # selected blocks with probability <= this are masked out
NO_PICK = -1  # with segments: a pick slot beyond what the query's document alone would pick


def _neg_max(dtype=F32) -> float:
    return -float(jnp.finfo(dtype).max)


def _positions(q_positions: jax.Array | None, n: int) -> jax.Array:  # [n]
    return jnp.arange(n) if q_positions is None else q_positions


def _softmax_attend(sim: jax.Array, v: jax.Array, out_dtype) -> jax.Array:
    """sim [b, kh, g, nq, nk] (f32), v [b, nk, kh, d] -> [b, nq, kh * g, d]."""
    attn = jax.nn.softmax(sim, axis=-1)
    out = jnp.einsum("bkgij,bjkd->bikgd", attn, v.astype(F32))
    b, nq, kh, g, d = out.shape
    return out.reshape(b, nq, kh * g, d).astype(out_dtype)


def _per_batch(mask: jax.Array) -> jax.Array:
    """A query x key mask [nq, nk] or, with segments, [b, nq, nk] -> broadcastable to logits
    [b, kh, g, nq, nk]."""
    return mask[:, None, None] if mask.ndim == 3 else mask


def _no_positions(q_positions, segments) -> None:
    if q_positions is not None and segments is not None:
        raise NotImplementedError("segments (packed documents) are for the parallel forward, not cached decoding")


def _with_phantom_keys(sim: jax.Array, v: jax.Array, count: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Append one key column standing for `count` zero keys (logit 0, value 0): the zero
    padding a document alone would have past its end. sim [b, kh, g, nq, nk], v [b, nk, kh, d],
    count broadcastable to [b, kh, g, nq]."""
    extra = jnp.where(count > 0, jnp.log(jnp.maximum(count, 1).astype(F32)), -jnp.inf)
    extra = jnp.broadcast_to(extra, sim.shape[:-1])[..., None]
    return jnp.concatenate([sim, extra], axis=-1), jnp.pad(v, ((0, 0), (0, 1), (0, 0), (0, 0)))


def _grouped_logits(q: jax.Array, k: jax.Array, scale: float) -> jax.Array:
    """q [b, nq, h, d], k [b, nk, kh, d] -> scaled logits [b, kh, g, nq, nk] in float32."""
    b, nq, h, d = q.shape
    kh = k.shape[2]
    qg = q.reshape(b, nq, kh, h // kh, d)
    return jnp.einsum("bikgd,bjkd->bkgij", qg, k, preferred_element_type=F32) * scale


# --------------------------------------------------------------------------------------
# compression


def compression_windows(x: jax.Array, block_size: int, stride: int,
                        segments: seg.Segments | None = None) -> jax.Array:
    """Cut x [b, n, kh, d] into windows [b, kh, w, block_size, d], w = n // stride.

    Window i covers tokens [i*stride - (block_size - stride), (i+1)*stride): the first
    floor(n / stride) * stride tokens, left-padded with block_size - stride zeros. With
    segments, window slot c holds its document's entry (`nsa_jax.segments`): that document's
    tokens only, zeros before its start and for slots no document owns.
    """
    b, n, kh, d = x.shape
    num_windows = n // stride
    if num_windows == 0:
        return jnp.zeros((b, kh, 0, block_size, d), x.dtype)
    if segments is not None:
        slots = seg.entry_slots(segments, stride, num_windows)
        first = slots.doc_start + slots.local * stride - (block_size - stride)  # [b, w]
        tok = first[:, :, None] + jnp.arange(block_size)[None, None, :]  # [b, w, cb]
        keep = slots.valid[:, :, None] & (tok >= slots.doc_start[:, :, None])
        gathered = jnp.take_along_axis(x, jnp.clip(tok, 0, n - 1).reshape(b, -1, 1, 1), axis=1)
        windows = jnp.where(keep.reshape(b, -1, 1, 1), gathered, 0).reshape(b, num_windows, block_size, kh, d)
        return windows.transpose(0, 3, 1, 2, 4)
    x = x[:, : num_windows * stride]
    return windows_after(jnp.pad(x, ((0, 0), (block_size - stride, 0), (0, 0), (0, 0))), block_size, stride)


def windows_after(x: jax.Array, block_size: int, stride: int) -> jax.Array:
    """x [b, (block_size - stride) + w * stride, kh, d], the w windows' tokens after what the first
    window reaches back to (zeros at the sequence start; a context shard's halo) -> windows
    [b, kh, w, block_size, d], window i = x[i * stride : i * stride + block_size]."""
    b, n, kh, d = x.shape
    num_windows = (n - (block_size - stride)) // stride
    if block_size % stride == 0:  # windows of whole stride chunks: slices, no gather (nor its scatter-add gradient)
        m = block_size // stride
        chunks = x.reshape(b, num_windows + m - 1, stride, kh, d)
        windows = jnp.concatenate([chunks[:, j: j + num_windows] for j in range(m)], axis=2)
        return windows.transpose(0, 3, 1, 2, 4)  # [b, w, cb, kh, d] -> [b, kh, w, cb, d]
    idx = jnp.arange(num_windows)[:, None] * stride + jnp.arange(block_size)[None, :]
    return x[:, idx].transpose(0, 3, 1, 2, 4)  # [b, w, cb, kh, d] -> [b, kh, w, cb, d]


def _compressed_visibility(n: int, nc: int, stride: int, q_positions: jax.Array | None,
                           segments: seg.Segments | None = None, causal: bool = True) -> jax.Array:
    """[n, nc]: compressed block c is visible to the query at position t iff (c + 1) * stride - 1 < t.
    With segments, [b, n, nc]: entries of the query's document only, c and t taken within it
    (all of them when not causal)."""
    if segments is not None:
        slots = seg.entry_slots(segments, stride, nc)
        visible = seg.same_document(segments, slots.doc_start) & slots.valid[:, None, :]
        if causal:
            visible = visible & ((slots.local[:, None, :] + 1) * stride - 1 < segments.positions[:, :, None])
        return visible
    block_end = (jnp.arange(nc) + 1) * stride - 1
    return block_end[None, :] < _positions(q_positions, n)[:, None]


def compressed_attention(
    q: jax.Array,  # [b, n, h, d], not rotated
    ck: jax.Array,  # [b, m + nc, kh, d]: m memory entries, then nc compressed blocks
    cv: jax.Array,  # [b, m + nc, kh, d]
    *,
    num_mem: int,
    stride: int,
    causal: bool,
    scale: float | None = None,
    q_positions: jax.Array | None = None,  # [n]
    segments: seg.Segments | None = None,
) -> jax.Array:  # [b, n, h, d]
    """Attention over [memory, compressed blocks].

    Compressed block c is visible to the query at position t iff (c + 1) * stride - 1 < t;
    memory entries are always visible. Masked logits are -(float max) / 10.
    """
    _no_positions(q_positions, segments)
    b, n, h, d = q.shape
    nc = ck.shape[1] - num_mem
    scale = d**-0.5 if scale is None else scale
    sim = _grouped_logits(q, ck, scale)  # [b, kh, g, n, m + nc]
    if causal or segments is not None:
        visible = _compressed_visibility(n, nc, stride, q_positions, segments, causal)
        mask = jnp.concatenate([jnp.ones((*visible.shape[:-1], num_mem), bool), visible], axis=-1)
        sim = jnp.where(_per_batch(mask), sim, _neg_max(F32) / 10)
    return _softmax_attend(sim, cv, q.dtype)


def importance_scores(
    q: jax.Array,  # [b, n, h, d], not rotated
    ck: jax.Array,  # [b, m + nc, kh, d]
    *,
    num_mem: int,
    stride: int,
    causal: bool,
    share_heads: bool,
    scale: float | None = None,
    q_positions: jax.Array | None = None,
    segments: seg.Segments | None = None,
) -> jax.Array:  # [b, n, sh, nc]
    """The compressed branch's scaled logits without the memory columns (masked ones hold
    -(float max) / 10), averaged over the g query heads of each kv head when `share_heads`
    (sh = kv heads), else per query head (sh = heads)."""
    b, n, h, d = q.shape
    nc = ck.shape[1] - num_mem
    scale = d**-0.5 if scale is None else scale
    logits = _grouped_logits(q, ck[:, num_mem:], scale)  # [b, kh, g, n, nc]
    if share_heads:  # average before masking (the mean of g fills could overflow)
        logits = logits.mean(axis=2, keepdims=True)
    if causal or segments is not None:
        visible = _compressed_visibility(n, nc, stride, q_positions, segments, causal)
        logits = jnp.where(_per_batch(visible), logits, _neg_max(F32) / 10)
    kh, per_kv_head = logits.shape[1], logits.shape[2]
    return logits.transpose(0, 3, 1, 2, 4).reshape(b, n, kh * per_kv_head, nc)


# --------------------------------------------------------------------------------------
# selection


def _interpolate_to_tokens(scores: jax.Array, stride: int) -> jax.Array:
    """Linear interpolation [.., nc] -> [.., nc * stride] (F.interpolate, align_corners=False)."""
    nc = scores.shape[-1]
    j = jnp.arange(nc * stride, dtype=F32)
    src = jnp.maximum((j + 0.5) / stride - 0.5, 0.0)
    lo = jnp.floor(src).astype(jnp.int32)
    hi = jnp.minimum(lo + 1, nc - 1)
    w = src - lo
    return scores[..., lo] * (1.0 - w) + scores[..., hi] * w


def block_importance(
    scores: jax.Array,  # [b, n, sh, nc] importance logits from compressed_attention
    *,
    selection_block_size: int,
    stride: int,
    interpolated: bool = False,
    q_positions: jax.Array | None = None,  # [n]
    segments: seg.Segments | None = None,
) -> jax.Array:
    """Importance logits per selection block [b, n, sh, nb].

    If selection_block_size == stride the compressed columns are the blocks. Otherwise the
    scores go to token resolution (repeated, or linearly interpolated when `interpolated`),
    are averaged per selection block (trailing partial block dropped), and the query's own
    block is filled with -(float max). With segments, block slot B holds its document's block
    (`nsa_jax.segments`), formed from that document's entries alone; blocks of other
    documents, and slots no document owns, are -inf (they do not exist for the query).
    """
    sb = selection_block_size
    if segments is not None:
        return _block_importance_packed(scores, sb, stride, interpolated, segments)
    if sb == stride:
        return scores
    nc = scores.shape[-1]
    if interpolated:
        tokens = _interpolate_to_tokens(scores, stride) if nc > 0 else scores
        nb = (nc * stride) // sb
        blocks = tokens[..., : nb * sb].reshape(*scores.shape[:-1], nb, sb).mean(-1)
    else:
        per_block = sb // stride
        nb = nc // per_block
        blocks = scores[..., : nb * per_block].reshape(*scores.shape[:-1], nb, per_block).mean(-1)
    if nb == 0:
        return blocks
    pos = _positions(q_positions, scores.shape[1])
    own = (pos // sb)[:, None] == jnp.arange(nb)[None, :]  # [n, nb]
    return jnp.where(own[None, :, None, :], _neg_max(blocks.dtype), blocks)


def _block_importance_packed(scores, sb: int, stride: int, interpolated: bool, segments: seg.Segments):
    """`block_importance` per document: slot B's logit from its document's entries, each
    document's blocks computed as for that document alone (same ops, same order)."""
    b, n, sh, nc = scores.shape
    nb = seg.block_counts(nc, stride, sb, interpolated)
    if nb == 0:
        return scores[..., :0]
    blocks = seg.block_slots(segments, stride, sb, interpolated, nb)
    entry0 = blocks.doc_start // stride  # [b, nb]: the document's first entry slot
    take = lambda idx: jnp.take_along_axis(  # noqa: E731  scores at entry slots idx [b, nb, r] -> [b, n, sh, nb, r]
        scores, jnp.clip(idx, 0, nc - 1).reshape(b, 1, 1, -1), axis=-1).reshape(b, n, sh, nb, idx.shape[-1])
    if sb == stride:
        logits = scores
    elif interpolated:
        lo, hi, w = seg.block_interpolation(blocks, stride, sb)  # [b, nb, sb]
        w = w[:, None, None]
        tokens = take(entry0[:, :, None] + lo) * (1.0 - w) + take(entry0[:, :, None] + hi) * w
        logits = tokens.mean(-1)
    else:
        r = sb // stride
        logits = take(entry0[:, :, None] + blocks.local[:, :, None] * r + jnp.arange(r)[None, None, :]).mean(-1)
    exists = seg.same_document(segments, blocks.doc_start) & blocks.valid[:, None, :]  # [b, n, nb]
    logits = jnp.where(exists[:, :, None, :], logits, -jnp.inf)
    if sb == stride:
        return logits
    own = exists & (blocks.local[:, None, :] == (segments.positions // sb)[:, :, None])
    return jnp.where(own[:, :, None, :], _neg_max(logits.dtype), logits)


def select_blocks_from_scores(
    scores: jax.Array,  # [b, n, sh, nc]
    *,
    num_selected: int,
    selection_block_size: int,
    stride: int,
    interpolated: bool = False,
    q_positions: jax.Array | None = None,
    segments: seg.Segments | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Top-k selection blocks per query: (probabilities [b, n, sh, k'], indices [b, n, sh, k']).

    Block probabilities are a softmax over [-1000, block logits]; k' = min(k, blocks) may be
    0, in which case both outputs have a last axis of size 0. A selected block is valid iff
    its probability > SELECTION_THRESHOLD (`valid_selection`).

    With segments, indices are blocks of the query's document (0 = its first block), exactly
    those its document alone would pick, in the same order; the slots beyond the k' that
    document alone would have hold index -1 and probability 0 (`NO_PICK`).
    """
    b, n, sh, nc = scores.shape
    if min(num_selected, nc) == 0:
        empty = jnp.zeros((b, n, sh, 0))
        return empty.astype(F32), empty.astype(jnp.int32)
    blocks = block_importance(
        scores,
        selection_block_size=selection_block_size,
        stride=stride,
        interpolated=interpolated,
        q_positions=q_positions,
        segments=segments,
    ).astype(F32)
    k = min(num_selected, nc, blocks.shape[-1])
    if k == 0:
        empty = jnp.zeros((b, n, sh, 0))
        return empty.astype(F32), empty.astype(jnp.int32)
    padded = jnp.concatenate([jnp.full((*blocks.shape[:-1], 1), IMPORTANCE_PAD_LOGIT, F32), blocks], -1)
    probs = jax.nn.softmax(padded, axis=-1)[..., 1:]
    if segments is None:
        values, indices = jax.lax.top_k(probs, k)
        return values, indices.astype(jnp.int32)
    # Blocks that do not exist for the query (-inf) rank after every block of its document.
    _, indices = jax.lax.top_k(jnp.where(blocks > -jnp.inf, probs, -1.0), k)
    values = jnp.take_along_axis(probs, indices, axis=-1)
    picks = seg.picks_per_query(segments, num_selected, stride, selection_block_size, interpolated)  # its own k'
    kept = jnp.arange(k)[None, None, None, :] < picks[:, :, None, None]
    local = indices - (segments.start // selection_block_size)[:, :, None, None]
    return jnp.where(kept, values, 0.0), jnp.where(kept, local, NO_PICK).astype(jnp.int32)


def select_blocks(
    q: jax.Array,  # [b, n, h, d], not rotated
    ck: jax.Array,  # [b, m + nc, kh, d]
    *,
    num_mem: int,
    stride: int,
    causal: bool,
    share_heads: bool,
    num_selected: int,
    selection_block_size: int,
    interpolated: bool = False,
    scale: float | None = None,
    q_positions: jax.Array | None = None,
    segments: seg.Segments | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Importance scores of the compressed branch -> top-k selection blocks per query.

    Returns (probabilities [b, n, sh, k'], indices [b, n, sh, k']), as `select_blocks_from_scores`.
    Differentiable in q and ck through the probabilities (for diff top-k).
    """
    _no_positions(q_positions, segments)
    scores = importance_scores(q, ck, num_mem=num_mem, stride=stride, causal=causal, share_heads=share_heads,
                               scale=scale, q_positions=q_positions, segments=segments)
    return select_blocks_from_scores(scores, num_selected=num_selected, selection_block_size=selection_block_size,
                                     stride=stride, interpolated=interpolated, q_positions=q_positions,
                                     segments=segments)


def valid_selection(values: jax.Array) -> jax.Array:
    return values > SELECTION_THRESHOLD


def straight_through_gates(values: jax.Array) -> jax.Array:
    """Differentiable top-k: 1 in the forward pass, gradient of `values` in the backward."""
    return values + jax.lax.stop_gradient(1.0 - values)


# --------------------------------------------------------------------------------------
# fine (selected) attention


def selected_attention(
    q: jax.Array,  # [b, nq, h, d], rotated
    k: jax.Array,  # [b, nk, kh, d], rotated
    v: jax.Array,  # [b, nk, kh, d]
    indices: jax.Array,  # [b, nq, sh, k'] selected block indices (sh = kh or h)
    valid: jax.Array,  # [b, nq, sh, k'] bool
    gates: jax.Array | None,  # [b, nq, sh, k'] multiplies the selected keys, or None
    *,
    block_size: int,
    causal: bool,
    scale: float | None = None,
    q_positions: jax.Array | None = None,  # [nq]
    segments: seg.Segments | None = None,
) -> jax.Array:  # [b, nq, h, d]
    """Each query attends to the keys of its valid selected blocks, plus its own block.

    The own block (up to and including the query when causal) is attended when causal, and
    also when no block can be selected (k' = 0; then non-causal queries see their whole
    block, zero padding past the sequence end included, as the package does).
    Keys are zero-padded to a multiple of block_size. Masked logits are -(float max).
    With segments, indices are blocks of the query's document (`select_blocks`; NO_PICK
    slots are ignored, and a query with only those is one whose document has k' = 0).
    """
    _no_positions(q_positions, segments)
    b, nq, h, d = q.shape
    nk, kh = k.shape[1], k.shape[2]
    g = h // kh
    sh, num_sel = indices.shape[2], indices.shape[3]
    scale = d**-0.5 if scale is None else scale

    def per_head(x):  # [b, nq, sh, nk] -> broadcastable to [b, kh, g, nq, nk]
        if sh == kh:
            return x.transpose(0, 2, 1, 3)[:, :, None]
        return x.reshape(b, nq, kh, g, x.shape[-1]).transpose(0, 2, 3, 1, 4)

    if segments is not None:
        return _selected_packed(q, k, v, indices, valid, gates, block_size, causal, scale, segments, per_head)
    nb = cdiv(nk, block_size)
    npad = nb * block_size
    pad = ((0, 0), (0, npad - nk), (0, 0), (0, 0))
    k, v = jnp.pad(k, pad), jnp.pad(v, pad)

    pos = _positions(q_positions, nq)
    key_pos = jnp.arange(npad)
    to_tokens = lambda x: jnp.repeat(x, block_size, axis=-1)  # [.., nb] -> [.., npad]

    hits = indices[..., None] == jnp.arange(nb)  # [b, nq, sh, k', nb]
    chosen = to_tokens(jnp.any(hits & valid[..., None], axis=-2))  # [b, nq, sh, npad]
    if causal or num_sel == 0:
        own = (key_pos // block_size)[None, :] == (pos // block_size)[:, None]  # [nq, npad]
        if causal:
            own = own & (key_pos[None, :] <= pos[:, None])
        mask = chosen | own[None, :, None, :]
    else:
        mask = chosen

    sim = _grouped_logits(q, k, scale)  # [b, kh, g, nq, npad]
    if gates is not None and num_sel > 0:
        per_block_gate = 1.0 + jnp.sum(
            jnp.where(hits & valid[..., None], (gates.astype(F32) - 1.0)[..., None], 0.0), axis=-2
        )
        sim = sim * per_head(to_tokens(per_block_gate))
    mask = per_head(mask)
    sim = jnp.where(mask, sim, _neg_max(F32))
    if not causal and num_sel > 0:
        # A row with no valid block: the package's softmax over all-masked gathered keys is
        # uniform over the selected blocks' tokens. Reproduce it.
        empty_row = ~jnp.any(mask, axis=-1, keepdims=True)
        any_selected = per_head(to_tokens(jnp.any(hits, axis=-2)))
        sim = jnp.where(empty_row, jnp.where(any_selected, 0.0, -jnp.inf), sim)
    return _softmax_attend(sim, v, q.dtype)


def _selected_packed(q, k, v, indices, valid, gates, sb: int, causal: bool, scale: float, segments: seg.Segments,
                     per_head):
    """`selected_attention` with segments: the same masks, keys and blocks taken within the
    query's document; the zero padding its document alone would have is counted (phantom keys)."""
    nk = k.shape[1]
    key_block = (jnp.arange(nk)[None] - segments.start) // sb  # [b, nk]: the key's block in its document
    same = seg.same_document(segments)  # [b, nq, nk]
    hits = (indices[..., None] == key_block[:, None, None, None, :]) & same[:, :, None, None, :]  # [b, nq, sh, k', nk]
    chosen = jnp.any(hits & valid[..., None], axis=-2)  # [b, nq, sh, nk]
    no_picks = jnp.all(indices == NO_PICK, axis=-1)  # [b, nq, sh]: the document alone has k' = 0
    pos = segments.positions
    own = same & (key_block[:, None, :] == (pos // sb)[:, :, None])  # [b, nq, nk]
    if causal:
        own = own & (jnp.arange(nk)[None, None, :] <= jnp.arange(nk)[None, :, None])
        mask = chosen | own[:, :, None, :]
    else:
        mask = chosen | (own[:, :, None, :] & no_picks[..., None])

    sim = _grouped_logits(q, k, scale)  # [b, kh, g, nq, nk]
    if gates is not None and indices.shape[-1] > 0:
        per_key_gate = 1.0 + jnp.sum(jnp.where(hits & valid[..., None], (gates.astype(F32) - 1.0)[..., None], 0.0),
                                     axis=-2)
        sim = sim * per_head(per_key_gate)
    mask = per_head(mask)
    sim = jnp.where(mask, sim, _neg_max(F32))
    if causal:
        return _softmax_attend(sim, v, q.dtype)
    # Rows with picks but no valid one: uniform over the picked blocks' tokens (as above).
    empty_row = ~jnp.any(mask, axis=-1, keepdims=True) & ~per_head(no_picks[..., None])
    any_selected = per_head(jnp.any(hits, axis=-2))
    sim = jnp.where(empty_row, jnp.where(any_selected, 0.0, -jnp.inf), sim)
    # Rows without picks see their whole block, its zero padding past the document's end included.
    padding = jnp.maximum((pos // sb + 1) * sb - segments.lengths, 0)  # [b, nq]
    count = per_head(jnp.where(no_picks, padding[:, :, None], 0)[..., None])[..., 0]  # [b, kh, g|1, nq]
    sim, v = _with_phantom_keys(sim, v, count)
    return _softmax_attend(sim, v, q.dtype)


# --------------------------------------------------------------------------------------
# sliding window


def sliding_window_attention(
    q: jax.Array,  # [b, nq, h, d], rotated
    k: jax.Array,  # [b, nk, kh, d], rotated
    v: jax.Array,  # [b, nk, kh, d]
    *,
    window: int,
    causal: bool,
    scale: float | None = None,
    q_positions: jax.Array | None = None,  # [nq]
    mask_padding: bool = False,
    segments: seg.Segments | None = None,
) -> jax.Array:  # [b, nq, h, d]
    """Query i attends keys j with i - window <= j <= i (causal) or |i - j| <= window.

    Non-causal quirk of the package's LocalAttention (autopad): keys are zero-padded to a
    multiple of `window`, and the padding is not masked, so queries near the end also see
    logit-0 keys with zero values. `mask_padding=True` masks them (the fix).
    """
    _no_positions(q_positions, segments)
    b, nq, h, d = q.shape
    nk = k.shape[1]
    scale = d**-0.5 if scale is None else scale
    if segments is not None:
        return _sliding_packed(q, k, v, window, causal, scale, mask_padding, segments)
    if not causal and not mask_padding and window > 0:
        npad = round_up(nk, window)
        pad = ((0, 0), (0, npad - nk), (0, 0), (0, 0))
        k, v = jnp.pad(k, pad), jnp.pad(v, pad)
    key_pos = jnp.arange(k.shape[1])
    pos = _positions(q_positions, nq)
    dist = pos[:, None] - key_pos[None, :]  # [nq, nk]
    mask = (dist >= 0) & (dist <= window) if causal else jnp.abs(dist) <= window
    sim = _grouped_logits(q, k, scale)
    sim = jnp.where(mask, sim, _neg_max(F32))
    return _softmax_attend(sim, v, q.dtype)


def _sliding_packed(q, k, v, window: int, causal: bool, scale: float, mask_padding: bool, segments: seg.Segments):
    """`sliding_window_attention` with segments: keys of the query's document only; without
    mask_padding, non-causal queries also count the zero keys their document alone would be
    padded with (up to a multiple of `window`)."""
    n = q.shape[1]
    t = jnp.arange(n)
    dist = t[:, None] - t[None, :]
    within = (dist >= 0) & (dist <= window) if causal else jnp.abs(dist) <= window
    mask = within[None] & seg.same_document(segments)  # [b, nq, nk]
    sim = jnp.where(mask[:, None, None], _grouped_logits(q, k, scale), _neg_max(F32))
    if not causal and not mask_padding and window > 0:
        sim, v = _with_phantom_keys(sim, v, seg.window_padding(segments, window)[:, None, None, :])
    return _softmax_attend(sim, v, q.dtype)

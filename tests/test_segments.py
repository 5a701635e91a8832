"""Packed documents (segment_ids): every token gets what its document alone would give it, for
SparseAttention on the reference path (outputs and gradients, in documents shorter than one
compression block, exactly one, and many blocks; causal and non-causal; shared and per-head
selection), for the dense Attention and for the Transformer (logits and the masked loss)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nsa_jax import Transformer
from nsa_jax.attention import Attention, SparseAttention
from nsa_jax.segments import from_ids

DIM = 32
LENGTHS = {
    "shorter_than_a_block": (3, 5, 2, 7, 6),
    "one_block_each": (8, 8, 8),
    "many_blocks": (3, 16, 41, 7),
}
CONFIGS = {  # name: (causal, shared selection, selection block, interpolated, sliding window)
    "causal_shared": (True, True, 8, False, 5),
    "causal_per_head_block_is_stride": (True, False, 4, False, 3),
    "causal_interpolated": (True, True, 6, True, 5),
    "noncausal_shared": (False, True, 8, False, 5),
    "noncausal_per_head_interpolated": (False, False, 6, True, 3),
}
QUICK = {("noncausal_shared", "one_block_each")}  # causal_shared-many_blocks moved: the quick tier stays under 5 minutes


def grid():
    return [pytest.param(c, lengths, id=f"{c}-{lengths}",
                         marks=() if (c, lengths) in QUICK else pytest.mark.slow)
            for c in CONFIGS for lengths in LENGTHS]


def randomize(module, scale: float = 0.3):
    """Give the zero-initialised parameters (memory kv, intra-block positions, gate weights)
    random values, so that every branch and position term affects the output."""
    for path, param in nnx.iter_graph(module):
        if isinstance(param, nnx.Param) and not np.any(np.asarray(param[...])):
            param[...] = scale * jax.random.normal(jax.random.key(len(path) + 7), param.shape, param.dtype)
    return module


def sparse_attention(config: str) -> SparseAttention:
    causal, shared, sb, interpolated, window = CONFIGS[config]
    return randomize(SparseAttention(
        dim=DIM, dim_head=16, heads=4, kv_heads=2, sliding_window_size=window, compress_block_size=8,
        compress_block_sliding_stride=4, selection_block_size=sb, num_selected_blocks=2, causal=causal,
        query_heads_share_selected_kv=shared, interpolated_importance_score=interpolated, use_diff_topk=True,
        use_pallas_nsa=False, rngs=nnx.Rngs(0)))


def packed_ids(lengths, batch: int = 2) -> jax.Array:
    """[batch, sum(lengths)]: the documents in order in row 0, reversed in row 1 (other offsets)."""
    rows = []
    for r in range(batch):
        order = lengths if r % 2 == 0 else lengths[::-1]
        rows.append(np.concatenate([np.full(length, 10 * r + i) for i, length in enumerate(order)]))
    return jnp.asarray(np.stack(rows), jnp.int32)


def documents(ids: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) of each run of equal ids in one row."""
    cuts = [0] + [i for i in range(1, len(ids)) if ids[i] != ids[i - 1]] + [len(ids)]
    return list(zip(cuts[:-1], cuts[1:]))


def test_from_ids_marks_runs():
    seg = from_ids(jnp.array([[7, 7, 7, 2, 2, 7], [1, 1, 1, 1, 1, 1]]))
    np.testing.assert_array_equal(seg.start, [[0, 0, 0, 3, 3, 5], [0] * 6])
    np.testing.assert_array_equal(seg.end, [[3, 3, 3, 5, 5, 6], [6] * 6])
    np.testing.assert_array_equal(seg.positions, [[0, 1, 2, 0, 1, 0], list(range(6))])


@pytest.mark.parametrize("config,lengths", grid())
def test_sparse_attention_packed_equals_each_document_alone(config, lengths):
    with jax.default_matmul_precision("highest"):
        module = sparse_attention(config)
        ids = packed_ids(LENGTHS[lengths])
        b, n = ids.shape
        x = jax.random.normal(jax.random.key(1), (b, n, DIM))
        ct = jax.random.normal(jax.random.key(2), (b, n, DIM))
        graph, params = nnx.split(module)

        def loss(params, x, ct, segment_ids=None):  # <out, ct> and out
            out = nnx.merge(graph, params)(x, segment_ids=segment_ids)
            return jnp.sum(out * ct), out

        grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))  # one compile per length
        (_, packed), (dparams, dx) = grad(params, x, ct, ids)
        want_dparams = jax.tree.map(jnp.zeros_like, params)
        for r in range(b):
            for start, end in documents(np.asarray(ids[r])):
                (_, alone), (dp, dxa) = grad(params, x[r:r + 1, start:end], ct[r:r + 1, start:end])
                np.testing.assert_allclose(packed[r, start:end], alone[0], atol=2e-6, rtol=1e-5,
                                           err_msg=f"output, row {r}, document {start}:{end}")
                np.testing.assert_allclose(dx[r, start:end], dxa[0], atol=2e-6, rtol=1e-5,
                                           err_msg=f"d input, row {r}, document {start}:{end}")
                want_dparams = jax.tree.map(jnp.add, want_dparams, dp)
        for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(dparams), jax.tree.leaves(want_dparams)):
            np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4, err_msg=f"d {jax.tree_util.keystr(path)}")


def test_dense_attention_packed_equals_each_document_alone():
    module = Attention(DIM, dim_head=16, heads=4, kv_heads=2, causal=True, rngs=nnx.Rngs(0))
    ids = packed_ids(LENGTHS["many_blocks"])
    x = jax.random.normal(jax.random.key(1), (*ids.shape, DIM))
    graph, params = nnx.split(module)
    run = jax.jit(lambda params, x, segment_ids: nnx.merge(graph, params)(x, segment_ids=segment_ids))
    with jax.default_matmul_precision("highest"):
        packed = run(params, x, ids)
        for r in range(ids.shape[0]):
            for start, end in documents(np.asarray(ids[r])):
                np.testing.assert_allclose(packed[r, start:end], run(params, x[r:r + 1, start:end], None)[0],
                                           atol=2e-6, rtol=1e-5)


@pytest.mark.slow  # moved from the quick tier to keep it under 5 minutes
@pytest.mark.parametrize("use_sparse_attn", [True, False])
def test_transformer_packed_logits_and_loss(use_sparse_attn):
    model = Transformer(num_tokens=64, dim=DIM, depth=1, dim_head=16, heads=4, kv_heads=2,
                        use_sparse_attn=use_sparse_attn, use_pallas_nsa=False,
                        sparse_attn_kwargs=dict(sliding_window_size=5, compress_block_size=8,
                                                compress_block_sliding_stride=4, selection_block_size=8,
                                                num_selected_blocks=2), rngs=nnx.Rngs(0))
    if use_sparse_attn:
        randomize(model)
    ids = packed_ids((3, 16, 21, 8), batch=2)
    tokens = jax.random.randint(jax.random.key(3), ids.shape, 0, 64)
    graph, params = nnx.split(model)
    run = jax.jit(lambda params, tokens, segment_ids, return_loss: nnx.merge(graph, params)(
        tokens, return_loss, segment_ids=segment_ids), static_argnums=3)
    with jax.default_matmul_precision("highest"):
        logits = run(params, tokens, ids, False)
        total, count = 0.0, 0
        for r in range(ids.shape[0]):
            for start, end in documents(np.asarray(ids[r])):
                alone = run(params, tokens[r:r + 1, start:end], None, False)
                np.testing.assert_allclose(logits[r, start:end], alone[0], atol=2e-5, rtol=1e-5)
                if end - start > 1:  # the targets inside the document
                    doc_loss = run(params, tokens[r:r + 1, start:end], None, True)
                    total, count = total + float(doc_loss) * (end - start - 1), count + end - start - 1
        loss = run(params, tokens, ids, True)
    np.testing.assert_allclose(float(loss), total / count, rtol=1e-5)


def test_segment_ids_of_the_wrong_shape_is_a_one_line_error():
    module = sparse_attention("causal_shared")
    with pytest.raises(ValueError, match=r"segment_ids must have shape \[batch, seq_len\] = \[1, 12\], got \[1, 11\]"):
        module(jnp.ones((1, 12, DIM)), segment_ids=jnp.zeros((1, 11), jnp.int32))
    with pytest.raises(ValueError, match="segment_ids must be integers"):
        module(jnp.ones((1, 12, DIM)), segment_ids=jnp.zeros((1, 12)))


@pytest.mark.slow  # moved from the quick tier to keep it under 5 minutes (tests/test_kernels_packed.py covers the packed kernels quick)
def test_pallas_backend_packed_matches_reference_backend():
    """SparseAttention with segment ids through every Pallas kernel (interpreted on CPU) against
    the same module on the reference attention: outputs and all gradients."""
    module = sparse_attention("causal_shared")
    pallas = nnx.merge(*nnx.split(module))
    pallas.use_pallas_nsa = True
    ids = packed_ids(LENGTHS["many_blocks"])
    x = jax.random.normal(jax.random.key(1), (*ids.shape, DIM))
    ct = jax.random.normal(jax.random.key(2), (*ids.shape, DIM))

    def run(m):
        graph, params = nnx.split(m)

        def loss(p, x):  # <out, ct> and out
            out = nnx.merge(graph, p)(x, segment_ids=ids)
            return jnp.sum(out * ct), out

        with jax.default_matmul_precision("highest"):
            (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
        return out, grads

    assert pallas.backend.name == "pallas" and module.backend.name == "reference"
    (got, (dp, dx)), (want, (wdp, wdx)) = run(pallas), run(module)
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-5)
    np.testing.assert_allclose(dx, wdx, atol=2e-6, rtol=1e-5)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(dp), jax.tree.leaves(wdp)):
        np.testing.assert_allclose(g, w, atol=2e-5, rtol=1e-4, err_msg=f"d {jax.tree_util.keystr(path)}")


def test_dense_attention_implementation_is_jax_s_and_packed_documents_keep_the_masked_path():
    """Attention(implementation=...) passes JAX's choice through ("xla" gives the default's
    output); packed documents take the masked XLA path whatever it says; a bad value is a
    one-line error naming the choices."""
    x = jax.random.normal(jax.random.key(2), (2, 24, DIM))
    ids = packed_ids(LENGTHS["many_blocks"])[:, :24]
    default = Attention(DIM, dim_head=16, heads=4, kv_heads=2, rngs=nnx.Rngs(0))
    xla = Attention(DIM, dim_head=16, heads=4, kv_heads=2, implementation="xla", rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(default(x), xla(x))
    flash = Attention(DIM, dim_head=16, heads=4, kv_heads=2, implementation="cudnn", rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(flash(x[:ids.shape[0]], segment_ids=ids), default(x[:ids.shape[0]], segment_ids=ids))
    with pytest.raises(ValueError, match="implementation must be None, 'xla' or 'cudnn'"):
        Attention(DIM, implementation="flash", rngs=nnx.Rngs(0))

"""SparseAttention over its option grid: shapes, dtypes, causality, gradients, selection."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nsa_jax import SparseAttention, Transformer, reference
from nsa_jax.rotary import apply_rotary

DIM, DIM_HEAD, HEADS = 32, 16, 4


def make(rngs_seed=0, **overrides) -> SparseAttention:
    kwargs = dict(dim=DIM, dim_head=DIM_HEAD, heads=HEADS, kv_heads=2, causal=True, sliding_window_size=2,
                  compress_block_size=4, compress_block_sliding_stride=4, selection_block_size=4,
                  num_selected_blocks=2)
    kwargs.update(overrides)
    attn = SparseAttention(**kwargs, rngs=nnx.Rngs(rngs_seed))
    perturb(attn, rngs_seed)
    return attn


def perturb(module: nnx.Module, seed: int, scale: float = 0.3) -> None:
    """Move every parameter away from its init (zero-initialised memory, positions and gates too)."""
    params = nnx.state(module, nnx.Param)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    nnx.update(module, jax.tree.unflatten(treedef, leaves))


def run(attn: SparseAttention, x: jax.Array) -> jax.Array:
    graphdef, state = nnx.split(attn)
    return jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)


class Option(NamedTuple):
    """One point of the package's option grid."""

    kv_heads: int
    compress_block: int
    stride: int
    selection_block: int
    num_selected: int
    share: bool  # query heads share the selection
    diff_topk: bool
    interpolated: bool

    def kwargs(self) -> dict:
        return dict(kv_heads=self.kv_heads, compress_block_size=self.compress_block,
                    compress_block_sliding_stride=self.stride, selection_block_size=self.selection_block,
                    num_selected_blocks=self.num_selected, query_heads_share_selected_kv=self.share,
                    use_diff_topk=self.diff_topk, interpolated_importance_score=self.interpolated)


OPTIONS = [
    Option(2, 4, 4, 4, 2, share=True, diff_topk=True, interpolated=False),
    Option(4, 4, 2, 4, 2, share=False, diff_topk=False, interpolated=False),
    Option(1, 8, 4, 8, 0, share=True, diff_topk=False, interpolated=False),
    Option(2, 8, 4, 4, 2, share=True, diff_topk=True, interpolated=False),
    Option(2, 4, 4, 2, 2, share=True, diff_topk=False, interpolated=True),
    Option(2, 8, 4, 6, 3, share=False, diff_topk=True, interpolated=True),
]
SEQ_LENS = [1, 4, 31, 32, 120]


def option_grid() -> list:
    """(option, causal, seq_len) for every option, both causalities and every length; the quick
    tier runs each option once (causal for even options, non-causal for odd, 31 tokens)."""
    return [pytest.param(i, causal, n, id=f"opt{i}-{'causal' if causal else 'noncausal'}-{n}",
                         marks=() if (causal == (i % 2 == 0) and n == 31) else pytest.mark.slow)
            for i in range(len(OPTIONS)) for causal in (True, False) for n in SEQ_LENS]


def bf16_rounded(attn: SparseAttention) -> None:
    params = nnx.state(attn, nnx.Param)
    nnx.update(attn, jax.tree.map(lambda p: p.astype(jnp.bfloat16).astype(jnp.float32), params))


@pytest.mark.parametrize("opt,causal,seq_len", option_grid())
def test_option_grid_runs_in_float32_and_bfloat16(opt, causal, seq_len):
    attn = make(opt, causal=causal, **OPTIONS[opt].kwargs())
    bf16_rounded(attn)  # so that float32 and bfloat16 runs start from the same numbers
    x = jax.random.normal(jax.random.key(seq_len), (2, seq_len, DIM)).astype(jnp.bfloat16)
    out = run(attn, x.astype(jnp.float32))
    assert out.shape == x.shape and out.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(out)))
    out_bf16 = run(attn, x)
    assert out_bf16.dtype == jnp.bfloat16
    # Every bfloat16 op rounds by up to 2^-9; through norm, projections, compress networks,
    # gates and the output projection a token's relative error is ~1%. A token whose top-k
    # selection flips between the two precisions differs by more, so bound the median token
    # and the whole tensor, not the worst token.
    err = jnp.linalg.norm(out_bf16.astype(jnp.float32) - out, axis=-1)
    per_token = err / jnp.linalg.norm(out, axis=-1)
    total = jnp.linalg.norm(err) / jnp.linalg.norm(out)
    assert float(jnp.median(per_token)) < 2e-2, f"median token relative error {float(jnp.median(per_token)):.3g}"
    assert float(total) < 5e-2, f"relative error {float(total):.3g}"


@pytest.mark.slow
@pytest.mark.parametrize("causal", [True, False])
def test_reference_core_computes_bfloat16_in_float32(causal):
    """The core's softmax and accumulation run in float32: bf16 inputs lose only the final rounding."""
    keys = jax.random.split(jax.random.key(0), 6)
    b, n, h, kh, d, sb = 2, 50, 4, 2, 16, 8
    q, k, v = (jax.random.normal(key, (b, n, hh, d)).astype(jnp.bfloat16)
               for key, hh in zip(keys[:3], (h, kh, kh)))
    ck, cv = (jax.random.normal(key, (b, 1 + n // 4, kh, d)).astype(jnp.bfloat16) for key in keys[3:5])
    indices = jax.random.randint(keys[5], (b, n, kh, 2), 0, n // sb)
    valid = jnp.ones(indices.shape, bool)
    f32 = lambda *xs: [x.astype(jnp.float32) for x in xs]
    calls = [
        lambda q, k, v, ck, cv: reference.compressed_attention(q, ck, cv, num_mem=1, stride=4, causal=causal),
        lambda q, k, v, ck, cv: reference.selected_attention(q, k, v, indices, valid, None, block_size=sb,
                                                             causal=causal),
        lambda q, k, v, ck, cv: reference.sliding_window_attention(q, k, v, window=5, causal=causal),
    ]
    for call in calls:
        low, high = call(q, k, v, ck, cv), call(*f32(q, k, v, ck, cv))
        assert low.dtype == jnp.bfloat16
        rel = jnp.abs(low.astype(jnp.float32) - high) / (jnp.abs(high) + 1e-2)
        assert float(rel.max()) <= 2**-8, float(rel.max())


CAUSAL_CASES = [
    dict(),
    dict(compress_block_size=8, compress_block_sliding_stride=4, selection_block_size=8, kv_heads=4,
         query_heads_share_selected_kv=False, use_diff_topk=True),
    dict(compress_block_size=4, compress_block_sliding_stride=2, selection_block_size=4, num_selected_blocks=3),
    dict(compress_block_size=8, compress_block_sliding_stride=8, selection_block_size=4,
         interpolated_importance_score=True, num_selected_blocks=3),
    dict(num_selected_blocks=0, sliding_window_size=5),
]


@pytest.mark.parametrize("case", [c if c == 3 else pytest.param(c, marks=pytest.mark.slow)  # quick: case 3 only
                                  for c in range(len(CAUSAL_CASES))])
def test_causality(case):
    """Changing the input after position t leaves outputs up to t unchanged."""
    attn = make(10 + case, **CAUSAL_CASES[case])
    n = 70
    x = jax.random.normal(jax.random.key(case), (2, n, DIM))
    base = np.asarray(run(attn, x))
    for t in (0, 5, 16, 33, 62):
        changed = x.at[:, t + 1:].set(jax.random.normal(jax.random.key(100 + t), (2, n - t - 1, DIM)))
        out = np.asarray(run(attn, changed))
        np.testing.assert_allclose(out[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-5)
        assert np.abs(out[:, t + 1:] - base[:, t + 1:]).max() > 1e-3  # the change is visible after t


def test_non_causal_sees_the_future():
    attn = make(3, causal=False)
    x = jax.random.normal(jax.random.key(0), (1, 40, DIM))
    out = run(attn, x)
    out2 = run(attn, x.at[:, -1].set(0.0))
    assert float(jnp.abs(out[:, 0] - out2[:, 0]).max()) > 1e-6


def test_transformer_causality():
    """Changing the tokens after position t leaves every logit up to t unchanged, and changes later ones."""
    model = Transformer(num_tokens=256, dim=DIM, depth=2, dim_head=DIM_HEAD, heads=HEADS, kv_heads=2,
                        use_sparse_attn=True, sparse_attn_kwargs=dict(
                            sliding_window_size=4, compress_block_size=4, selection_block_size=4,
                            num_selected_blocks=2, use_diff_topk=True), rngs=nnx.Rngs(0))
    perturb(model, 0)
    graphdef, state = nnx.split(model)
    logits = jax.jit(lambda s, ids: nnx.merge(graphdef, s)(ids))
    n = 50
    ids = jax.random.randint(jax.random.key(0), (2, n), 0, 256)
    base = np.asarray(logits(state, ids))
    for t in (0, 3, 4, 20, 33, 48):  # the first token, within and at the end of a block, later ones
        changed = ids.at[:, t + 1:].set((ids[:, t + 1:] + 7) % 256)
        out = np.asarray(logits(state, changed))
        np.testing.assert_allclose(out[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-5)
        assert np.abs(out[:, t + 1:] - base[:, t + 1:]).max() > 1e-3, t  # the change is visible after t


def _fine_branch(attn: SparseAttention, x: jax.Array) -> jax.Array:
    """The fine (selected) branch alone, through the module's own pieces."""
    _, q, k, v = attn.project(x)
    ck, _ = attn.with_memory(*attn.compress(k, v))
    values, indices = attn.select(q, ck)
    pos = jnp.arange(x.shape[1])
    return attn.fine(apply_rotary(q, pos), apply_rotary(k, pos), v, values, indices)


@pytest.mark.slow  # moved from the quick tier to keep it under 5 minutes
@pytest.mark.parametrize("share", [True, False])
def test_diff_topk_gradients_reach_compress_networks_through_gates(share):
    x = jax.random.normal(jax.random.key(0), (2, 48, DIM))
    norms = {}
    for diff in (False, True):
        attn = make(7, use_diff_topk=diff, query_heads_share_selected_kv=share, num_selected_blocks=3)
        graphdef, params, rest = nnx.split(attn, nnx.Param, ...)
        cot = jax.random.normal(jax.random.key(1), (2, 48, HEADS, DIM_HEAD))

        def loss(p):
            return jnp.sum(_fine_branch(nnx.merge(graphdef, p, rest), x) * cot)

        grads = nnx.merge(graphdef, jax.grad(loss)(params), rest)
        leaves = jax.tree.leaves(nnx.state(grads.k_compress, nnx.Param))
        leaves += [grads.compress_mem_kv[...], grads.k_intrablock_positions[...]]
        norms[diff] = sum(float(jnp.sum(jnp.square(g))) for g in leaves)
    assert norms[False] == 0.0  # hard top-k: selection is not differentiable
    assert norms[True] > 1e-6  # straight-through gates carry the gradient to the compress network


@pytest.mark.parametrize("block,stride", [(16, 16), (8, 4), (12, 4), (6, 4), (5, 3)])
def test_compression_windows_match_numpy(block, stride):
    """Windows of whole stride chunks are cut by slices, others by a gather: both the numpy windows
    (token i * stride - (block - stride) + j, zero before the sequence), values and gradients."""
    x = jax.random.normal(jax.random.key(block * 10 + stride), (2, 37, 3, 4))
    w = 37 // stride
    padded = np.pad(np.asarray(x[:, : w * stride]), ((0, 0), (block - stride, 0), (0, 0), (0, 0)))
    idx = np.arange(w)[:, None] * stride + np.arange(block)[None, :]
    np.testing.assert_array_equal(np.asarray(reference.compression_windows(x, block, stride)),
                                  padded[:, idx].transpose(0, 3, 1, 2, 4))
    weights = jax.random.normal(jax.random.key(1), (2, 3, w, block, 4))
    grad = jax.grad(lambda x: jnp.sum(reference.compression_windows(x, block, stride) * weights))(x)
    want = np.zeros(padded.shape, np.float32)
    np.add.at(want, (slice(None), idx), np.asarray(weights).transpose(0, 2, 3, 1, 4))
    np.testing.assert_allclose(np.asarray(grad[:, : w * stride]), want[:, block - stride:], rtol=1e-6, atol=1e-6)
    assert not np.any(np.asarray(grad[:, w * stride:]))


def test_interpolation_matches_numpy():
    scores = jax.random.normal(jax.random.key(0), (1, 3, 2, 5))
    stride = 4
    ours = np.asarray(reference._interpolate_to_tokens(scores, stride))
    src = np.clip((np.arange(5 * stride) + 0.5) / stride - 0.5, 0, 4)
    expected = np.apply_along_axis(lambda row: np.interp(src, np.arange(5), row), -1, np.asarray(scores))
    np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-6)


def test_interpolated_equals_plain_when_selection_block_is_the_stride():
    x = jax.random.normal(jax.random.key(0), (2, 40, DIM))
    a = make(5, compress_block_size=8, compress_block_sliding_stride=4, selection_block_size=4)
    b = make(5, compress_block_size=8, compress_block_sliding_stride=4, selection_block_size=4,
             interpolated_importance_score=True)
    np.testing.assert_array_equal(np.asarray(run(a, x)), np.asarray(run(b, x)))


def test_block_importance_masks_own_and_future_blocks():
    """Selection never picks a block that is not entirely in the past (causal)."""
    for interp, (cs, sb) in [(False, (4, 8)), (True, (8, 4)), (True, (4, 6))]:
        n = 64
        nc = n // cs
        pos = jnp.arange(n)
        visible = ((jnp.arange(nc) + 1) * cs - 1)[None, :] < pos[:, None]
        raw = jax.random.normal(jax.random.key(1), (1, n, 2, nc))
        scores = jnp.where(visible[None, :, None, :], raw, -jnp.finfo(jnp.float32).max / 10)
        values, indices = reference.select_blocks_from_scores(scores, num_selected=3, selection_block_size=sb, stride=cs,
                                                  interpolated=interp)
        valid = np.asarray(reference.valid_selection(values))
        block_end = (np.asarray(indices) + 1) * sb - 1
        assert np.all(block_end[valid] < np.broadcast_to(np.arange(n)[None, :, None, None], valid.shape)[valid])
        assert valid.any()


@pytest.mark.parametrize("bad,message", [
    (dict(heads=4, kv_heads=3), "multiple of kv_heads"),
    (dict(compress_block_sliding_stride=8), "compress_block_sliding_stride"),
    (dict(compress_block_sliding_stride=0), "compress_block_sliding_stride"),
    (dict(selection_block_size=6), "multiple of the compress stride"),
    (dict(num_selected_blocks=-1), "num_selected_blocks"),
    (dict(sliding_window_size=-1), "sliding_window_size"),
    (dict(dim_head=15), "even"),
])
def test_invalid_settings_raise_clear_errors(bad, message):
    with pytest.raises(ValueError, match=message):
        make(0, **bad)


def grouped_pair(window_seed: int):
    """Keys' and values' `GroupedMLP` (2 heads, window 4, head dim 8) moved off their init, and fresh
    random windows for each [b, h, w, n, d]."""
    from nsa_jax import GroupedMLP

    k_net = GroupedMLP(dim_head=8, compress_window_size=4, heads=2, rngs=nnx.Rngs(1))
    v_net = GroupedMLP(dim_head=8, compress_window_size=4, heads=2, rngs=nnx.Rngs(2))
    perturb(k_net, 3)
    perturb(v_net, 4)
    kw, vw = jax.random.normal(jax.random.key(window_seed), (2, 3, 2, 5, 4, 8))
    return k_net, v_net, kw, vw


def test_split_qkv_projection_equals_the_joined_one():
    """`KernelSettings.split_qkv_from_rows`: q, k, v as three products on the joined weight's
    columns give the joined product's output and gradients (input and every parameter), on fresh
    random inputs and weights; the threshold counts batch x tokens."""
    import dataclasses

    from kernels import KernelSettings

    x = jax.random.normal(jax.random.key(11), (2, 24, DIM))
    with jax.default_matmul_precision("highest"):
        outs, grads = [], []
        for rows in (0, 48):  # joined; split from 2 x 24 rows on
            attn = make(3, kernel_settings=KernelSettings(split_qkv_from_rows=rows))
            graphdef, state = nnx.split(attn)

            def loss(state, x):
                out = nnx.merge(graphdef, state)(x)
                return jnp.sum(out * jnp.cos(jnp.arange(out.size).reshape(out.shape))), out

            (_, out), grad = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(state, x)
            outs.append(out)
            grads.append(grad)
        split_jaxpr = str(jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s).project(x))(state, x))
        joined = make(3, kernel_settings=dataclasses.replace(KernelSettings(), split_qkv_from_rows=49))
        joined_jaxpr = str(jax.make_jaxpr(lambda x: joined.project(x))(x))
    assert split_jaxpr.count("dot_general") == 3 and joined_jaxpr.count("dot_general") == 1  # below: joined
    np.testing.assert_allclose(np.asarray(outs[1]), np.asarray(outs[0]), rtol=1e-5, atol=1e-5)
    for g, w in zip(jax.tree.leaves(grads[1]), jax.tree.leaves(grads[0]), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_grouped_mlp_pair_equals_the_two_networks():
    """`GroupedMLP.pair` (keys' and values' networks together) gives each network's own output
    and gradients, on fresh random windows and weights."""
    from nsa_jax import GroupedMLP

    k_net, v_net, kw, vw = grouped_pair(5)

    def loss(nets, kw, vw, paired):
        out = GroupedMLP.pair(*nets, kw, vw) if paired else jnp.concatenate([nets[0](kw), nets[1](vw)], axis=1)
        return jnp.sum(out * jnp.cos(jnp.arange(out.size).reshape(out.shape)))

    for argnums in (1, 2):  # the windows, then the weights (through nnx.grad below)
        got = jax.grad(loss, argnums)((k_net, v_net), kw, vw, True)
        want = jax.grad(loss, argnums)((k_net, v_net), kw, vw, False)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    got = nnx.grad(lambda nets: loss(nets, kw, vw, True))((k_net, v_net))
    want = nnx.grad(lambda nets: loss(nets, kw, vw, False))((k_net, v_net))
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)
    out = GroupedMLP.pair(k_net, v_net, kw, vw)
    np.testing.assert_allclose(np.asarray(out), np.asarray(jnp.concatenate([k_net(kw), v_net(vw)], axis=1)),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("split_k", [2, pytest.param(8, marks=pytest.mark.slow)])
def test_grouped_mlp_split_contraction_equals_one_matmul(split_k):
    """`compress_split_k`: the input layers' contraction as partial products summed after gives the
    one-matmul outputs and gradients (windows and weights), on fresh random inputs."""
    from kernels import KernelSettings
    from nsa_jax import GroupedMLP

    k_net, v_net, kw, vw = grouped_pair(6)

    def loss(nets, kw, vw, split):
        out = GroupedMLP.pair(*nets, kw, vw, split)
        return jnp.sum(out * jnp.cos(jnp.arange(out.size).reshape(out.shape)))

    with jax.default_matmul_precision("highest"):
        np.testing.assert_allclose(np.asarray(GroupedMLP.pair(k_net, v_net, kw, vw, split_k)),
                                   np.asarray(GroupedMLP.pair(k_net, v_net, kw, vw)), rtol=1e-5, atol=1e-5)
        got = jax.grad(loss, (1, 2))((k_net, v_net), kw, vw, split_k)
        want = jax.grad(loss, (1, 2))((k_net, v_net), kw, vw, 1)
        got_w = nnx.grad(lambda nets: loss(nets, kw, vw, split_k))((k_net, v_net))
        want_w = nnx.grad(lambda nets: loss(nets, kw, vw, 1))((k_net, v_net))
    for g, w in zip(jax.tree.leaves((got, got_w)), jax.tree.leaves((want, want_w)), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="must divide"):
        GroupedMLP.pair(k_net, v_net, kw, vw, 64)  # 4 x 8 = 32 inputs
    # SparseAttention hands its kernel settings' split to its grouped compress networks
    x = jax.random.normal(jax.random.key(7), (2, 16, DIM))
    one, split = (make(3, compress_mlp="grouped_mlp", kernel_settings=KernelSettings(compress_split_k=n))
                  for n in (1, split_k))
    k, v = jax.random.normal(jax.random.key(8), (2, 2, 16, 2, DIM_HEAD))
    with jax.default_matmul_precision("highest"):
        np.testing.assert_allclose(np.asarray(split.compress(k, v)[0]), np.asarray(one.compress(k, v)[0]),
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(run(split, x)), np.asarray(run(one, x)), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="must divide"):  # the setting does reach the networks
        make(3, compress_mlp="grouped_mlp", kernel_settings=KernelSettings(compress_split_k=128)).compress(k, v)
    with pytest.raises(ValueError, match="power of two"):
        KernelSettings(compress_split_k=3)


def test_grouped_mlp_pair_takes_both_networks_joined():
    """As the train step hands them (`nsa_jax.stacking.JOINED`): the keys' network holding both
    networks' parameters, each one array [h1 + h2, ...], the values' empty arrays. Same output as
    apart, and each joined parameter's gradient is the two networks' gradients, keys' first."""
    from nsa_jax import GroupedMLP

    names = ("kernel_in", "bias_in", "kernel_out", "bias_out")
    k_net, v_net, kw, vw = grouped_pair(5)
    k_params = {name: getattr(k_net, name)[...] for name in names}
    v_params = {name: getattr(v_net, name)[...] for name in names}

    def with_params(net, values):
        graphdef, state = nnx.split(net)
        for name, value in values.items():
            state[name] = state[name].replace(value)
        return nnx.merge(graphdef, state)

    def loss(k_values, v_values):
        out = GroupedMLP.pair(with_params(k_net, k_values), with_params(v_net, v_values), kw, vw)
        return jnp.sum(out * jnp.cos(jnp.arange(out.size).reshape(out.shape))), out

    joined = {name: jnp.concatenate([k_params[name], v_params[name]]) for name in names}
    empty = {name: jnp.zeros((0,), x.dtype) for name, x in v_params.items()}
    (_, joined_out), joined_grads = jax.value_and_grad(loss, has_aux=True)(joined, empty)
    (_, apart_out), (k_grads, v_grads) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(k_params, v_params)
    np.testing.assert_allclose(np.asarray(joined_out), np.asarray(apart_out), rtol=1e-5, atol=1e-6)
    for name in names:
        np.testing.assert_allclose(np.asarray(joined_grads[name]),
                                   np.asarray(jnp.concatenate([k_grads[name], v_grads[name]])), rtol=1e-5, atol=1e-6)
        assert float(jnp.abs(v_grads[name]).max()) > 0


# -- branch ablations (`branches`): a branch that is off has gate 0, the others' gates unchanged --

ALL_BRANCHES = ("compressed", "selected", "sliding")
# The retrieval study's two ablations (bench/retrieval.py) in the quick tier, the other subsets in the slow one.
ABLATIONS = [pytest.param(b, id="+".join(b), marks=() if i < 2 else pytest.mark.slow) for i, b in enumerate(
    [("compressed", "sliding"), ("sliding",), ("selected", "sliding"), ("compressed", "selected"),
     ("compressed",), ("selected",)])]


def _branches_by_hand(attn: SparseAttention, x: jax.Array):
    """The three branch outputs and the gates [b, n, h, 3, 1], from the module's own pieces."""
    xn, q, k, v = attn.project(x)
    ck, cv = attn.with_memory(*attn.compress(k, v))
    compressed = attn.backend.compressed_attention(
        q, ck, cv, num_mem=attn.num_mem_compress_kv, stride=attn.compress_block_sliding_stride,
        causal=attn.causal, scale=attn.scale)
    values, indices = attn.select(q, ck)
    pos = jnp.arange(x.shape[1])
    q_rot, k_rot = apply_rotary(q, pos), apply_rotary(k, pos)
    fine = attn.fine(q_rot, k_rot, v, values, indices)
    sliding = attn.sliding(q_rot, k_rot, v)
    b, n = x.shape[:2]
    gates = jax.nn.sigmoid(attn.to_strategy_combine(xn)).reshape(b, n, attn.heads, 3, 1)
    return (compressed, fine, sliding), gates


@pytest.mark.slow
def test_default_branches_are_all_three_and_unchanged():
    x = jax.random.normal(jax.random.key(0), (2, 40, DIM))
    default = make(21)
    assert default.branches == ALL_BRANCHES
    base = np.asarray(run(default, x))
    for explicit in (ALL_BRANCHES, ["sliding", "compressed", "selected"], "compressed,selected,sliding"):
        attn = make(21, branches=explicit)
        assert attn.branches == ALL_BRANCHES  # stored as a tuple in gate order
        np.testing.assert_array_equal(np.asarray(run(attn, x)), base)
    # and the default output is the gated sum of all three branches, by hand
    outputs, gates = _branches_by_hand(default, x)
    want = default.combine_heads(sum(gates[..., i, :] * o for i, o in enumerate(outputs)).reshape(2, 40, -1))
    np.testing.assert_allclose(base, np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("branches", [pytest.param(p.values[0], id=p.id, marks=() if p.id == "sliding" else
                                                   pytest.mark.slow) for p in ABLATIONS])
def test_ablation_equals_combine_with_the_off_gates_zeroed(branches):
    x = jax.random.normal(jax.random.key(1), (2, 37, DIM))
    attn = make(22, branches=branches, use_diff_topk=True)
    outputs, gates = _branches_by_hand(attn, x)
    off = [i for i, name in enumerate(ALL_BRANCHES) if name not in branches]
    zeroed = gates.at[..., jnp.array(off), :].set(0.0)
    want = attn.combine_heads(sum(zeroed[..., i, :] * o for i, o in enumerate(outputs)).reshape(2, 37, -1))
    got = run(attn, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    # the switch matters: the full model (same parameters) differs
    full = np.asarray(run(make(22, use_diff_topk=True), x))
    assert np.abs(full - np.asarray(got)).max() > 1e-3


def test_sliding_alone_is_the_gated_sliding_window():
    x = jax.random.normal(jax.random.key(2), (2, 33, DIM))
    attn = make(23, branches=("sliding",), sliding_window_size=5)
    xn, q, k, v = attn.project(x)
    pos = jnp.arange(33)
    sliding = attn.sliding(apply_rotary(q, pos), apply_rotary(k, pos), v)
    gate = jax.nn.sigmoid(attn.to_strategy_combine(xn)).reshape(2, 33, HEADS, 3, 1)[..., 2, :]
    want = attn.combine_heads((gate * sliding).reshape(2, 33, HEADS * DIM_HEAD))
    np.testing.assert_allclose(np.asarray(run(attn, x)), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("branches", [pytest.param(p.values[0], id=p.id, marks=() if p.id == "sliding" else
                                                   pytest.mark.slow) for p in ABLATIONS])
def test_ablation_gradients_flow(branches):
    x = jax.random.normal(jax.random.key(3), (2, 29, DIM))
    attn = make(24, branches=branches, use_diff_topk=True)
    graphdef, params, rest = nnx.split(attn, nnx.Param, ...)
    loss = lambda p, x: jnp.sum(jnp.sin(nnx.merge(graphdef, p, rest)(x)))
    gp, gx = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
    assert bool(jnp.all(jnp.isfinite(gx))) and float(jnp.abs(gx).max()) > 0
    grads = nnx.merge(graphdef, gp, rest)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(gp))
    compress_grads = jax.tree.leaves(nnx.state(grads.k_compress, nnx.Param))
    compress_norm = sum(float(jnp.sum(jnp.square(g))) for g in compress_grads)
    if branches == ("sliding",):  # the compress networks take no part
        assert compress_norm == 0.0
    else:  # compressed attention, or the straight-through selection gates, reach them
        assert compress_norm > 0.0


@pytest.mark.parametrize("bad,message", [
    (("compressed", "fine"), "unknown branch 'fine' in branches: use 'compressed', 'selected', 'sliding'"),
    ((), "at least one of"),
    ("", "at least one of"),
    (("sliding", "sliding"), "branch 'sliding' is named twice"),
])
def test_bad_branches_raise_clear_errors(bad, message):
    with pytest.raises(ValueError, match=message) as info:
        make(0, branches=bad)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("branches", [pytest.param(("compressed", "sliding"), marks=pytest.mark.slow),
                                      pytest.param(("sliding",), marks=pytest.mark.slow),
                                      pytest.param(("selected", "sliding"), marks=pytest.mark.slow)])
def test_ablation_cached_decode_matches_parallel_forward(branches):
    """prefill + decode of a model without a branch gives its parallel forward's outputs."""
    n, prompt_len = 30, 7
    attn = make(25, branches=branches, compress_block_size=8, compress_block_sliding_stride=4,
                selection_block_size=4, sliding_window_size=3, use_diff_topk=True)
    x = jax.random.normal(jax.random.key(4), (2, n, DIM))
    graphdef, state = nnx.split(attn)

    @jax.jit
    def cached(state, x):
        m = nnx.merge(graphdef, state)
        out, cache = m.prefill(x[:, :prompt_len], n)

        def step(cache, xt):
            o, cache = m.decode(xt[:, None], cache)
            return cache, o[:, 0]

        _, outs = jax.lax.scan(step, cache, x[:, prompt_len:].transpose(1, 0, 2))
        return jnp.concatenate([out, outs.transpose(1, 0, 2)], axis=1)

    np.testing.assert_allclose(np.asarray(cached(state, x)), np.asarray(run(attn, x)), rtol=1e-5, atol=1e-5)


def test_ablation_pallas_matches_reference():
    x = jax.random.normal(jax.random.key(5), (1, 32, DIM))
    ref = run(make(26, branches=("compressed", "sliding")), x)
    pallas = run(make(26, branches=("compressed", "sliding"), use_pallas_nsa=True), x)
    np.testing.assert_allclose(np.asarray(pallas), np.asarray(ref), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_model_config_nsa_branches():
    from nsa_jax.config import ModelConfig

    config = ModelConfig(dim=DIM, depth=2, heads=HEADS, kv_heads=2, dim_head=DIM_HEAD, sliding_window_size=4,
                         compress_block_size=4, compress_block_sliding_stride=4, selection_block_size=4,
                         num_selected_blocks=2, nsa_branches="sliding")
    assert config.validate() is None
    model = config.build(nnx.Rngs(0))
    assert all(layer.attn.branches == ("sliding",) for layer in model.layers)
    logits = model(jax.random.randint(jax.random.key(0), (1, 20), 0, 256))
    assert logits.shape == (1, 20, 256) and bool(jnp.all(jnp.isfinite(logits)))
    assert ModelConfig.from_dict(config.to_dict()) == config  # round-trips through the checkpoint's JSON
    old = {k: v for k, v in config.to_dict().items() if k != "nsa_branches"}  # a checkpoint from before
    assert ModelConfig.from_dict(old).nsa_branches == "compressed,selected,sliding"
    assert ModelConfig().sparse_attn_kwargs()["branches"] == ALL_BRANCHES
    assert ModelConfig(nsa_branches="compressed, sliding").sparse_attn_kwargs()["branches"] == ("compressed", "sliding")
    problem = ModelConfig(nsa_branches="compressed,fine").validate()
    assert problem is not None and "nsa_branches" in problem and "unknown branch 'fine'" in problem, problem
    assert "at least one" in ModelConfig(nsa_branches="").validate()

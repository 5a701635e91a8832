"""Cached generation: decode-vs-parallel parity, cached-vs-uncached generation, sampling, errors.

The bar: every cached decode step's output equals the parallel forward's output at that
position (float32, max abs diff <= 1e-5), over a grid of SparseAttention settings; greedy
generation with and without the cache is identical, sparse and dense.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nsa_jax import SparseAttention, Transformer, sampling
from nsa_jax.attention import Attention
from nsa_jax.rotary import apply_rotary
from test_sparse_attention import DIM, DIM_HEAD, HEADS, run

TOL = 1e-5  # max abs diff, float32 (the bar)
VOCAB = 64

# (settings, sequence length, prompt lengths). Sequence lengths cross several compression and
# selection blocks; prompts of 1 token, and ending inside / at the end of a block.
GRID = [
    # overlapping compression (stride < block), selection block != stride, GQA (g = 2), diff top-k
    (dict(kv_heads=2, compress_block_size=8, compress_block_sliding_stride=4, selection_block_size=8,
          num_selected_blocks=2, sliding_window_size=5, use_diff_topk=True), 50, (1, 13)),
    # each query head selects its own blocks, g = 4, selection block = 3 strides, grouped MLP
    (dict(kv_heads=1, compress_block_size=4, compress_block_sliding_stride=4, selection_block_size=12,
          num_selected_blocks=3, sliding_window_size=3, query_heads_share_selected_kv=False,
          compress_mlp="grouped_mlp"), 53, (4, 9)),
    # 0 selected blocks (fine = own block only), overlapping compression, no GQA, conv compress
    (dict(kv_heads=4, compress_block_size=4, compress_block_sliding_stride=2, selection_block_size=4,
          num_selected_blocks=0, sliding_window_size=2, compress_mlp="conv_linear"), 41, (6,)),
    # interpolated importance, selection block < stride, attention-pool compress
    (dict(kv_heads=2, compress_block_size=8, compress_block_sliding_stride=8, selection_block_size=4,
          num_selected_blocks=3, sliding_window_size=7, interpolated_importance_score=True,
          compress_mlp="attention_pool"), 47, (3,)),
    # interpolated, selection block not a multiple of the stride; heads select separately, diff top-k
    (dict(kv_heads=2, compress_block_size=8, compress_block_sliding_stride=4, selection_block_size=6,
          num_selected_blocks=2, sliding_window_size=4, interpolated_importance_score=True,
          query_heads_share_selected_kv=False, use_diff_topk=True), 45, (8,)),
    # stride 3, two memory entries, sliding window 0 (the token alone), single projection compress
    (dict(kv_heads=2, compress_block_size=6, compress_block_sliding_stride=3, selection_block_size=6,
          num_selected_blocks=2, sliding_window_size=0, num_compressed_mem_kv=2, use_diff_topk=True,
          compress_mlp="single_projection"), 44, (5,)),
    # the seed's shape of settings (block = stride = selection = 16, 4 selected, grouped MLP)
    (dict(kv_heads=2, compress_block_size=16, compress_block_sliding_stride=16, selection_block_size=16,
          num_selected_blocks=4, sliding_window_size=64, use_diff_topk=True, compress_mlp="grouped_mlp"),
     70, (2, 33)),
    # the same, shorter than one stride: no compressed entry ever (memory only), the window
    # covers the whole cache (the unsliced sliding path)
    (dict(kv_heads=2, compress_block_size=16, compress_block_sliding_stride=16, selection_block_size=16,
          num_selected_blocks=4, sliding_window_size=64, use_diff_topk=True, compress_mlp="grouped_mlp"),
     12, (3,)),
    # more selected blocks than exist for most of the sequence; prompt shorter than one stride
    (dict(kv_heads=2, compress_block_size=4, compress_block_sliding_stride=4, selection_block_size=4,
          num_selected_blocks=5, sliding_window_size=3), 30, (2,)),
]
# The quick tier: the seed's shape (per-head selection: the slow tier).
QUICK_CASES = {(6, 33)}
CASES = [pytest.param(i, p, id=f"{i}-{p}", marks=() if (i, p) in QUICK_CASES else pytest.mark.slow)
         for i, (_, _, prompts) in enumerate(GRID) for p in prompts]


def perturb(module: nnx.Module, seed: int, scale: float = 0.5) -> None:
    """Move every parameter away from its init, zero-initialised ones too, by noise of std
    scale * max(std(param), 0.2): tests/golden/make_golden.py's rule, which keeps activations
    O(1) so that an absolute 1e-5 bar measures the algorithm, not float32's ulp at large values."""
    params = nnx.state(module, nnx.Param)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    std = lambda x: float(jnp.std(x)) if x.size > 1 else 0.0
    leaves = [x + scale * max(std(x), 0.2) * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    nnx.update(module, jax.tree.unflatten(treedef, leaves))


def make_sparse(seed: int, **settings) -> SparseAttention:
    attn = SparseAttention(dim=DIM, dim_head=DIM_HEAD, heads=HEADS, causal=True, rngs=nnx.Rngs(seed), **settings)
    perturb(attn, seed)
    return attn


def cached_outputs(module: nnx.Module, x: jax.Array, prompt_len: int):
    """Prefill x[:, :P], then decode x[:, P:] one token at a time (one jitted scan).

    Returns (outputs [b, n, dim]: prefill's then each decode step's, the final cache)."""
    graphdef, state = nnx.split(module)
    n = x.shape[1]

    @jax.jit
    def go(state, x):
        m = nnx.merge(graphdef, state)
        out, cache = m.prefill(x[:, :prompt_len], n)

        def step(cache, xt):  # xt [b, dim]
            o, cache = m.decode(xt[:, None], cache)
            return cache, o[:, 0]

        cache, outs = jax.lax.scan(step, cache, x[:, prompt_len:].transpose(1, 0, 2))
        return jnp.concatenate([out, outs.transpose(1, 0, 2)], axis=1), cache

    return go(state, x)


def max_diff(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b))) if a.size else 0.0


@pytest.mark.parametrize("case,prompt_len", CASES)
def test_sparse_decode_matches_parallel_forward(case, prompt_len):
    settings, n, _ = GRID[case]
    attn = make_sparse(20 + case, **settings)
    x = jax.random.normal(jax.random.key(case * 100 + prompt_len), (2, n, DIM))
    parallel = run(attn, x)
    cached, cache = cached_outputs(attn, x, prompt_len)
    err = max_diff(cached, parallel)
    assert err <= TOL, f"decode vs parallel forward: max abs diff {err:.3g}"

    # the final cache holds what the parallel forward computes over all n tokens
    _, _, k, v = attn.project(x)
    ck, cv = attn.compress(k, v)
    cs, cb = attn.compress_block_sliding_stride, attn.compress_block_size
    assert int(cache.length) == n
    assert max_diff(cache.k[:, :n], apply_rotary(k, jnp.arange(n))) <= TOL
    assert max_diff(cache.v[:, :n], v) <= TOL
    assert cache.ck.shape[1] == n // cs
    assert max_diff(cache.ck, ck) <= TOL and max_diff(cache.cv, cv) <= TOL
    assert max_diff(cache.tail_k[:, max(cb - n, 0):], k[:, max(n - cb, 0):]) <= TOL


@pytest.mark.parametrize("kv_heads,prompt_len", [(2, 1), pytest.param(4, 7, marks=pytest.mark.slow)])
def test_dense_decode_matches_parallel_forward(kv_heads, prompt_len):
    attn = Attention(dim=DIM, dim_head=DIM_HEAD, heads=HEADS, kv_heads=kv_heads, rngs=nnx.Rngs(kv_heads))
    perturb(attn, kv_heads)
    x = jax.random.normal(jax.random.key(prompt_len), (2, 37, DIM))
    cached, cache = cached_outputs(attn, x, prompt_len)
    err = max_diff(cached, run(attn, x))
    assert err <= TOL, f"decode vs parallel forward: max abs diff {err:.3g}"
    assert int(cache.length) == 37


# --------------------------------------------------------------------------------------
# the Transformer


SPARSE_KWARGS = dict(sliding_window_size=5, compress_block_size=8, compress_block_sliding_stride=4,
                     selection_block_size=8, num_selected_blocks=2, use_diff_topk=True)


def make_model(sparse: bool, seed: int = 0, **kwargs) -> Transformer:
    model = Transformer(num_tokens=VOCAB, dim=DIM, depth=2, dim_head=DIM_HEAD, heads=HEADS, kv_heads=2,
                        use_sparse_attn=sparse, sparse_attn_kwargs=SPARSE_KWARGS, rngs=nnx.Rngs(seed), **kwargs)
    perturb(model, seed)
    return model


def cached_logits(model: Transformer, ids: jax.Array, prompt_len: int) -> jax.Array:
    """Teacher-forced: prefill ids[:, :P], then decode ids[:, P:-1]; logits [b, n - 1, vocab] for positions < n - 1."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def go(state, ids):
        m = nnx.merge(graphdef, state)
        logits, caches = sampling.prefill(m, ids[:, :prompt_len], ids.shape[1])

        def step(caches, token):
            out, caches = sampling.decode_step(m, token, caches)
            return caches, out

        _, steps = jax.lax.scan(step, caches, ids[:, prompt_len:-1].T)
        return jnp.concatenate([logits, steps.transpose(1, 0, 2)], axis=1)

    return go(state, ids)


# Sparse: the slow tier (15 s here); the quick tier checks sparse decoding layer by layer
# (test_sparse_decode_matches_parallel_forward) and the Transformer's loop with dense attention.
@pytest.mark.parametrize("sparse", [pytest.param(True, marks=pytest.mark.slow), False])
def test_transformer_decode_logits_match_parallel_forward(sparse):
    model = make_model(sparse)
    ids = jax.random.randint(jax.random.key(3), (2, 45), 0, VOCAB)
    parallel = np.asarray(model(ids))[:, :-1]
    cached = np.asarray(cached_logits(model, ids, prompt_len=6))
    err = max_diff(cached, parallel)
    assert err <= TOL, f"max abs diff {err:.3g}"


@pytest.mark.parametrize("sparse", [pytest.param(True, marks=pytest.mark.slow), False])
def test_greedy_generation_with_and_without_cache_is_identical(sparse):
    model = make_model(sparse, seed=1)
    prompt = jax.random.randint(jax.random.key(4), (2, 7), 0, VOCAB)
    cached = model.sample(prompt, 40, temperature=0.0)
    uncached = model.sample(prompt, 40, temperature=0.0, use_cache_kv=False)
    assert cached.shape == (2, 33) and cached.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(cached), np.asarray(uncached))
    # and greedy means argmax of the parallel forward at every position
    ids = jnp.concatenate([prompt, cached], axis=1)
    np.testing.assert_array_equal(np.asarray(jnp.argmax(model(ids)[:, 6:-1], -1)), np.asarray(cached))


@pytest.mark.slow
def test_sampling_with_and_without_cache_is_identical_and_within_top_k():
    model = make_model(True, seed=2)
    prompt = jax.random.randint(jax.random.key(5), (3, 5), 0, VOCAB)
    kw = dict(temperature=0.8, filter_thres=0.9, rng=jax.random.key(11))
    cached = model.sample(prompt, 36, **kw)
    np.testing.assert_array_equal(np.asarray(cached), np.asarray(model.sample(prompt, 36, use_cache_kv=False, **kw)))
    ids = jnp.concatenate([prompt, cached], axis=1)
    logits = np.asarray(model(ids)[:, 4:-1])  # the logits each token was drawn from
    k = sampling.filter_top_k(0.9, VOCAB)
    kth = np.sort(logits, axis=-1)[..., -k]
    drawn = np.take_along_axis(logits, np.asarray(cached)[..., None], -1)[..., 0]
    assert np.all(drawn >= kth)
    assert len(np.unique(np.asarray(cached))) > 3  # not greedy
    other = model.sample(prompt, 36, temperature=0.8, rng=jax.random.key(12))
    assert np.any(np.asarray(other) != np.asarray(cached))
    np.testing.assert_array_equal(np.asarray(model.sample(prompt, 36, temperature=0.8)),
                                  np.asarray(model.sample(prompt, 36, temperature=0.8, rng=0)))  # default key 0


def test_one_compiled_program_reused_across_prompts():
    model = make_model(True, seed=3)
    before = sampling._generate._cache_size()
    a = model.sample(jnp.arange(5)[None], 20, temperature=0.0)
    b = model.sample(jnp.arange(5, 10)[None], 20, temperature=0.0)
    assert sampling._generate._cache_size() == before + 1  # same shapes: traced once
    assert np.any(np.asarray(a) != np.asarray(b))
    graphdef, state = nnx.split(model)
    hlo = sampling._generate.lower(graphdef, state, jnp.zeros((1, 5), jnp.int32), jax.random.key(0),
                                   jnp.float32(0.0), seq_len=20, greedy=True, top_k=VOCAB,
                                   use_cache_kv=True).as_text()
    assert "while" in hlo  # the decode steps run as one loop, not unrolled


def test_unbatched_prompt_and_bfloat16_model():
    """A [P] prompt gives the tokens of the [1, P] prompt (same key), with bfloat16 activations too."""
    model = make_model(True, seed=4, dtype=jnp.bfloat16)
    out = model.sample(jnp.array([1, 2, 3]), 30, temperature=1.0, rng=5)
    batched = model.sample(jnp.array([[1, 2, 3]]), 30, temperature=1.0, rng=5)
    assert out.shape == (27,) and out.dtype == jnp.int32 and int(out.min()) >= 0 and int(out.max()) < VOCAB
    np.testing.assert_array_equal(np.asarray(out), np.asarray(batched[0]))
    assert len(set(np.asarray(out).tolist())) > 1  # sampled, not a constant


# --------------------------------------------------------------------------------------
# sampling


def test_top_k_count_and_filter():
    assert sampling.filter_top_k(0.9, 256) == 26  # the spec's example
    assert sampling.filter_top_k(0.0, 256) == 256
    logits = jax.random.normal(jax.random.key(0), (4, 256))
    kept = sampling.top_k_logits(logits, 26)
    finite = np.isfinite(np.asarray(kept))
    assert np.all(finite.sum(-1) == 26)
    np.testing.assert_array_equal(np.asarray(kept)[finite], np.asarray(logits)[finite])
    assert np.all(np.asarray(logits)[finite].reshape(4, 26).min(-1) >= np.sort(np.asarray(logits), -1)[:, -26])


def test_greedy_and_gumbel_sampling_distribution():
    logits = jnp.array([[0.5, 2.0, -1.0, 1.0, 0.0, -3.0]])
    greedy = sampling.sample_logits(logits, jax.random.key(0), jnp.float32(0.0), greedy=True, top_k=6)
    assert int(greedy[0]) == 1
    keys = jax.random.split(jax.random.key(1), 40000)
    draw = jax.jit(jax.vmap(lambda k: sampling.sample_logits(logits, k, jnp.float32(0.7), greedy=False, top_k=3)[0]))
    counts = np.bincount(np.asarray(draw(keys)), minlength=6) / len(keys)
    top3 = np.array([1, 3, 0])
    expected = np.zeros(6)
    expected[top3] = np.asarray(jax.nn.softmax(logits[0, top3] / 0.7))
    np.testing.assert_allclose(counts, expected, atol=0.01)  # ~5 standard deviations
    # a tiny temperature samples the argmax
    cold = sampling.sample_logits(logits, jax.random.key(2), jnp.float32(1e-6), greedy=False, top_k=3)
    assert int(cold[0]) == 1


# --------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("call,message", [
    (lambda m: m.sample(jnp.zeros((1, 8), jnp.int32), 8), r"seq_len \(8\) must be greater than the prompt length"),
    (lambda m: m.sample(jnp.zeros((1, 8), jnp.int32), 4), r"seq_len \(4\) must be greater"),
    (lambda m: m.sample(jnp.zeros((1, 8)), 12), "integer token ids"),
    (lambda m: m.sample(jnp.zeros((1, 2, 8), jnp.int32), 12), "integer token ids"),
    (lambda m: m.sample(jnp.zeros((1, 0), jnp.int32), 12), "prompt is empty"),
    (lambda m: m.sample(jnp.full((1, 3), VOCAB), 12), r"token ids must be in \[0, 64\)"),
    (lambda m: m.sample(jnp.zeros((1, 3), jnp.int32), 12, filter_thres=1.0), "filter_thres"),
])
def test_bad_input_raises_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call(make_model(True))


@pytest.mark.parametrize("use_cache_kv", [True, False])
def test_non_causal_model_cannot_sample(use_cache_kv):
    model = Transformer(num_tokens=VOCAB, dim=DIM, depth=1, dim_head=DIM_HEAD, heads=HEADS, causal=False,
                        use_sparse_attn=True, sparse_attn_kwargs=SPARSE_KWARGS, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="causal"):
        model.sample(jnp.zeros((1, 3), jnp.int32), 12, use_cache_kv=use_cache_kv)


def test_non_causal_attention_has_no_cache():
    attn = SparseAttention(dim=DIM, dim_head=DIM_HEAD, heads=HEADS, sliding_window_size=2, compress_block_size=4,
                           selection_block_size=4, num_selected_blocks=1, causal=False, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="causal"):
        attn.prefill(jnp.ones((1, 4, DIM)), 8)

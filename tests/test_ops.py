"""`nsa_jax.ops.native_sparse_attention`: fla's semantics, checked three ways.

1. The reference backend against a loop-per-query numpy oracle written from fla-core 0.6.0's
   kernels (this file: `naive_nsa`), causal and not, packed documents, with and without window.
2. The Pallas backend (interpreted on CPU, Triton on GPU) against the reference backend:
   outputs and every gradient (q, k, v, gates, a user compress function's parameters).
3. The function as a user calls it: jit, vmap, chunked selection, one-line errors.
Parity with fla itself (its GPU outputs and gradients): tests/test_ops_fla_parity.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_testing import assert_close, check_vjp, randn
from nsa_jax import fla_reference as fla
from nsa_jax import segments as seg
from nsa_jax.ops import NSAInputError, native_sparse_attention


def _docs(ids: np.ndarray) -> list[tuple[int, int]]:
    """Runs of equal ids -> [(start, end)]."""
    bounds = [0] + [i for i in range(1, len(ids)) if ids[i] != ids[i - 1]] + [len(ids)]
    return list(zip(bounds[:-1], bounds[1:]))


def _softmax_attend(logits: np.ndarray, values: np.ndarray) -> np.ndarray:
    p = np.exp(logits - logits.max())
    return (p / p.sum()) @ values


def naive_nsa(q, k, v, g_cmp, g_slc, g_swa, *, block_size, block_count, window_size, causal, segment_ids, scale):
    """float64 loops over batch, document, query and kv head: fla's semantics, read off its kernels."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, n, h, d = q.shape
    kh = k.shape[2]
    g = h // kh
    bs = block_size
    out = np.zeros_like(q)
    for bi in range(b):
        ids = np.zeros(n, int) if segment_ids is None else np.asarray(segment_ids[bi])
        for s0, s1 in _docs(ids):
            length = s1 - s0
            kd, vd = k[bi, s0:s1], v[bi, s0:s1]
            nc = length // bs
            ck = np.stack([kd[c * bs:(c + 1) * bs].mean(0) for c in range(nc)]) if nc else np.zeros((0, kh, d))
            cv = np.stack([vd[c * bs:(c + 1) * bs].mean(0) for c in range(nc)]) if nc else np.zeros((0, kh, d))
            for t in range(length):
                own = t // bs
                visible = (t + 1) // bs if causal else nc
                for kv in range(kh):
                    heads = range(kv * g, (kv + 1) * g)
                    score = np.zeros(-(-length // bs))
                    o_cmp = {}
                    for hh in heads:
                        qv = q[bi, s0 + t, hh]
                        if visible:
                            logits = ck[:visible, kv] @ qv * scale
                            p = np.exp(logits - logits.max())
                            p /= p.sum()
                            score[:visible] += p
                            o_cmp[hh] = p @ cv[:visible, kv]
                        else:
                            o_cmp[hh] = np.zeros(d)
                    candidates = range(own) if causal else range(len(score))
                    forced = {0, own - 1, own}
                    ranked = sorted(set(candidates) | forced - {-1}, key=lambda c: (-(np.inf if c in forced else score[c]), c))
                    picked = ranked[:block_count]
                    keys = sorted(s for c in picked for s in range(c * bs, min((c + 1) * bs, length)) if not causal or s <= t)
                    if causal:
                        window = [s for s in range(max(0, t - window_size + 1), t + 1)]
                    else:
                        window = [s for s in range(length) if abs(s - t) < window_size]
                    for hh in heads:
                        qv = q[bi, s0 + t, hh]
                        o_slc = _softmax_attend(kd[keys, kv] @ qv * scale, vd[keys, kv])
                        o = g_cmp[bi, s0 + t, hh] * o_cmp[hh] + g_slc[bi, s0 + t, hh] * o_slc
                        if window_size:
                            o = o + g_swa[bi, s0 + t, hh] * _softmax_attend(kd[window, kv] @ qv * scale, vd[window, kv])
                        out[bi, s0 + t, hh] = o
    return out


CASES = {
    # name: (b, n, h, kh, d, block_size, block_count, window_size, causal, packed)
    "causal_g2": (2, 45, 4, 2, 16, 8, 3, 0, True, False),
    "causal_window_g4": (1, 64, 4, 1, 16, 8, 4, 5, True, False),
    "causal_many_blocks": (1, 70, 2, 2, 8, 4, 6, 3, True, False),
    "packed_causal": (2, 60, 4, 2, 16, 8, 3, 4, True, True),
    "noncausal": (1, 40, 4, 2, 16, 8, 3, 3, False, False),
    "packed_noncausal": (1, 50, 2, 1, 16, 8, 2, 2, False, True),
}


def _inputs(case, dtype=jnp.float32, seed=0):
    b, n, h, kh, d, *_ = case
    keys = jax.random.split(jax.random.key(seed), 7)
    q, k, v = randn(keys[0], (b, n, h, d), dtype), randn(keys[1], (b, n, kh, d), dtype), randn(keys[2], (b, n, kh, d), dtype)
    gates = [jax.nn.sigmoid(randn(keys[3 + i], (b, n, h))).astype(dtype) for i in range(3)]
    ids = None
    if case[-1]:  # documents of random lengths, some shorter than a block
        lengths = np.random.default_rng(seed).integers(1, 3 * case[5], size=(b, n))
        ids = jnp.asarray(np.stack([np.repeat(np.arange(n), row)[:n] for row in lengths]))
    return (q, k, v, *gates), ids


def _call(args, ids, case, backend, **extra):
    q, k, v, g_cmp, g_slc, g_swa = args
    *_, block_size, block_count, window_size, causal, _ = case
    return native_sparse_attention(q, k, v, g_cmp=g_cmp, g_slc=g_slc, g_swa=g_swa if window_size else None,
                                   block_size=block_size, block_count=block_count, window_size=window_size,
                                   causal=causal, segment_ids=ids, backend=backend, **extra)


QUICK_ORACLE = {"causal_g2"}


@pytest.mark.parametrize("name", [pytest.param(name, marks=() if name in QUICK_ORACLE else pytest.mark.slow)
                                  for name in CASES])
def test_reference_backend_matches_naive_oracle(name):
    case = CASES[name]
    args, ids = _inputs(case)
    got = _call(args, ids, case, "reference")
    *_, block_size, block_count, window_size, causal, _ = case
    want = naive_nsa(*[np.asarray(a) for a in args], block_size=block_size, block_count=block_count,
                     window_size=window_size, causal=causal, segment_ids=None if ids is None else np.asarray(ids),
                     scale=case[4] ** -0.5)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-6, rtol=1e-5)


CASES_PALLAS = {**CASES, "noncausal_aligned": (1, 48, 4, 2, 16, 8, 3, 3, False, False)}
PALLAS = [  # (case, dtype, quick tier)
    ("causal_window_g4", jnp.float32, False), ("causal_window_g4", jnp.bfloat16, False),
    ("packed_causal", jnp.float32, True), ("packed_causal", jnp.bfloat16, False),
    ("causal_g2", jnp.bfloat16, False), ("causal_many_blocks", jnp.float32, False),
    ("noncausal_aligned", jnp.float32, False),
]


@pytest.mark.parametrize("name,dtype", [
    pytest.param(name, dtype, id=f"{name}-{jnp.dtype(dtype).name}", marks=() if quick else pytest.mark.slow)
    for name, dtype, quick in PALLAS])
def test_pallas_backend_matches_reference(name, dtype):
    case = CASES_PALLAS[name]
    args, ids = _inputs(case, dtype, seed=1)
    names = ["q", "k", "v", "g_cmp", "g_slc", "g_swa"]
    check_vjp("ops", lambda *a: _call(a, ids, case, "pallas"), lambda *a: _call(a, ids, case, "reference"),
              list(args), names, dtype, jax.random.key(9), case=name)


@pytest.mark.slow
def test_compress_function_is_differentiated_on_both_backends():
    """A user's compress function (a learned projection of each block) gets the same gradients."""
    case = CASES["causal_window_g4"]
    args, _ = _inputs(case)
    d, bs = case[4], case[5]
    weight = randn(jax.random.key(5), (bs, d, d)) / (bs * d) ** 0.5

    def loss(w, backend):
        compress = lambda blocks: jnp.einsum("bcskd,sde->bcke", blocks, w)  # noqa: E731
        return jnp.sum(_call(args, None, case, backend, compress=compress) ** 2)

    ref = jax.value_and_grad(loss)(weight, "reference")
    got = jax.value_and_grad(loss)(weight, "pallas")
    assert_close("ops", "loss", got[0], ref[0], jnp.float32)
    assert_close("ops", "dweight", got[1], ref[1], jnp.float32)
    assert float(jnp.abs(ref[1]).max()) > 0


@pytest.mark.parametrize("backend", ["reference", pytest.param("pallas", marks=pytest.mark.slow)])
def test_jit_and_vmap(backend):
    case = CASES["causal_g2"]
    args, _ = _inputs(case)
    fn = jax.jit(lambda *a: _call(a, None, case, backend))
    stacked = [jnp.stack([a, a[::-1]]) for a in args]  # a leading axis over two batches
    got = jax.vmap(fn)(*stacked)
    for i in range(2):
        np.testing.assert_allclose(np.asarray(got[i]), np.asarray(fn(*[s[i] for s in stacked])), atol=1e-6)


@pytest.mark.slow
def test_shard_map_over_the_batch():
    """Inside a user's jax.shard_map (the batch over a 'data' axis of every device), forward and
    gradients, as in a data-parallel train step; with check_vma=True the Pallas backend says what to do."""
    from jax.sharding import PartitionSpec as P

    case = CASES["packed_causal"]
    args, ids = _inputs(case)
    mesh = jax.make_mesh((len(jax.devices()),), ("data",))
    loss = lambda backend: lambda a, i: jnp.sum(_call(a, i, case, backend) ** 2)  # noqa: E731
    want = jax.value_and_grad(loss("reference"))(args, ids)
    args, ids = jax.device_put((args, ids), jax.sharding.NamedSharding(mesh, P("data")))
    for backend in ("reference", "pallas"):
        def per_shard(a, i, backend=backend):  # the loss is a sum: the shards' losses add up, their gradients are slices
            value, grads = jax.value_and_grad(loss(backend))(a, i)
            return value[None], grads

        # JAX 0.11.2's pallas_call has no varying-axes types: the kernels need check_vma=False.
        got = jax.jit(jax.shard_map(per_shard, mesh=mesh, in_specs=P("data"), out_specs=P("data"),
                                    check_vma=backend == "reference"))(args, ids)
        assert_close("ops", f"shard_map {backend} loss", got[0].sum(), want[0], jnp.float32)
        for name, g_got, g_want in zip(["q", "k", "v", "g_cmp", "g_slc", "g_swa"], got[1], want[1]):
            assert_close("ops", f"shard_map {backend} d{name}", g_got, g_want, jnp.float32)
    with pytest.raises(NSAInputError, match="check_vma=False"):
        jax.shard_map(lambda a, i: _call(a, i, case, "pallas"), mesh=mesh, in_specs=P("data"), out_specs=P("data"))(
            args, ids)


@pytest.mark.parametrize("change,message", [
    (dict(k=jnp.zeros((2, 45, 3, 16))), "multiple of kv heads"),
    (dict(g_cmp=jnp.zeros((2, 45))), "g_cmp must be [batch, seq_len, heads]"),
    (dict(block_size=0), "block_size must be a positive int"),
    (dict(window_size=4), "g_swa must be"),
    (dict(block_count=2.5), "must be integers"),
    (dict(compress="max"), "compress must be 'mean'"),
    (dict(segment_ids=jnp.zeros((2, 44), jnp.int32)), "segment_ids must be [batch, seq_len]"),
    (dict(backend="triton"), "backend must be None"),
    (dict(causal=False, backend="pallas"), "causal=False on the Pallas backend needs seq_len (45) a multiple"),
])
def test_bad_arguments_raise_one_line(change, message):
    (q, k, v, g_cmp, g_slc, _), _ = _inputs(CASES["causal_g2"])
    kwargs = dict(k=k, g_cmp=g_cmp, g_slc=g_slc, block_size=8, block_count=3)
    kwargs.update(change)
    k_arg = kwargs.pop("k")
    with pytest.raises(NSAInputError) as err:
        native_sparse_attention(q, k_arg, v if k_arg.shape == k.shape else k_arg, **kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("name,dtype", [
    pytest.param(name, dtype, id=f"{name}-{jnp.dtype(dtype).name}", marks=() if quick else pytest.mark.slow)
    for name, dtype, quick in [("packed_causal", jnp.float32, True), ("causal_many_blocks", jnp.float32, False),
                               ("causal_g2", jnp.bfloat16, False), ("noncausal", jnp.float32, False),
                               ("packed_noncausal", jnp.float32, False), ("causal_window_g4", jnp.bfloat16, False)]])
def test_selection_kernel_picks_what_the_reference_picks(name, dtype):
    """kernels.fla_selection against nsa_jax.fla_reference.select_blocks: the same blocks in the same order."""
    from kernels.fla_selection import select_blocks

    case = CASES[name]
    (q, k, *_), ids = _inputs(case, dtype, seed=3)
    b, n, *_ = q.shape
    block_size, block_count, causal = case[5], case[6], case[8]
    segments = seg.from_ids(ids) if ids is not None else fla.single_document(b, n)
    ck = fla.compress(k, block_size, fla.mean_pool, segments if ids is not None else None)
    kw = dict(block_size=block_size, block_count=block_count, causal=causal, scale=case[4] ** -0.5)
    want = fla.select_blocks(q.astype(jnp.float32), ck.astype(jnp.float32), segments, **kw)
    got = select_blocks(q, ck, segments, **kw)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

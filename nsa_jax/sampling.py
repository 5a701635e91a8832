"""Generation as one compiled program: prefill, a `lax` loop of fixed-shape decode steps, sampling.

`sample(model, prompt, seq_len)` (what `Transformer.sample` calls) splits the NNX model once
and runs `_generate`, jitted on (graphdef, state) with static lengths, so that one call is
one XLA program and repeated calls with the same shapes reuse it:

  use_cache_kv=True:  prefill (the parallel forward over the prompt, building each layer's
                      cache of length seq_len) -> first token; then a `lax.fori_loop` of
                      decode steps (one token through every layer's cache) -> next token.
  use_cache_kv=False: a `lax.fori_loop` that reruns the parallel forward over a fixed buffer
                      of seq_len tokens (prompt, then generated tokens, then zero padding;
                      causal, so the padding does not change earlier positions).

Both give the same logits (to float rounding) at every position, hence the same greedy tokens.
Sampling follows the PyTorch package: top ceil((1 - filter_thres) * vocab) logits kept, Gumbel
noise added to logits / max(temperature, 1e-10), argmax; greedy argmax when temperature <= 0.
Step i draws its noise from `jax.random.fold_in(rng, i)` on both paths.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nsa_jax.attention import SparseAttention
from nsa_jax.numerics import F32
Cache = Any  # nsa_jax.cache.SparseCache | nsa_jax.cache.DenseCache


# --------------------------------------------------------------------------------------
# the model, with caches


def prefill(model: nnx.Module, ids: jax.Array, max_len: int) -> tuple[jax.Array, list[Cache]]:
    """ids [b, P] -> (logits [b, P, vocab], each layer's cache of length max_len after P tokens)."""
    x = model.token_emb(ids, dtype=model.dtype)  # [b, P, dim]
    caches = []
    for layer in model.layers:
        x, cache = layer.prefill(x, max_len)
        caches.append(cache)
    return model.to_logits(model.norm(x)), caches


def decode_step(model: nnx.Module, token: jax.Array, caches: list[Cache]) -> tuple[jax.Array, list[Cache]]:
    """token [b] at position caches[i].length -> (logits [b, vocab], caches one token longer).

    Sparse layers defer compressing a completed window to one `lax.cond` per step over all of
    them (per distinct stride): one branch point per token instead of one per layer.
    """
    x = model.token_emb(token[:, None], dtype=model.dtype)  # [b, 1, dim]
    caches = list(caches)
    deferred: dict[int, list[int]] = {}  # stride -> layers whose compression waits for the cond
    for i, layer in enumerate(model.layers):
        if isinstance(layer.attn, SparseAttention) and caches[i].ck.shape[1] > 0:
            x, caches[i] = layer.decode(x, caches[i], compress=False)
            deferred.setdefault(layer.attn.compress_block_sliding_stride, []).append(i)
        else:
            x, caches[i] = layer.decode(x, caches[i])
    for group in deferred.values():
        def compress_group(group_caches, group=group):
            return [model.layers[i].attn.compress_tail(c) for i, c in zip(group, group_caches)]

        due = model.layers[group[0]].attn.window_complete(caches[group[0]])  # same length and stride in the group
        done = jax.lax.cond(due, compress_group, lambda c: c, [caches[i] for i in group])
        for i, c in zip(group, done):
            caches[i] = c
    return model.to_logits(model.norm(x))[:, 0], caches


# --------------------------------------------------------------------------------------
# sampling


def filter_top_k(filter_thres: float, vocab: int) -> int:
    """How many logits the top-k filter keeps: ceil((1 - filter_thres) * vocab) (0.9, 256 -> 26)."""
    if not 0.0 <= filter_thres < 1.0:
        raise ValueError(f"filter_thres ({filter_thres}) must be in [0, 1): the top ceil((1 - filter_thres) * vocab) "
                         "logits are kept")
    return min(vocab, math.ceil((1.0 - filter_thres) * vocab))


def top_k_logits(logits: jax.Array, k: int) -> jax.Array:
    """Keep the k largest logits [b, vocab] (exactly k, ties by index), the others -inf."""
    values, indices = jax.lax.top_k(logits, k)
    rows = jnp.arange(logits.shape[0])[:, None]
    return jnp.full_like(logits, -jnp.inf).at[rows, indices].set(values)


def gumbel_noise(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """-log(-log(u)), u ~ U[0, 1), with the package's clamp of log's argument at 1e-20."""
    log = lambda x: jnp.log(jnp.maximum(x, 1e-20))
    return -log(-log(jax.random.uniform(key, shape, F32)))


def sample_logits(logits: jax.Array, key: jax.Array, temperature: jax.Array, *, greedy: bool, top_k: int) -> jax.Array:
    """logits [b, vocab] -> tokens [b] int32: argmax if greedy, else top-k filter + Gumbel sampling."""
    logits = logits.astype(F32)
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = top_k_logits(logits, top_k)
    noisy = logits / jnp.maximum(temperature, 1e-10) + gumbel_noise(key, logits.shape)
    return jnp.argmax(noisy, axis=-1).astype(jnp.int32)


# --------------------------------------------------------------------------------------
# the compiled program


@functools.partial(jax.jit, static_argnames=("graphdef", "seq_len", "greedy", "top_k", "use_cache_kv"))
def _generate(graphdef, state, prompt: jax.Array, key: jax.Array, temperature: jax.Array, *, seq_len: int,
              greedy: bool, top_k: int, use_cache_kv: bool) -> jax.Array:
    """prompt [b, P] int32 -> the seq_len - P generated tokens [b, seq_len - P] int32."""
    model = nnx.merge(graphdef, state)
    b, p = prompt.shape
    num_new = seq_len - p
    sample = lambda logits, i: sample_logits(logits, jax.random.fold_in(key, i), temperature,
                                             greedy=greedy, top_k=top_k)
    if use_cache_kv:
        logits, caches = prefill(model, prompt, seq_len)
        out = jnp.zeros((b, num_new), jnp.int32).at[:, 0].set(sample(logits[:, -1], 0))

        def step(i, carry):  # token i - 1 (position p + i - 1) in, token i out
            out, caches = carry
            logits, caches = decode_step(model, out[:, i - 1], caches)
            return out.at[:, i].set(sample(logits, i)), caches

        out, _ = jax.lax.fori_loop(1, num_new, step, (out, caches))
        return out

    def step(i, ids):  # ids [b, seq_len]: token p + i from the forward over the buffer
        x = jax.lax.dynamic_index_in_dim(model.hidden(ids), p + i - 1, axis=1, keepdims=False)  # [b, dim]
        token = sample(model.to_logits(model.norm(x)), i)
        return jax.lax.dynamic_update_index_in_dim(ids, token, p + i, axis=1)

    ids = jnp.zeros((b, seq_len), jnp.int32).at[:, :p].set(prompt)
    return jax.lax.fori_loop(0, num_new, step, ids)[:, p:]


def _as_key(rng) -> jax.Array:
    if rng is None:
        return jax.random.key(0)
    if isinstance(rng, int):
        return jax.random.key(rng)
    if isinstance(rng, jax.Array) and not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(rng)  # a raw uint32 key (jax.random.PRNGKey)
    return rng


def sample(
    model: nnx.Module,
    prompt: jax.Array,
    seq_len: int,
    *,
    temperature: float = 1.0,
    filter_thres: float = 0.9,
    use_cache_kv: bool = True,
    rng: jax.Array | int | None = None,
) -> jax.Array:
    """Generate from a Transformer: prompt [b, P] (or [P]) token ids -> the seq_len - P next tokens.

    `seq_len` is the total length (prompt included), as in the PyTorch package. Greedy when
    temperature <= 0. `rng`: a `jax.random` key or an int seed (default key 0).
    """
    prompt = jnp.asarray(prompt)
    unbatched = prompt.ndim == 1
    if unbatched:
        prompt = prompt[None]
    if prompt.ndim != 2 or not jnp.issubdtype(prompt.dtype, jnp.integer):
        raise ValueError(f"prompt must be integer token ids [batch, length] or [length]; got {prompt.dtype} "
                         f"{prompt.shape}")
    b, p = prompt.shape
    if p < 1:
        raise ValueError("prompt is empty: give at least one token to start from")
    if seq_len <= p:
        raise ValueError(f"seq_len ({seq_len}) must be greater than the prompt length ({p}): seq_len is the total "
                         "length, prompt included")
    if not model.causal:
        raise ValueError("sampling needs a causal model (Transformer(causal=True)); this one attends to the future")
    vocab = model.num_tokens
    if not isinstance(prompt, jax.core.Tracer):
        lo, hi = int(np.min(prompt)), int(np.max(prompt))
        if lo < 0 or hi >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab}); got values in [{lo}, {hi}]")
    greedy = temperature <= 0
    top_k = filter_top_k(filter_thres, vocab) if not greedy else vocab
    graphdef, state = nnx.split(model)
    out = _generate(graphdef, state, prompt.astype(jnp.int32), _as_key(rng), jnp.asarray(temperature, F32),
                    seq_len=seq_len, greedy=greedy, top_k=top_k, use_cache_kv=use_cache_kv)
    return out[0] if unbatched else out

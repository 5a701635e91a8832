"""The passkey retrieval task (nsa_jax.passkey) and the loss mask it trains with."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from nsa_jax import passkey
from nsa_jax.config import ModelConfig
from nsa_jax.training import Trainer, make_optimizer

# The loss mask is the Transformer's, whatever its attention: dense attention compiles fastest.
TINY = ModelConfig(dim=32, depth=2, heads=4, kv_heads=2, dim_head=8, use_sparse_attn=False)


def text(tokens) -> str:
    return bytes(np.asarray(tokens, np.uint8)).decode("ascii")


@pytest.mark.parametrize("depth", [0.0, 0.37, 1.0])
def test_example_layout(depth):
    task = passkey.PasskeyTask()
    tokens, start, key = task.example(np.random.default_rng(3), 400, depth)
    s = text(tokens)
    assert len(tokens) == 400 and start == 400 - 5 and len(key) == 5 and key.isdigit()
    assert s.endswith(passkey.QUESTION + key) and s[start:] == key
    line = passkey.KEY_LINE.format(key=key)
    where = s.index(line)
    fill = 400 - task.overhead
    assert where == round(depth * fill)
    assert s.count(key) == 3  # twice in the key line, once as the answer (the default filler has no digits)
    assert s.count(passkey.QUESTION) == 1
    spans = task.key_spans(400, depth)
    assert [s[a:b] for a, b in spans] == [key, key] and spans[1][0] > spans[0][1] and spans[1][1] < start


def test_filler_is_the_corpus_from_an_offset_wrapping_around():
    corpus = bytes(range(97, 123))  # a..z
    task = passkey.PasskeyTask(filler=corpus, digits=3)
    tokens, _, key = task.example(np.random.default_rng(0), task.min_length() + 60, 0.0)
    s = text(tokens)
    haystack = s[len(passkey.KEY_LINE.format(key=key)):-len(passkey.QUESTION) - 3]
    assert len(haystack) == 60
    assert all((ord(b) - 97) % 26 == (ord(a) - 97 + 1) % 26 for a, b in zip(haystack, haystack[1:]))


def test_batch_masks_the_answer_and_keys_vary():
    task = passkey.PasskeyTask()
    batch = task.batch(np.random.default_rng(1), 16, 300)
    assert batch.tokens.shape == batch.loss_mask.shape == (16, 300) and batch.tokens.dtype == np.int32
    assert (batch.loss_mask.sum(axis=1) == 5).all() and batch.loss_mask[:, -5:].all()
    assert len(set(batch.key)) > 12 and (0 <= batch.depth).all() and (batch.depth <= 1).all()
    fixed = task.batch(np.random.default_rng(1), 4, 300, depths=0.5)
    assert (fixed.depth == 0.5).all()


def test_bad_settings_raise_one_line_errors():
    task = passkey.PasskeyTask()
    with pytest.raises(ValueError, match="too short"):
        task.example(np.random.default_rng(0), task.min_length() - 1, 0.5)
    with pytest.raises(ValueError, match="depth must be in"):
        task.example(np.random.default_rng(0), 300, 1.5)
    with pytest.raises(ValueError, match="digits"):
        passkey.PasskeyTask(digits=0)


def test_exact_match_needs_every_answer_byte():
    task = passkey.PasskeyTask()
    batch = task.batch(np.random.default_rng(2), 3, 200)
    n = 199
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((3, n, 256)).astype(np.float32)
    inputs = batch.tokens[:, :-1]
    for row in range(3):  # logits at position j predict token j + 1
        for j in range(batch.answer_start[row] - 1, n):
            logits[row, j, batch.tokens[row, j + 1]] += 100.0
    logits[1, batch.answer_start[1] + 1, :] = 0.0  # row 1: its third digit predicted as byte 0
    logits[1, batch.answer_start[1] + 1, 0] = 1.0
    got = passkey.exact_match(jnp.asarray(logits), batch.tokens, batch.answer_start, 5)
    assert inputs.shape == (3, n) and got.tolist() == [True, False, True]
    predicted = np.asarray(passkey.predicted_answer(jnp.asarray(logits), batch.answer_start, 5))
    keys = np.array([[ord(c) for c in key] for key in batch.key])
    assert (predicted == keys).sum(axis=1).tolist() == [5, 4, 5] and predicted[1, 2] == 0


@pytest.mark.slow  # the quick tier: the task's layout and scoring
def test_loss_mask_counts_only_the_masked_targets():
    model = TINY.build(nnx.Rngs(0))
    rng = np.random.default_rng(7)
    tokens = jnp.asarray(rng.integers(0, 256, (2, 33)), jnp.int32)
    mask = jnp.asarray(rng.random((2, 33)) < 0.3)
    got = model(tokens, return_loss=True, loss_mask=mask)
    logits = model(tokens[:, :-1]).astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
    want = jnp.sum(jnp.where(mask[:, 1:], losses, 0.0)) / jnp.sum(mask[:, 1:])
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    assert abs(float(got) - float(losses.mean())) > 1e-4
    with pytest.raises(ValueError, match="loss_mask must have the shape of ids"):
        model(tokens, return_loss=True, loss_mask=mask[:, :-1])


@pytest.mark.slow  # the quick tier: the task's layout and scoring
def test_trainer_takes_a_dict_batch_with_a_loss_mask():
    trainer = Trainer(TINY.build(nnx.Rngs(0)), make_optimizer(1e-3))
    task = passkey.PasskeyTask()
    batch = task.batch(np.random.default_rng(0), 2, task.min_length() + 20)
    host = dict(tokens=batch.tokens[None], loss_mask=batch.loss_mask[None])  # [accum = 1, b, n + 1]
    state = trainer.init_state()
    eval_batch = trainer.eval_batch(dict(tokens=batch.tokens, loss_mask=batch.loss_mask))
    want = float(trainer.eval_step(state.params, eval_batch))  # the masked loss (test above), before the step
    unmasked = float(trainer.eval_step(state.params, trainer.eval_batch(batch.tokens)))
    state, metrics = trainer.train_step(state, trainer.train_batches(host))
    np.testing.assert_allclose(float(metrics["loss"]), want, rtol=1e-5)
    assert abs(want - unmasked) > 1e-4
    assert float(trainer.eval_step(state.params, eval_batch)) < want
    assert jax.tree.structure(state) == jax.tree.structure(trainer.init_state())

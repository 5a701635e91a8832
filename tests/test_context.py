"""Context parallelism (`nsa_jax.context`): each sequence split over 4 simulated CPU devices
trains exactly as on one device; checkpoints move across splits; train.py's flag."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from simulated_devices import cpu_devices_env

ROOT = Path(__file__).resolve().parents[1]
FOUR = cpu_devices_env(4)

COMMON = textwrap.dedent('''
    import sys
    import jax, numpy as np, optax
    from flax import nnx
    from nsa_jax import sharding
    from nsa_jax.checkpoint import Checkpointer
    from nsa_jax.config import ModelConfig
    from nsa_jax.training import Trainer, make_optimizer

    assert jax.device_count() == 4, jax.devices()
    rng = np.random.default_rng(0)

    def config(**changes):
        return ModelConfig(dim=32, depth=changes.pop("depth", 2), heads=4, kv_heads=2, dim_head=8,
                           sliding_window_size=8, compress_block_size=8, compress_block_sliding_stride=4,
                           selection_block_size=8, num_selected_blocks=2, **changes)

    def trainer(cfg, devices, context, optimizer=None, remat="none", use_pallas_nsa=None):
        # SGD after clipping: parameters move linearly in the gradient (as in test_sharding).
        # use_pallas_nsa: the kernels (interpreted on the CPU); None: the reference here
        optimizer = optimizer or optax.chain(optax.clip_by_global_norm(0.5), optax.sgd(0.5))
        model = cfg.build(nnx.Rngs(0), remat=remat, use_pallas_nsa=use_pallas_nsa)
        return Trainer(model, optimizer, sharding.make_mesh(devices, context))

    def run(t, batches, state=None):
        state, losses = state or t.init_state(), []
        for b in batches:
            state, metrics = t.train_step(state, t.train_batches(b))
            losses.append(float(metrics["loss"]))
        return state, losses

    def same(a, b, losses_a, losses_b):
        np.testing.assert_allclose(losses_b, losses_a, rtol=1e-5)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
''')

QUICK_SCRIPT = COMMON + textwrap.dedent('''
    # data 2 x context 2: each device holds half of each of its sequences; a loss mask that
    # counts unevenly across the shards. The kernels' shard forms
    # (kernels/shard_attention.py: compressed branch, sliding window with its halo).
    compiles = []  # backend compilations, counted to check that a second step compiles nothing
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, secs, **kw: compiles.append(event) if event == "/jax/core/compile/backend_compile_duration"
        else None)
    cfg = config(depth=1)
    tokens = rng.integers(0, 256, (1, 4, 65), dtype=np.int32)
    batch = dict(tokens=tokens, loss_mask=rng.random((1, 4, 65)) < np.linspace(0.1, 0.9, 65))
    one, split = (trainer(cfg, devices, context, use_pallas_nsa=True)
                  for devices, context in ((jax.devices()[:1], 1), (jax.devices(), 2)))
    assert sharding.describe(split.mesh) == "mesh: 4 devices (data=2, context=2)"
    (s1, l1), (s2, l2) = run(one, [batch]), run(split, [batch])
    same(s1, s2, l1, l2)
    # The kernels' train step compiled twice when Pallas imported its fuser (a jit-key flag)
    # lazily, during the first lowering: the one-device step's second call missed the cache.
    before = len(compiles)
    run(one, [batch], s1)
    assert len(compiles) == before, f"the second step compiled {len(compiles) - before} more time(s)"
    print("ok")
''')

SLOW_SCRIPT = COMMON + textwrap.dedent('''
    batches = [rng.integers(0, 256, (2, 4, 65), dtype=np.int32) for _ in range(3)]
    cases = ((config(), "none", None), (config(use_sparse_attn=False), "none", None), (config(), "block", None),
             (config(), "none", True))  # the last: the kernels, the sliding window's halo from every shard
    for cfg, remat, pallas in cases:
        one = trainer(cfg, jax.devices()[:1], 1, remat=remat, use_pallas_nsa=pallas)
        state1, losses1 = run(one, batches)
        for context in (4, 2):  # context 4; data 2 x context 2
            split = trainer(cfg, jax.devices(), context, remat=remat, use_pallas_nsa=pallas)
            state, losses = run(split, batches)
            same(state1, state, losses1, losses)
        evals = [float(t.eval_step(s.params, t.eval_batch(batches[0][0])))
                 for t, s in ((split, state), (one, state1))]
        np.testing.assert_allclose(evals[0], evals[1], rtol=1e-5)

    # Adam; save split over context 4, restore on 1 device and on data 2 x context 2: the next step
    # is the same everywhere
    cfg, adam = config(), make_optimizer(1e-2)
    four = trainer(cfg, jax.devices(), 4, adam)
    state4, _ = run(four, batches[:2])
    ckpt = Checkpointer(sys.argv[1])
    ckpt.save(2, state4, dict(model_config=cfg.to_dict()))
    ckpt.wait()
    results = []
    for devices, context in ((jax.devices()[:1], 1), (jax.devices(), 2), (jax.devices(), 4)):
        t = trainer(cfg, devices, context, adam)
        restored, _ = Checkpointer(sys.argv[1]).restore(2, t.init_state())
        results.append(run(t, batches[2:], restored))
    for state, losses in results[1:]:
        same(results[0][0], state, results[0][1], losses)
    print("ok")
''')


def run_script(script: str, *args: str) -> None:
    run = subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, env=FOUR, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]


def test_context_parallel_step_equals_one_device():
    run_script(QUICK_SCRIPT)


@pytest.mark.slow
def test_context_parallel_training_and_checkpoints_across_splits(tmp_path):
    """NSA (reference and kernels), dense and NSA with remat, context 4 and data 2 x context 2,
    three steps each, equal one device's; a checkpoint saved at context 4 continues identically
    on 1 device, 2 x 2 and 4."""
    run_script(SLOW_SCRIPT, str(tmp_path / "ckpt"))


@pytest.mark.slow
def test_train_py_context_parallelism(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_train import tiny_run_command

    common = tiny_run_command(tmp_path, batch_size=2)
    first = subprocess.run([*common, "--num_batches=2", "--validate_every=2", "--context_parallelism=2"], env=FOUR,
                           capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert first.returncode == 0 and "mesh: 4 devices (data=2, context=2)" in first.stdout, first.stderr[-2000:]
    second = subprocess.run([*common, "--num_batches=4"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert second.returncode == 0 and "resuming from step 2" in second.stdout, second.stderr[-2000:]
    bad = subprocess.run([*common, "--num_batches=4", "--context_parallelism=3"], env=FOUR, capture_output=True,
                         text=True, timeout=600, cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.strip() == (
        "error: --context_parallelism (3) must divide the number of devices (4)"), bad.stderr[-2000:]
    wide = subprocess.run([*common, "--num_batches=4", "--context_parallelism=4", "--sliding_window_size=8"],
                          env=FOUR, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert wide.returncode == 2 and wide.stderr.strip() == (
        "error: --sliding_window_size (8) must fit in one chunk of a sequence "
        "(--seq_len / (2 x --context_parallelism) = 4): use a smaller --context_parallelism"), wide.stderr[-2000:]


def test_zigzag_order_pairs_an_early_chunk_with_a_late_one():
    import numpy as np

    from nsa_jax import context

    np.testing.assert_array_equal(context.order(16, 2), [*range(0, 4), *range(12, 16), *range(4, 8), *range(8, 12)])
    assert sorted(context.order(48, 4)) == list(range(48))
    with pytest.raises(ValueError, match="multiple of twice the context parallelism"):
        context.order(12, 4)

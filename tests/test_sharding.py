"""Data parallelism on 4 simulated CPU devices equals one device; checkpoints move across device counts."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from simulated_devices import cpu_devices_env

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent('''
    import sys, dataclasses
    import jax, numpy as np, optax
    from flax import nnx
    from nsa_jax import sharding
    from nsa_jax.checkpoint import Checkpointer
    from nsa_jax.config import ModelConfig
    from nsa_jax.training import Trainer, make_optimizer

    assert jax.device_count() == 4, jax.devices()
    config = ModelConfig(dim=32, depth=2, heads=4, kv_heads=2, dim_head=8, sliding_window_size=8,
                         compress_block_size=8, compress_block_sliding_stride=4, selection_block_size=8,
                         num_selected_blocks=2)
    batches = [np.random.default_rng(i).integers(0, 256, (2, 8, 33), dtype=np.int32) for i in range(3)]

    def trainer(devices, fsdp=False, shard_optimizer=False):
        # SGD after clipping: params move linearly in the gradient, so float32 reduction-order
        # differences stay float32-small (Adam's first steps are ~lr * sign(g), which would
        # magnify them for near-zero gradients). Adam's state is still sharded in the restore part.
        mesh = sharding.make_mesh(devices)
        optimizer = optax.chain(optax.clip_by_global_norm(0.5), optax.sgd(0.5))
        return Trainer(config.build(nnx.Rngs(0)), optimizer, mesh, fsdp=fsdp, shard_optimizer=shard_optimizer)

    def run(t):
        state, losses = t.init_state(), []
        for b in batches:
            state, metrics = t.train_step(state, t.train_batches(b))
            losses.append(float(metrics["loss"]))
        return state, losses

    one = trainer(jax.devices()[:1])
    state1, losses1 = run(one)
    for fsdp, shard_optimizer in ((False, False), (True, False), (False, True)):
        four = trainer(jax.devices(), fsdp, shard_optimizer)
        if fsdp:  # parameters really are split
            specs = [s.spec for s in jax.tree.leaves(four.state_sharding)]
            assert any(spec != jax.sharding.PartitionSpec() for spec in specs)
        state4, losses4 = run(four)
        np.testing.assert_allclose(losses4, losses1, rtol=1e-5)
        for a, b in zip(jax.tree.leaves(state1), jax.tree.leaves(state4)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
        if fsdp:
            loss_eval = float(four.eval_step(state4.params, four.eval_batch(batches[0][0])))
            np.testing.assert_allclose(loss_eval, float(one.eval_step(state1.params, one.eval_batch(batches[0][0]))),
                                       rtol=1e-5)

    # shard_optimizer (ZeRO-1): parameters replicated, Adam's moments split, the same updates as one device
    zero1 = Trainer(config.build(nnx.Rngs(0)), make_optimizer(1e-3), sharding.make_mesh(jax.devices()),
                    shard_optimizer=True)
    assert all(s.spec == jax.sharding.PartitionSpec() for s in jax.tree.leaves(zero1.state_sharding.params))
    assert any(s.spec != jax.sharding.PartitionSpec() for s in jax.tree.leaves(zero1.state_sharding.opt_state))
    replicated = Trainer(config.build(nnx.Rngs(0)), make_optimizer(1e-3), sharding.make_mesh(jax.devices()))
    (sz, mz), (sr, mr) = [t.train_step(t.init_state(), t.train_batches(batches[0])) for t in (zero1, replicated)]
    assert all(x.sharding.spec == jax.sharding.PartitionSpec() for x in jax.tree.leaves(sz.params))
    np.testing.assert_allclose(float(mz["loss"]), float(mr["loss"]), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(sz), jax.tree.leaves(sr)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)

    # save on 4 devices (FSDP, Adam state), restore on 1, and back
    def adam_trainer(devices, fsdp=False):
        return Trainer(config.build(nnx.Rngs(0)), make_optimizer(1e-2), sharding.make_mesh(devices), fsdp=fsdp)
    one, four = adam_trainer(jax.devices()[:1]), adam_trainer(jax.devices(), True)
    state4, _ = run(four)
    ckpt = Checkpointer(sys.argv[1])
    ckpt.save(3, state4, dict(model_config=config.to_dict()))
    ckpt.wait()
    restored1, _ = ckpt.restore(3, one.init_state())
    assert all(len(x.sharding.device_set) == 1 for x in jax.tree.leaves(restored1))
    restored4, _ = Checkpointer(sys.argv[1]).restore(3, adam_trainer(jax.devices(), True).init_state())
    for a, b, c in zip(jax.tree.leaves(state4), jax.tree.leaves(restored1), jax.tree.leaves(restored4)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
    print("ok")
''')


@pytest.mark.slow
def test_four_devices_equal_one_and_checkpoints_cross_device_counts(tmp_path):
    env = cpu_devices_env(4)
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "ckpt")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]


@pytest.mark.slow
def test_train_py_resumes_across_device_counts(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_train import tiny_run_command

    common = tiny_run_command(tmp_path, batch_size=4)
    four = cpu_devices_env(4)
    first = subprocess.run([*common, "--num_batches=4", "--fsdp"], env=four, capture_output=True, text=True,
                           timeout=600, cwd=tmp_path)
    assert first.returncode == 0 and "mesh: 4 devices (data=4)" in first.stdout, first.stderr[-2000:]
    second = subprocess.run([*common, "--num_batches=8"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert second.returncode == 0 and "resuming from step 4" in second.stdout, second.stderr[-2000:]
    assert "mesh: 1 devices (data=1)" in second.stdout
    third = subprocess.run([*common, "--num_batches=12", "--shard_optimizer"], env=four, capture_output=True,
                           text=True, timeout=600, cwd=tmp_path)
    assert third.returncode == 0 and "resuming from step 8" in third.stdout, third.stderr[-2000:]
    assert "mesh: 4 devices (data=4), optimizer state split" in third.stdout


PALLAS_SCRIPT = textwrap.dedent('''
    import jax, numpy as np, optax
    from flax import nnx
    from nsa_jax import sharding
    from nsa_jax.config import ModelConfig
    from nsa_jax.training import Trainer

    config = ModelConfig(dim=32, depth=1, heads=4, kv_heads=2, dim_head=16, sliding_window_size=8,
                         compress_block_size=8, compress_block_sliding_stride=4, selection_block_size=8,
                         num_selected_blocks=2)
    batch = np.random.default_rng(0).integers(0, 256, (1, 4, 33), dtype=np.int32)

    def trainer(devices):
        optimizer = optax.chain(optax.clip_by_global_norm(0.5), optax.sgd(0.5))
        model = config.build(nnx.Rngs(0), use_pallas_nsa=True)
        return Trainer(model, optimizer, sharding.make_mesh(devices))

    one, four = trainer(jax.devices()[:1]), trainer(jax.devices())
    # the kernels run per batch shard: the traced step holds shard_maps on 4 devices, none on 1
    def traced(t):
        with jax.set_mesh(t.mesh):
            return str(jax.make_jaxpr(t._train_step)(t.init_state(), t.train_batches(batch)))
    assert "shard_map" in traced(four) and "shard_map" not in traced(one)
    (s1, m1), (s4, m4) = [t.train_step(t.init_state(), t.train_batches(batch)) for t in (one, four)]
    np.testing.assert_allclose(float(m4["loss"]), float(m1["loss"]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s4)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    print("ok")
''')


@pytest.mark.slow  # moved from the quick tier to keep it under 5 minutes
def test_pallas_kernels_run_per_batch_shard(tmp_path):
    env = cpu_devices_env(4)
    run = subprocess.run([sys.executable, "-c", PALLAS_SCRIPT], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]


UNEVEN_SCRIPT = textwrap.dedent('''
    import re
    import jax, numpy as np, optax
    from flax import nnx
    from nsa_jax import sharding
    from nsa_jax.config import ModelConfig
    from nsa_jax.training import Trainer

    config = ModelConfig(dim=32, depth=1, heads=4, kv_heads=2, dim_head=8, sliding_window_size=8,
                         compress_block_size=8, compress_block_sliding_stride=4, selection_block_size=8,
                         num_selected_blocks=2)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, (2, 8, 33), dtype=np.int32)
    # each device's slice of a micro-batch counts a different number of targets
    loss_mask = rng.random((2, 8, 33)) < np.linspace(0.05, 0.9, 8)[None, :, None]
    segment_ids = np.cumsum(rng.random((2, 8, 33)) < 0.1, axis=-1).astype(np.int32)
    tokens3 = rng.integers(0, 256, (3, 8, 33), dtype=np.int32)
    batches = [dict(tokens=tokens, loss_mask=loss_mask), (tokens, segment_ids), tokens, tokens3]

    def trainer(devices):
        optimizer = optax.chain(optax.clip_by_global_norm(0.5), optax.sgd(0.5))
        return Trainer(config.build(nnx.Rngs(0)), optimizer, sharding.make_mesh(devices))

    one, four = trainer(jax.devices()[:1]), trainer(jax.devices())
    for batch in batches:
        fresh = lambda t: jax.tree.map(jax.numpy.copy, t.init_state())  # (the step donates its state)
        (s1, m1), (s4, m4) = [t.train_step(fresh(t), t.train_batches(batch)) for t in (one, four)]
        np.testing.assert_allclose(float(m4["loss"]), float(m1["loss"]), rtol=1e-5)
        for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s4)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    # the gradient's all-reduce runs once per step, outside the loop over the micro-batches
    hlo = four.lower_train_step(four.init_state(), four.train_batches(tokens3)).compile().as_text()
    bodies = set(re.findall(r"body=%?([\\w.\\-]+)", hlo))
    computation, in_loop, outside = None, 0, 0
    for line in hlo.splitlines():
        if line and not line.startswith(" "):
            computation = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
        elif "all-reduce" in line and "=" in line:
            in_loop, outside = in_loop + (computation in bodies), outside + (computation not in bodies)
    assert bodies and in_loop == 0 and outside >= 1, (bodies, in_loop, outside)
    print("ok")
''')


@pytest.mark.slow
def test_gradient_reduced_once_and_weighed_by_counted_targets():
    """Per-device gradients summed over the micro-batches, then one all-reduce; loss masks and
    packed documents that split unevenly over the devices still give the one-device result."""
    env = cpu_devices_env(4)
    run = subprocess.run([sys.executable, "-c", UNEVEN_SCRIPT], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]

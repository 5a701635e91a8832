"""Context parallelism on real devices: the same training steps on one device and with each sequence
split over several (`nsa_jax.context`), compared loss by loss.

    python -m bench.context_parity                                 # seed model, T 8192, context 4
    python -m bench.context_parity --seq_len 32768 --dtype bfloat16 --splits 4x1,2x2

The CPU tests (tests/test_context.py) check exactness in interpret mode on 4 simulated devices;
this runs the compiled kernels on the GPUs. A second one-device run gives the noise floor: the
kernels' backward accumulates with atomics, so two runs on one GPU already differ in the last bits.
Prints a table (relative loss difference per split, worst over the steps; relative parameter
difference after the last step) and writes bench/results/context_parity-<date>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from nsa_jax import sharding
from nsa_jax.config import ModelConfig
from nsa_jax.training import Trainer, make_optimizer


def train(config: ModelConfig, batches: list[np.ndarray], devices: int, context: int, dtype: str,
          use_pallas_nsa: bool, remat: str) -> tuple[list[float], list[np.ndarray]]:
    """Losses of each step and the parameters after the last, on the first `devices` devices."""
    model = config.build(nnx.Rngs(0), use_pallas_nsa=use_pallas_nsa, dtype=dtype, remat=remat)
    trainer = Trainer(model, make_optimizer(1e-3), sharding.make_mesh(jax.devices()[:devices], context))
    state, losses = trainer.init_state(), []
    for batch in batches:
        state, metrics = trainer.train_step(state, trainer.train_batches(batch))
        losses.append(float(metrics["loss"]))
    return losses, [np.asarray(x, np.float64) for x in jax.tree.leaves(state.params)]


def relative(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """|a - b| / |a| over all arrays together."""
    return float(np.sqrt(sum(((x - y) ** 2).sum() for x, y in zip(a, b)) / sum((x**2).sum() for x in a)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq_len", type=int, default=8192)
    parser.add_argument("--batch_size", type=int, default=1, help="sequences per data shard")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--splits", default="4x1,2x2",
                        help="context x data splits to compare with one device, comma-separated")
    parser.add_argument("--backend", default="pallas", choices=["pallas", "reference"])
    parser.add_argument("--remat", default="none", choices=["none", "block"])
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    splits = [tuple(int(x) for x in s.split("x")) for s in args.splits.split(",")]
    if any(c * d > jax.device_count() for c, d in splits):
        raise SystemExit(f"error: --splits {args.splits} needs more than this machine's {jax.device_count()} devices")

    config = dataclasses.replace(ModelConfig())  # the seed model
    pallas = args.backend == "pallas"

    def batches(data: int) -> list[np.ndarray]:  # the same sequences for every split: [1, b * data, T + 1]
        r = np.random.default_rng(1)
        return [r.integers(0, 256, (1, args.batch_size * data, args.seq_len + 1), dtype=np.int32)
                for _ in range(args.steps)]

    rows = []
    for context, data in splits:
        base_losses, base_params = train(config, batches(data), 1, 1, args.dtype, pallas, args.remat)
        again_losses, again_params = train(config, batches(data), 1, 1, args.dtype, pallas, args.remat)
        losses, params = train(config, batches(data), context * data, context, args.dtype, pallas, args.remat)
        loss_diff = max(abs(a - b) / abs(a) for a, b in zip(base_losses, losses))
        floor = max(abs(a - b) / abs(a) for a, b in zip(base_losses, again_losses))
        rows.append(dict(context=context, data=data, losses_one_device=base_losses, losses_split=losses,
                         loss_rel_diff=loss_diff, loss_rel_diff_one_device_again=floor,
                         param_rel_diff=relative(base_params, params),
                         param_rel_diff_one_device_again=relative(base_params, again_params)))
        print(f"context {context} x data {data}: losses {['%.6f' % x for x in losses]} "
              f"(one device {['%.6f' % x for x in base_losses]})", flush=True)

    device = jax.devices()[0]
    print(f"\ncontext parallelism against one device: seed model, {args.backend}, {args.dtype}, T={args.seq_len}, "
          f"{args.steps} Adam steps, {device.device_kind} ({jax.__version__})")
    print(f"{'split':>12} {'loss rel diff':>14} {'(1 dev again)':>14} {'param rel diff':>15} {'(1 dev again)':>14}")
    for r in rows:
        print(f"{'%dc x %dd' % (r['context'], r['data']):>12} {r['loss_rel_diff']:>14.2e} "
              f"{r['loss_rel_diff_one_device_again']:>14.2e} {r['param_rel_diff']:>15.2e} "
              f"{r['param_rel_diff_one_device_again']:>14.2e}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.date.today().isoformat()
    path = out / f"context_parity-{stamp}.json"
    path.write_text(json.dumps(dict(device=device.device_kind, jax=jax.__version__, date=stamp, args=vars(args),
                                    results=rows), indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""Train the seed model with the Pallas kernels and with the pure-JAX reference from the same
initialisation and data order, and print both loss curves side by side.

    python -m bench.backend_curves --data_path ../shared/data/tinyshakespeare.txt --steps 200

The two runs should follow the same curve: they differ only by floating-point rounding (and by
the occasional top-k flip that rounding causes). Writes bench/results/backend_curves-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from nsa_jax import data
from nsa_jax.config import ModelConfig
from nsa_jax.training import Trainer, make_optimizer


def losses(use_pallas_nsa: bool, args, train_bytes) -> list[float]:
    trainer = Trainer(ModelConfig().build(nnx.Rngs(args.seed), use_pallas_nsa=use_pallas_nsa, dtype=args.dtype),
                      make_optimizer(args.learning_rate))
    state = trainer.init_state()
    sampler = data.CropSampler(train_bytes, args.seq_len, seed=args.seed)
    history = []
    for _ in range(args.steps):
        state, metrics = trainer.train_step(state, trainer.train_batches(sampler.sample(args.grad_accum_every,
                                                                                         args.batch_size)))
        history.append(metrics["loss"])
    return [float(x) for x in jax.device_get(history)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_path", required=True)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--grad_accum_every", type=int, default=4)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()

    train_bytes, _ = data.load_corpus(args.data_path)
    pallas = losses(True, args, train_bytes)
    reference = losses(False, args, train_bytes)
    device = jax.devices()[0].device_kind
    print(f"\nseed model, {args.dtype}, {Path(args.data_path).name}, {device}: mean train loss per 20 steps")
    print(f"{'steps':>9} {'pallas':>8} {'reference':>10} {'diff':>8}")
    for i in range(0, args.steps, 20):
        p, r = np.mean(pallas[i:i + 20]), np.mean(reference[i:i + 20])
        print(f"{i + 1:>4}-{i + 20:<4} {p:>8.4f} {r:>10.4f} {p - r:>+8.4f}")
    diffs = np.abs(np.array(pallas) - np.array(reference))
    print(f"max |diff| of per-step losses: {diffs.max():.4g}; final: pallas {pallas[-1]:.4f}, "
          f"reference {reference[-1]:.4f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.date.today().isoformat()
    path = out / f"backend_curves-{stamp}.json"
    path.write_text(json.dumps(dict(device=device, jax=jax.__version__, date=stamp, args=vars(args),
                                    pallas=pallas, reference=reference), indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

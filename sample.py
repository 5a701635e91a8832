"""Generate text from a training checkpoint.

    python sample.py --checkpoint_dir checkpoints/quickstart --prime "def main(" --length 256

The model is rebuilt from the configuration saved in the checkpoint, the newest readable step
is restored, and generation runs as one compiled program (prefill, then a `lax` loop of cached
decode steps). Bytes print as the seed's train.py prints them (control bytes as spaces).
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import flags

from nsa_jax.cli import fail, parse_flags

flags.DEFINE_string("checkpoint_dir", None, "a train.py checkpoint directory")
flags.DEFINE_string("prime", "\n", "text the sample continues")
flags.DEFINE_integer("length", 512, "bytes to generate")
flags.DEFINE_float("temperature", 1.0, "sampling temperature (<= 0: greedy)")
flags.DEFINE_float("filter_thres", 0.9, "keep the top (1 - filter_thres) of the vocabulary")
flags.DEFINE_integer("seed", 0, "sampling seed")
flags.DEFINE_boolean("use_cache_kv", True, "decode with the KV cache (false: rerun the full forward per token)")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    parse_flags(argv, sys.modules[__name__])
    if not FLAGS.checkpoint_dir:
        fail("--checkpoint_dir is required (a directory train.py wrote)")
    directory = Path(FLAGS.checkpoint_dir).expanduser()
    if not directory.is_dir():
        fail(f"checkpoint directory not found: {FLAGS.checkpoint_dir}")
    if not any(p.name.isdigit() for p in directory.iterdir()):
        fail(f"no checkpoint in {FLAGS.checkpoint_dir} (train.py writes one directory per saved step)")
    prime = FLAGS.prime.encode("utf-8")
    if not prime:
        fail("--prime must not be empty")
    if FLAGS.length < 1:
        fail(f"--length must be >= 1, got {FLAGS.length}")
    if not 0.0 <= FLAGS.filter_thres < 1.0:
        fail(f"--filter_thres must be in [0, 1), got {FLAGS.filter_thres}")

    import jax
    import numpy as np
    from flax import nnx

    from nsa_jax.checkpoint import CheckpointError, Checkpointer, model_config_of
    from nsa_jax.data import decode_tokens
    from nsa_jax.training import STATE_LAYOUT, Trainer, make_optimizer

    checkpointer = Checkpointer(directory)
    try:
        config = model_config_of(checkpointer.restore_meta(checkpointer.latest_step()))
    except Exception as e:  # unreadable metadata: restore_newest below says which steps are damaged
        config = None
        first_error = e
    if config is None:
        fail(f"cannot read the newest checkpoint's configuration in {directory}: {first_error}")
    trainer = Trainer(config.build(nnx.Rngs(0)), make_optimizer(1.0))  # the saved structure; values are restored
    try:
        newest = checkpointer.restore_newest(trainer.init_state(), config,
                                             warn=lambda m: print(f"warning: {m}", file=sys.stderr),
                                             layout=STATE_LAYOUT, convert=trainer.layout_converters())
    except CheckpointError as e:
        fail(str(e))
    step, state, _ = newest
    model = trainer.model(state.params)
    prompt = np.frombuffer(prime, dtype=np.uint8).astype(np.int32)[None]
    tokens = model.sample(prompt, prompt.shape[1] + FLAGS.length, temperature=FLAGS.temperature,
                          filter_thres=FLAGS.filter_thres, use_cache_kv=FLAGS.use_cache_kv,
                          rng=jax.random.key(FLAGS.seed))
    print(f"# step {step} of {directory}", file=sys.stderr)
    print(decode_tokens(prime) + decode_tokens(np.asarray(tokens[0])))


if __name__ == "__main__":
    main(sys.argv)

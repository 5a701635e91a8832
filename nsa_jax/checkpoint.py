"""Orbax checkpoints: one directory per step holding the train state and a JSON of metadata.

The metadata carries the model configuration, so a checkpoint directory alone rebuilds its
model (`sample.py`), plus the step and the data samplers' RNG states, so a resumed run draws
exactly the batches the uninterrupted run would have drawn.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from nsa_jax.config import ModelConfig


class Checkpointer:
    """A CheckpointManager in `directory`, keeping the newest `keep` steps."""

    def __init__(self, directory: str | Path, keep: int = 3):
        self.directory = Path(directory).expanduser().resolve()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Save asynchronously; `wait()` before the process exits."""
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            meta=ocp.args.JsonSave(dict(meta, step=step)),
        ))

    def restore(self, step: int, like: Any) -> tuple[Any, dict[str, Any]]:
        """(state shaped like `like`, metadata) of `step`."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract),
            meta=ocp.args.JsonRestore(),
        ))
        return restored.state, restored.meta

    def restore_meta(self, step: int) -> dict[str, Any]:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def model_config_of(meta: dict[str, Any]) -> ModelConfig:
    return ModelConfig.from_dict(meta["model_config"])

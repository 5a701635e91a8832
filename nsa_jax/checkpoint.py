"""Orbax checkpoints: one directory per step holding the train state and a JSON of metadata.

The metadata carries the model configuration, so a checkpoint directory alone rebuilds its
model (`sample.py`), plus the step and the data samplers' RNG states, so a resumed run draws
exactly the batches the uninterrupted run would have drawn.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from nsa_jax.config import ModelConfig

# {saved layout: (the state's structure in it, its conversion into the current layout)}, or one
# such pair for checkpoints that record no layout.
Converters = dict[str | None, tuple[Any, Callable[[Any], Any]]] | tuple[Any, Callable[[Any], Any]]


class CheckpointError(Exception):
    """A checkpoint directory that cannot be used; the message is one line for the user."""


@contextlib.contextmanager
def _quiet_logs():
    """Orbax logs whole TensorStore specs when a read fails; we report one line instead."""
    loggers = [logging.getLogger(), logging.getLogger("absl")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def all_finite(tree: Any) -> bool:
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree)
               if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact))


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

    def _restore_as(self, step: int, like: Any, saved_layout: str | None, layout: str | None,
                    convert: Converters | None) -> tuple[Any, dict[str, Any]]:
        if saved_layout == layout:
            return self.restore(step, like)
        if isinstance(convert, tuple):  # (like, fn): for checkpoints that record no layout
            convert = {None: convert}
        if convert is not None and saved_layout in convert:
            saved_like, into_layout = convert[saved_layout]
            state, meta = self.restore(step, saved_like)
            return into_layout(state), meta
        raise CheckpointError(f"checkpoint step {step} in {self.directory} holds its state as {saved_layout!r}, "
                              f"this version reads {layout!r}; use the nsa-jax version that wrote it")

    def restore_meta(self, step: int) -> dict[str, Any]:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def restore_newest(self, like: Any, model_config: ModelConfig, warn: Callable[[str], None] = print, *,
                       layout: str | None = None,
                       convert: Converters | None = None) -> tuple[int, Any, dict[str, Any]] | None:
        """(step, state, meta) of the newest readable checkpoint, or None when there is none.

        An unreadable newest checkpoint (truncated, corrupted, or non-finite) is reported,
        moved aside to `corrupt-<step>` once an older good one is found, and skipped. Raises
        CheckpointError when the newest readable checkpoint holds another model configuration
        (naming the differences) or when no checkpoint is readable (nothing is moved then).

        `layout`: the state layout `like` has (metadata "state_layout", `training.STATE_LAYOUT`).
        A checkpoint saved with another layout L (None: saved before layouts were recorded) is
        restored into `convert[L][0]`'s structure and returned through `convert[L][1]`
        (`Trainer.layout_converters`); a bare pair stands for {None: pair}.
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        bad = []
        for step in steps:
            try:
                with _quiet_logs():
                    meta = self.restore_meta(step)
                    saved = model_config_of(meta)
                    if saved == model_config:
                        state, meta = self._restore_as(step, like, meta.get("state_layout"), layout, convert)
            except CheckpointError:  # readable, but not by this version: nothing is moved
                raise
            except Exception as e:  # any read failure means: this checkpoint is not usable
                reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
                warn(f"checkpoint step {step} in {self.directory} is unreadable ({type(e).__name__}: {reason}); "
                     "trying the previous one")
                bad.append(step)
                continue
            if saved != model_config:
                raise CheckpointError(
                    f"checkpoint step {step} in {self.directory} was made with another model configuration "
                    f"({'; '.join(model_config.differences(saved))}); use another --checkpoint_dir or the same settings")
            if not all_finite(state):
                warn(f"checkpoint step {step} in {self.directory} holds non-finite values; trying the previous one")
                bad.append(step)
                continue
            for b in bad:
                self._move_aside(b, warn)
            return step, state, meta
        if bad:
            raise CheckpointError(f"no readable checkpoint in {self.directory} (steps {', '.join(map(str, bad))} "
                                  "are damaged); move the directory away to start afresh")
        return None

    def _move_aside(self, step: int, warn: Callable[[str], None]) -> None:
        source = self.directory / str(step)
        target = self.directory / f"corrupt-{step}"
        n = 1
        while target.exists():
            n += 1
            target = self.directory / f"corrupt-{step}-{n}"
        shutil.move(str(source), str(target))
        self.manager.reload()
        warn(f"moved the damaged checkpoint to {target}")

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def model_config_of(meta: dict[str, Any]) -> ModelConfig:
    return ModelConfig.from_dict(meta["model_config"])

"""Stopping a run cleanly: SIGTERM (preemption) and Ctrl-C finish the step, save, and exit.

Preemptible machines (SLURM, Kubernetes, cloud spot instances) send SIGTERM, wait a grace
period, then kill. `StopSignals` turns SIGTERM and the first Ctrl-C into a request that the
training loop reads after each step (`requested`); the loop then saves that step, waits until
the checkpoint is on disk and exits with `EXIT_PREEMPTED` (SIGTERM) or `EXIT_INTERRUPTED`
(Ctrl-C). A second Ctrl-C stops at once (KeyboardInterrupt; the loop still saves the last
completed step), except while a train step runs: it donates the state it is given, so the
interrupt waits for the step (`critical`).

With several processes (multi-host), every process must save the same step: JAX's coordination
service relays a preemption notice (SIGTERM on any host) to all of them and picks the step
(`jax.experimental.multihost_utils.reached_preemption_sync_point`, asked after every step). Its
own handler catches SIGTERM there, so this module leaves SIGTERM alone in multi-process runs,
and Ctrl-C there stops at once as a second Ctrl-C does.
"""

from __future__ import annotations

import contextlib
import signal
from typing import Any, Iterator

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM after saving; rerun the same command to resume
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), after saving


class StopSignals:
    """SIGTERM / SIGINT handlers for the duration of a `with` block (the previous ones restored after)."""

    def __init__(self, multi_process: bool = False):
        self.multi_process = multi_process
        self.received: int | None = None  # the first stop signal
        self._in_step = False
        self._interrupt_pending = False
        self._previous: dict[int, Any] = {}
        self._asked: int | None = None  # the last step asked at JAX's preemption sync point
        self._saving = False

    def __enter__(self) -> "StopSignals":
        # SIGINT: only where it would raise KeyboardInterrupt (not where a shell or an embedding
        # program ignores or handles it).
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._handle)
        if not self.multi_process:
            self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        # Ctrl-C stops at once when a stop is already under way (a second Ctrl-C) and in
        # multi-process runs (where only the preemption sync point can make every process stop
        # at the same step); otherwise a signal is a request, read after the step.
        if self._saving:  # the final save is under way: it ends the run anyway
            return
        if signum == signal.SIGINT and (self.multi_process or self.received is not None):
            if self._in_step:
                self._interrupt_pending = True
                return
            raise KeyboardInterrupt
        if self.received is None:
            self.received = signum

    @contextlib.contextmanager
    def critical(self) -> Iterator[None]:
        """A block a second Ctrl-C must not cut (the train step): the interrupt is raised after it."""
        self._in_step = True
        try:
            yield
        finally:
            self._in_step = False
        if self._interrupt_pending:
            self._interrupt_pending = False
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def final_save(self) -> Iterator[None]:
        """The save that ends a stopped run: further signals are ignored until it is on disk."""
        self._saving = True
        yield

    def requested(self, step: int) -> bool:
        """Whether to stop after `step` (the number of steps completed): a stop signal arrived here,
        or (multi-process) every process reached JAX's preemption sync point at this step."""
        if not self.multi_process:
            return self.received is not None
        if step != self._asked:  # JAX's sync point is asked once per step, in step order
            self._asked = step
            from jax.experimental import multihost_utils

            try:
                if multihost_utils.reached_preemption_sync_point(step):
                    self.received = signal.SIGTERM
            except RuntimeError:  # the coordination service runs without its preemption manager
                pass
        return self.received == signal.SIGTERM

    @property
    def exit_status(self) -> int:
        return EXIT_INTERRUPTED if self.received == signal.SIGINT else EXIT_PREEMPTED

    @property
    def name(self) -> str:
        return "interrupted" if self.received == signal.SIGINT else "preempted (SIGTERM)"

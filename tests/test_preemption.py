"""nsa_jax.preemption.StopSignals: SIGTERM and Ctrl-C become a stop request read after the step;
a second Ctrl-C stops at once, but not inside a train step; handlers are restored afterwards.
(train.py's use of it, end to end: tests/test_train.py.)"""

from __future__ import annotations

import os
import signal

import pytest

from nsa_jax.preemption import EXIT_INTERRUPTED, EXIT_PREEMPTED, StopSignals


@pytest.fixture
def default_sigint():
    """SIGINT raising KeyboardInterrupt, as in a terminal (a background job ignores it)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_sigterm_is_a_request(default_sigint):
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as stop:
        assert not stop.requested(1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested(2) and stop.exit_status == EXIT_PREEMPTED == 75
        assert stop.name == "preempted (SIGTERM)"
        os.kill(os.getpid(), signal.SIGTERM)  # a second one changes nothing
        assert stop.requested(3)
    assert signal.getsignal(signal.SIGTERM) is before


def test_ctrl_c_is_a_request_then_stops_at_once(default_sigint):
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested(1) and stop.exit_status == EXIT_INTERRUPTED == 130 and stop.name == "interrupted"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_second_ctrl_c_waits_for_the_step(default_sigint):
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        finished = False
        with pytest.raises(KeyboardInterrupt):
            with stop.critical():
                os.kill(os.getpid(), signal.SIGINT)
                finished = True  # the step runs to its end; the interrupt comes after
        assert finished


def test_signals_during_the_final_save_are_ignored(default_sigint):
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        with stop.final_save():
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGTERM)
        assert stop.exit_status == EXIT_PREEMPTED


def test_single_process_never_asks_the_sync_point(default_sigint):
    """One process: JAX's preemption sync point is not involved (no coordination service)."""
    from jax.experimental import multihost_utils

    assert multihost_utils.reached_preemption_sync_point(1) is False  # no distributed client: False, no error
    with StopSignals(multi_process=False) as stop:
        assert not stop.requested(1)

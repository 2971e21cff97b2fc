"""SIGINT/SIGTERM become stop requests without a lock in the handler (remus.signals)."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading

from remus.clock import StopFlag
from remus.signals import stop_on_signals
from tests.helpers import repo_env

#: Signals arriving while the main thread holds the stop flag's own lock: a handler that took it
#: (``threading.Event.set``) would wait for itself forever.  In a child, so a hang is a timeout.
HELD_LOCK = """
import signal
from remus.clock import StopFlag
from remus.signals import stop_on_signals

stop = StopFlag()
with stop_on_signals(stop):
    with stop._event._cond:  # CPython's Event: held like this by a wait that is waking up
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGTERM)  # a second signal, as if it interrupted the first
        assert stop.is_set() and stop.urgent
    # what waiters in other threads block on: the relay thread sets it
    assert stop._event.wait(30) and stop._urgent.wait(30), "the waiters were never woken"
print(stop.reason)
"""


def test_a_signal_while_the_flag_s_lock_is_held_is_recorded_and_wakes_the_waiters() -> None:
    done = subprocess.run([sys.executable, "-c", HELD_LOCK], env=repo_env(), capture_output=True,
                          text=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (0, "SIGINT\n", "")


def test_a_signal_ends_a_wait_under_way_and_a_second_makes_it_urgent() -> None:
    handlers = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    stop = StopFlag()
    try:
        with stop_on_signals(stop):
            waiting = threading.Event()
            main = threading.main_thread().ident
            assert main is not None

            def signal_once_waiting() -> None:
                waiting.wait(30)
                # To the main thread, as a terminal's signal usually lands: a process-directed
                # one may go to any thread, and CPython runs the handler only when the main
                # thread next runs (a bounded wait there ends by its timeout, not at once).
                signal.pthread_kill(main, signal.SIGTERM)

            sender = threading.Thread(target=signal_once_waiting)
            sender.start()
            waiting.set()
            assert stop.wait(30)  # woken by the relay, not by the timeout
            sender.join()
            assert stop.reason == "SIGTERM" and not stop.urgent
            signal.raise_signal(signal.SIGINT)
            assert stop.urgent and stop.reason == "SIGTERM"
        # a stop is under way: from here on both signals are ignored
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])


def test_without_a_signal_the_handlers_are_given_back_and_nothing_is_left_running() -> None:
    before = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    threads = set(threading.enumerate())
    stop = StopFlag()
    with stop_on_signals(stop):
        assert signal.getsignal(signal.SIGINT) is not before[0]
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    assert set(threading.enumerate()) == threads  # the relay thread ended
    assert not stop.is_set() and not stop.wait(0)

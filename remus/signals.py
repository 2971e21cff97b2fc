"""SIGINT and SIGTERM as stop requests.

``stop_on_signals`` installs handlers that only record a stop request on a
``StopFlag`` (the engine acts on it at the next epoch boundary) and restores
the previous handlers on the way out, unless a signal came: then the process is on its
way out, and from there on SIGINT and SIGTERM are ignored, so that a late
second Ctrl-C cannot turn an orderly end into an abort.  The second signal in the block
makes the request urgent (``StopFlag.urgent``): waits that watch it (connecting, the session's
acceptance, a checkpoint's ack) end at once, and the engine goes straight to
its orderly end (resume the domain, CLOSE, then release the output).  No
handler ever raises: an exception thrown from a handler could land in the
middle of a record being written, and a backup that reads half a record
followed by nothing would take the primary for dead.  And no handler takes a
lock: a handler runs in the main thread, between two of its bytecodes, and a
lock that thread already holds (the one inside the flag's ``threading.Event``,
held for a moment by a wait that is waking or by a first handler that a second
signal interrupted) would never be released.  The handler records the request
without a lock (``StopFlag.request``).

Nor does waking the waiters wait for the handler.  CPython runs a Python handler only
when the main thread next checks between bytecodes, and a signal that lands just before
that thread blocks in a lock (every ``threading`` wait) leaves the handler pending until
the wait ends by its timeout: about one signal in a hundred, sent as a wait begins.  So
the signals also go to a pipe from C (``signal.set_wakeup_fd``), and a relay thread
reading it records the same request and wakes the waiters (``StopFlag.wake``) at once.
Handler and relay each count the signals they see, so the one signal seen twice is still
one: the second signal, not the second sighting, makes the stop urgent.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from types import FrameType
from typing import Iterator, Optional

from remus.clock import StopFlag

_SIGNALS: dict[int, str] = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}


def _relay(read_fd: int, stop: StopFlag, seen: list[int]) -> None:
    """Record each stop signal the C handler wrote to the pipe (on ``stop``, and appended to
    ``seen``) and wake ``stop``'s waiters, until the pipe closes."""
    while True:
        try:
            data = os.read(read_fd, 64)
        except InterruptedError:
            continue
        except OSError:
            return
        if not data:
            return
        for number in data:  # one byte per signal: its number
            if number in _SIGNALS:
                seen.append(number)
                stop.request(_SIGNALS[number], urgent=len(seen) >= 2)
        stop.wake()


@contextlib.contextmanager
def stop_on_signals(stop: StopFlag) -> Iterator[StopFlag]:
    """Turn SIGINT/SIGTERM into a stop request on ``stop`` (the second one: an urgent one)
    for the duration of the block.

    Outside the main thread (where Python cannot install handlers) it installs
    nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    handled: list[int] = []  # by the Python handler
    seen: list[int] = []  # by the relay
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    relay = threading.Thread(target=_relay, args=(read_fd, stop, seen), name="remus-signal-relay", daemon=True)
    relay.start()

    def handler(signum: int, frame: Optional[FrameType]) -> None:
        handled.append(signum)
        stop.request(_SIGNALS.get(signum, str(signum)), urgent=len(handled) >= 2)

    previous = {sig: signal.signal(sig, handler) for sig in _SIGNALS}
    previous_wakeup = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    try:
        yield stop
    finally:
        signal.set_wakeup_fd(previous_wakeup)
        os.close(write_fd)
        relay.join(5.0)  # it has read all the pipe held
        os.close(read_fd)
        for sig, old in previous.items():
            signal.signal(sig, signal.SIG_IGN if handled or seen else old)

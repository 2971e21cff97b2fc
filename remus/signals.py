"""SIGINT and SIGTERM as stop requests.

``stop_on_signals`` installs handlers that only set a ``StopFlag`` (the
engine acts on it at the next epoch boundary) and restores the previous
handlers on the way out, unless a signal came: then the process is on its
way out, and from there on SIGINT and SIGTERM are ignored, so that a late
second Ctrl-C cannot turn an orderly end into an abort.  A second signal while a stop is pending calls
``StopFlag.hurry``: waits that watch it (connecting, the session's
acceptance, a checkpoint's ack) end at once, and the engine goes straight to
its orderly end (resume the domain, CLOSE, then release the output).  No
handler ever raises: an exception thrown from a handler could land in the
middle of a record being written, and a backup that reads half a record
followed by nothing would take the primary for dead.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from types import FrameType
from typing import Iterator, Optional

from remus.clock import StopFlag

_SIGNALS: dict[int, str] = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}


@contextlib.contextmanager
def stop_on_signals(stop: StopFlag) -> Iterator[StopFlag]:
    """Turn SIGINT/SIGTERM into ``stop.set(name)`` (the second one: ``stop.hurry``)
    for the duration of the block.

    Outside the main thread (where Python cannot install handlers) it installs
    nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    signalled = []

    def handler(signum: int, frame: Optional[FrameType]) -> None:
        signalled.append(signum)
        name = _SIGNALS.get(signum, str(signum))
        if stop.is_set():
            stop.hurry(name)
        else:
            stop.set(name)

    previous = {sig: signal.signal(sig, handler) for sig in _SIGNALS}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, signal.SIG_IGN if signalled else old)

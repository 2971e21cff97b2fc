"""SIGINT and SIGTERM as stop requests.

``stop_on_signals`` installs handlers that only set a ``StopFlag`` (the
engine acts on it at the next epoch boundary) and restores the previous
handlers on the way out.  A second signal while a stop is pending raises
``KeyboardInterrupt``, for a user who does not want to wait; the engine's
cleanup still resumes the guest and releases its output.
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
    """Turn SIGINT/SIGTERM into ``stop.set(name)`` for the duration of the block.

    Outside the main thread (where Python cannot install handlers) it installs
    nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum: int, frame: Optional[FrameType]) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set(_SIGNALS.get(signum, str(signum)))

    previous = {sig: signal.signal(sig, handler) for sig in _SIGNALS}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)

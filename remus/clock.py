"""Time for the engine: a monotonic clock, an interruptible wait, and the two pacing rules.

The engine never calls ``time`` directly; it is handed a ``Clock`` so tests can
run it on ``FakeClock``.  A ``StopFlag`` is what signal handlers set; every
wait returns early when it is set.

Pacing (when the next checkpoint starts):

* ``IntervalPacer`` (default, as the xm-era script did): the next suspend is
  ``interval`` after the previous one, or at once when the checkpoint took
  longer, so the period is about max(interval, checkpoint time).
* ``GridPacer`` (``--timer``): suspends happen only on the fixed grid
  ``start + k * interval``.  A checkpoint that runs past a grid point makes
  the next suspend wait for the following one, and each grid point missed
  this way is counted as an overrun.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Optional, Protocol


class StopFlag:
    """Set once (by a signal handler or a test) to end the engine at the next epoch boundary.

    ``set``/``hurry`` wake every waiter at once, but take the lock inside a
    ``threading.Event``: never call them from a signal handler, which runs in
    the main thread and can land while that thread holds the same lock (a wait
    that is waking, or a first handler still in ``set``), and would then wait
    for itself forever.  A handler calls ``request`` instead, which takes no
    lock, and has ``wake`` called from another thread (``remus.signals``).
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self._urgent = threading.Event()
        self._requested = False
        self._requested_urgent = False
        self.reason: Optional[str] = None

    def set(self, reason: str) -> None:
        """Request a stop; only the first reason is kept.  Not from a signal handler (``request``)."""
        if self.reason is None:
            self.reason = reason
        self._event.set()

    def hurry(self, reason: str) -> None:
        """Request a stop that cuts waits short (a second signal).  Not from a signal handler.

        Blocking waits that watch ``urgent`` (connecting, waiting for an ack)
        give up at once; nothing is torn down from here.
        """
        self.set(reason)
        self._urgent.set()

    def request(self, reason: str, urgent: bool = False) -> None:
        """``set`` (or with ``urgent``, ``hurry``) as seen by ``is_set``, ``urgent`` and a
        ``wait`` that starts after it, taking no lock: safe in a signal handler.  A wait
        already under way ends only once ``wake`` runs."""
        if self.reason is None:
            self.reason = reason
        if urgent:
            self._requested_urgent = True
        self._requested = True

    def wake(self) -> None:
        """Pass what ``request`` recorded on to the waiters (from a thread, never a handler)."""
        if self._requested:
            self._event.set()
        if self._requested_urgent:
            self._urgent.set()

    def is_set(self) -> bool:
        return self._requested or self._event.is_set()

    @property
    def urgent(self) -> bool:
        """True once ``hurry`` was called."""
        return self._requested_urgent or self._urgent.is_set()

    def wait(self, timeout_s: float) -> bool:
        """Sleep up to ``timeout_s``; True if the flag was set."""
        return self._requested or self._event.wait(max(0.0, timeout_s))


class Clock(Protocol):
    """Monotonic seconds, and a wait that a ``StopFlag`` interrupts."""

    def now(self) -> float: ...

    def wait_until(self, deadline: float, stop: StopFlag) -> bool:
        """Block until ``deadline``; False if ``stop`` was set first."""


class MonotonicClock:
    """The real clock: ``time.monotonic``."""

    def now(self) -> float:
        return time.monotonic()

    def wait_until(self, deadline: float, stop: StopFlag) -> bool:
        while True:
            remaining = deadline - time.monotonic()
            if stop.is_set():
                return False
            if remaining <= 0:
                return True
            if stop.wait(remaining):
                return False


class FakeClock:
    """A clock that moves only when told to (``advance``) or when waited on."""

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += seconds

    def wait_until(self, deadline: float, stop: StopFlag) -> bool:
        if stop.is_set():
            return False
        self._now = max(self._now, deadline)
        return not stop.is_set()


class IntervalPacer:
    """Next suspend ``interval_s`` after the last one; immediately if already late."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.overruns = 0

    def next_start(self, last_suspend: float, now: float) -> float:
        return max(now, last_suspend + self.interval_s)


class GridPacer:
    """Suspends only on ``origin + k * interval_s``; missed grid points are overruns."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.origin: Optional[float] = None
        self.overruns = 0

    def next_start(self, last_suspend: float, now: float) -> float:
        if self.origin is None:
            self.origin = last_suspend
        # Suspends sit on the grid, so the one just done is grid point k_due - 1.
        k_due = round((last_suspend - self.origin) / self.interval_s) + 1
        due = self.origin + k_due * self.interval_s
        if now <= due:
            return due
        k_next = math.floor((now - self.origin) / self.interval_s) + 1
        self.overruns += k_next - k_due
        return self.origin + k_next * self.interval_s

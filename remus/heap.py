"""Giving freed heap memory back to the system after a large checkpoint.

A checkpoint that carries much of the guest (the first one carries all of it)
passes through the primary as thousands of page-sized buffers.  Once it is
sent they are freed, but glibc keeps freed memory in its heaps for reuse, so
the process stays as large as its largest checkpoint for the rest of the
session: in the Xen lab, 250 MiB instead of 119 MiB for a 128 MiB guest.
Besides memory, the kernel tears a SIGKILLed process's memory down before it
closes its sockets (``do_exit`` runs ``exit_mm`` before ``exit_files``), so
a backup on the same host sees a smaller primary die sooner.

``trim()`` asks glibc (``malloc_trim``) to return its free pages.  The engine
calls it once such a checkpoint is acknowledged and its buffers dropped, and
then every ``TRIM_EVERY_S`` (``TrimSchedule``): the catch-up checkpoints
right after the first one leave megabytes behind too (the simulated 128 MiB
guest's primary: 47 MiB of private memory, 30 MiB after a trim taking 0.6 to
1.8 ms, and 2 to 3 MiB regrown per 8 s).  The receiver trims once it has
committed a large checkpoint (there it gave back 0.07 of a 256 MiB guest's
size).

Never frees anything still in use (it only drops pages glibc holds free), and
never raises: where the C library has no ``malloc_trim`` (musl, other
systems) it does nothing and says so by returning False.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Callable, Optional

#: A checkpoint of at least this many raw bytes is followed by a trim (8192 pages).
TRIM_AFTER_BYTES = 32 << 20
#: Otherwise the primary trims after a checkpoint once this long has passed since the last trim.
TRIM_EVERY_S = 10.0


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Optional[Callable[[int], int]]:
    try:
        function = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return None
    function.argtypes = [ctypes.c_size_t]
    function.restype = ctypes.c_int
    return function


def trim() -> bool:
    """Return the heap's free pages to the system; False where the C library cannot."""
    function = _malloc_trim()
    if function is None:
        return False
    function(0)
    return True


def worth_trimming(raw_bytes: int) -> bool:
    """Whether a checkpoint of ``raw_bytes`` left enough freed memory behind to trim."""
    return raw_bytes >= TRIM_AFTER_BYTES


class TrimSchedule:
    """When the primary gives its heap back: after a large checkpoint, and every ``every_s``.

    ``due`` is asked once per acknowledged checkpoint, never inside a pause; it only
    decides, and never trims itself.
    """

    def __init__(self, now: float, every_s: float = TRIM_EVERY_S) -> None:
        self.every_s = every_s
        self._last = now

    def due(self, raw_bytes: int, now: float) -> bool:
        """Whether to trim now, after a checkpoint of ``raw_bytes``; a True answer counts as done."""
        if worth_trimming(raw_bytes) or now - self._last >= self.every_s:
            self._last = now
            return True
        return False

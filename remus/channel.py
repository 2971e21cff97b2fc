"""Where checkpoints go: the engine's view of the backup.

A ``Channel`` takes the session's opening bytes once (``open``), then framed
checkpoints (``send``), and tells when the backup holds one
(``wait_for_ack``).  ``close`` ends the session in order and says whether the
backup confirmed it; ``abort`` drops it.  ``out_of_contact`` says whether the
primary has been cut off from the backup (either way) for longer than the
backup's takeover timeout, in which case the backup may already run the
domain and the primary must hold still (``remus.errors.HoldStill``).
Implementations: ``BlackholeChannel`` here (``--blackhole``: bytes go to
/dev/null, every checkpoint counts as acknowledged at once, as with the
xm-era NullSocket) and ``remus.transport.TcpChannel``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Protocol

from remus.stream.sender import FramedCheckpoint

#: How long a primary that gives up on its backup waits for its CLOSE to be taken.
GIVE_UP_CLOSE_TIMEOUT_S = 0.5
#: How long an orderly stop waits for the backup to confirm the CLOSE (it closes its side).
CLOSE_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class Silence:
    """Why the backup may already run the domain: ``reason`` in words, and the wall-clock
    time (``since_unix``) from which it may have taken over."""

    reason: str
    since_unix: float


class Channel(Protocol):
    """The primary's connection to its backup (see the module docstring)."""

    def open(self, opening: bytes) -> None:
        """Send the stream header and session record.  Raises ``TransportError``
        (``Interrupted`` when a second stop request cut it short)."""

    def send(self, checkpoint: FramedCheckpoint) -> None:
        """Write one framed checkpoint.  Raises ``BackupLost``."""

    def wait_for_ack(self, seq: int) -> None:
        """Block until the backup acknowledges ``seq``.  Raises ``BackupLost``, ``Interrupted``
        or ``HoldStill``."""

    def close(self, message: str, *, error: bool = False, timeout_s: float = CLOSE_TIMEOUT_S) -> bool:
        """End the session in order: stop heartbeats, send CLOSE (reason STOPPED, or ERROR
        when the primary gives up), wait up to ``timeout_s`` for the backup to confirm.

        True when the backup confirmed (or there is none to confirm); never raises.
        """

    def abort(self) -> None:
        """Drop the connection without ceremony (idempotent)."""

    def out_of_contact(self) -> Optional[Silence]:
        """A ``Silence`` if the backup may have taken over by now, else None."""


class BlackholeChannel:
    """``--blackhole``: write everything to /dev/null; acks are immediate."""

    def __init__(self, path: str = os.devnull) -> None:
        self._path = path
        self._fd: int | None = None
        self.bytes_written = 0

    def open(self, opening: bytes) -> None:
        self._fd = os.open(self._path, os.O_WRONLY | os.O_CLOEXEC)
        self._write(opening)

    def send(self, checkpoint: FramedCheckpoint) -> None:
        for chunk in checkpoint.chunks:
            self._write(chunk)

    def wait_for_ack(self, seq: int) -> None:
        return None

    def close(self, message: str, *, error: bool = False, timeout_s: float = CLOSE_TIMEOUT_S) -> bool:
        self.abort()
        return True

    def abort(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def out_of_contact(self) -> Optional[Silence]:
        return None  # no backup, nobody to take over

    def _write(self, data: bytes) -> None:
        assert self._fd is not None, "BlackholeChannel used before open()"
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        self.bytes_written += len(data)

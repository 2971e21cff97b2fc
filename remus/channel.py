"""Where checkpoints go: the engine's view of the backup.

A ``Channel`` takes the session's opening bytes once (``open``), then framed
checkpoints (``send``), and tells when the backup holds one
(``wait_for_ack``).  ``close`` ends the session in order; ``abort`` drops it.
Implementations: ``BlackholeChannel`` here (``--blackhole``: bytes go to
/dev/null, every checkpoint counts as acknowledged at once, as with the
xm-era NullSocket) and ``remus.transport.TcpChannel``.
"""

from __future__ import annotations

import os
from typing import Protocol

from remus.stream.sender import EncodedCheckpoint


class Channel(Protocol):
    """The primary's connection to its backup (see the module docstring)."""

    def open(self, opening: bytes) -> None:
        """Send the stream header and session record.  Raises ``TransportError``."""

    def send(self, checkpoint: EncodedCheckpoint) -> None:
        """Write one framed checkpoint.  Raises ``BackupLost``."""

    def wait_for_ack(self, seq: int) -> None:
        """Block until the backup acknowledges ``seq``.  Raises ``BackupLost``."""

    def close(self, message: str) -> None:
        """Orderly end: tell the backup the primary stopped on purpose."""

    def abort(self) -> None:
        """Drop the connection without ceremony (idempotent)."""


class BlackholeChannel:
    """``--blackhole``: write everything to /dev/null; acks are immediate."""

    def __init__(self, path: str = os.devnull) -> None:
        self._path = path
        self._fd: int | None = None
        self.bytes_written = 0

    def open(self, opening: bytes) -> None:
        self._fd = os.open(self._path, os.O_WRONLY | os.O_CLOEXEC)
        self._write(opening)

    def send(self, checkpoint: EncodedCheckpoint) -> None:
        for chunk in checkpoint.chunks:
            self._write(chunk)

    def wait_for_ack(self, seq: int) -> None:
        return None

    def close(self, message: str) -> None:
        self.abort()

    def abort(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _write(self, data: bytes) -> None:
        assert self._fd is not None, "BlackholeChannel used before open()"
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        self.bytes_written += len(data)

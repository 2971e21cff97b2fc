"""The link over a blocking socket: run the handshake, then send and open sealed frames.

``initiate`` (the primary) and ``respond`` (a backup that serves one
connection in a thread) run the handshake of ``remus.link.handshake`` under
one deadline and return a ``SealedLink``.  A nonblocking server drives
``Responder`` itself and builds the ``SealedLink`` with ``from_keys``.

``SealedLink.send`` seals and writes under one lock, so frames leave in the
order of their nonces even when heartbeats are written from another thread.
Reading (``receive_data``) belongs to one thread.

This module never parses the replication stream: it carries bytes.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Optional, Union

from remus.errors import TransportError
from remus.link.handshake import Initiator, LinkKeys, Responder
from remus.link.seal import FrameOpener, FrameSealer, NullOpener, NullSealer, Opener, Sealer

#: How long a handshake may take, start to end, unless the caller says otherwise.
HANDSHAKE_TIMEOUT_S = 5.0
#: Buffers handed to one sendmsg call (Linux's IOV_MAX is 1024).
_IOV_MAX = 512


class SealedLink:
    """Both directions of one authenticated connection: a Sealer out, an Opener in."""

    def __init__(self, sealer: FrameSealer, opener: FrameOpener, transcript_hash: bytes = b"",
                 unused_data: bytes = b"") -> None:
        self.sealer = sealer
        self.opener = opener
        self.transcript_hash = transcript_hash
        self._lock = threading.Lock()
        self._pending = unused_data

    @classmethod
    def from_keys(cls, keys: LinkKeys, unused_data: bytes = b"") -> "SealedLink":
        """The link a finished handshake gives; ``unused_data`` is the handshake's ``unused_data``."""
        return cls(Sealer(keys.send_key), Opener(keys.recv_key), keys.transcript_hash, unused_data)

    @classmethod
    def unsealed(cls) -> "SealedLink":
        """BENCHMARK ONLY: the same framing with no cryptography (see ``remus.link.seal``)."""
        return cls(NullSealer(), NullOpener())

    @property
    def session_id(self) -> str:
        """A short, public name for this session (the start of the transcript hash), for logs."""
        return self.transcript_hash[:8].hex()

    def seal(self, plaintext: bytes) -> bytes:
        """Frames for ``plaintext``; the caller must send the results in the order this returned them.

        Raises:
            LocalProtocolError: after ``final``.
        """
        with self._lock:
            return self.sealer.seal(plaintext)

    def send(self, sock: socket.socket, plaintext: bytes) -> None:
        """Seal ``plaintext`` and write it whole to the blocking ``sock`` (thread-safe).

        The frames go out in one gathering write (``sendmsg``), never joined
        into one large buffer.

        Raises:
            OSError: the socket failed (the link is then unusable).
        """
        with self._lock:
            send_all(sock, self.sealer.seal_frames(plaintext))

    def send_final(self, sock: socket.socket) -> None:
        """Write the FINAL frame: this side has ended the stream in order."""
        with self._lock:
            sock.sendall(self.sealer.final())

    def receive_data(self, data: bytes) -> list[bytes]:
        """Plaintexts of the frames completed by ``data`` (``b""``: EOF).  One reader thread only.

        Raises:
            AuthenticationFailed: see ``remus.link.seal.Opener.receive_data``.
        """
        if self._pending:
            pending, self._pending = self._pending, b""
            opened = self.opener.receive_data(pending)
            return opened + self.opener.receive_data(data)
        return self.opener.receive_data(data)

    @property
    def peer_closed(self) -> bool:
        """True once the peer's FINAL frame arrived."""
        return self.opener.peer_closed


def send_all(sock: socket.socket, buffers: list[bytes]) -> None:
    """``sendall`` of several buffers in order, gathered by ``sendmsg`` (which may write part of them)."""
    views = [memoryview(b) for b in buffers if b]
    while views:
        sent = sock.sendmsg(views[:_IOV_MAX])
        while sent:
            if sent >= len(views[0]):
                sent -= len(views.pop(0))
            else:
                views[0] = views[0][sent:]
                sent = 0


def initiate(sock: socket.socket, key: bytes, timeout_s: float = HANDSHAKE_TIMEOUT_S) -> SealedLink:
    """Run the primary's side of the handshake on the connected blocking ``sock``.

    Reads no byte past the handshake.  ``sock``'s timeout is restored after.

    Raises:
        AuthenticationFailed: the backup failed a check or closed the connection
            (it does not hold the key, or speaks the old protocol).
        TransportError: no answer within ``timeout_s``, or the socket failed.
    """
    handshake = Initiator(key)
    _run(sock, handshake, handshake.start(), timeout_s, "the backup")
    return SealedLink.from_keys(handshake.result, handshake.unused_data)


def respond(sock: socket.socket, key: bytes, timeout_s: float = HANDSHAKE_TIMEOUT_S) -> SealedLink:
    """Run the backup's side of the handshake on the accepted blocking ``sock``.

    Raises:
        AuthenticationFailed: the primary failed a check or closed the connection.
        TransportError: the handshake did not end within ``timeout_s``, or the socket failed.
    """
    handshake = Responder(key)
    _run(sock, handshake, b"", timeout_s, "the primary")
    return SealedLink.from_keys(handshake.result, handshake.unused_data)


def _run(sock: socket.socket, handshake: Union[Initiator, Responder], first: bytes, timeout_s: float,
         peer: str) -> None:
    deadline = time.monotonic() + timeout_s
    saved: Optional[float] = sock.gettimeout()
    try:
        outgoing = first
        while True:
            if outgoing:
                _settimeout(sock, deadline)
                sock.sendall(outgoing)
            if handshake.done:
                return
            _settimeout(sock, deadline)
            handshake.receive_data(sock.recv(handshake.bytes_needed))
            outgoing = handshake.data_to_send()
    except socket.timeout:
        raise TransportError(f"{peer} did not complete the link handshake within {timeout_s:g} s") from None
    except OSError as exc:
        raise TransportError(f"the link handshake with {peer} failed: {exc.strerror or exc}") from None
    finally:
        try:
            sock.settimeout(saved)
        except OSError:
            pass


def _settimeout(sock: socket.socket, deadline: float) -> None:
    left = deadline - time.monotonic()
    if left <= 0:
        raise socket.timeout()
    sock.settimeout(left)

"""Raw TCP between primary and backup: connecting, heartbeats, and the primary's channel.

No ssh and no relocation-server handshake: the primary connects to
``destination:port`` and both sides speak the record stream of
``remus.stream``.  Each side sends its stream header, then HEARTBEAT records
every ``HEARTBEAT_INTERVAL_S`` from a thread of its own, whatever the
checkpoints are doing, so a slow checkpoint is never mistaken for a dead
peer; any bytes received count as a sign of life.  Writes from different
threads are serialised per record chunk (``LockedSocket``), so a heartbeat
never lands inside a record.

``TcpChannel`` is the primary's ``Channel``: checkpoints out, ACKs in, and
``BackupLost`` once the backup closes, resets, refuses the session or stays
silent for ``ack_timeout_ms``.
"""

from __future__ import annotations

import errno
import logging
import socket
import threading
import time
from typing import Callable, Optional

from remus.errors import AuthenticationFailed, BackupLost, RemoteProtocolError, RemusError, TransportError
from remus.link.blocking import SealedLink, initiate
from remus.stream.codec import EndOfStream, StreamDecoder, encode_record
from remus.stream.records import Accept, Ack, Close, CloseReason, Heartbeat, StreamHeader
from remus.stream.sender import EncodedCheckpoint

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_S = 0.1
CONNECT_TIMEOUT_S = 10.0
_RECV_BYTES = 1 << 18


def display_address(host: str, port: int) -> str:
    """``host:port``, with brackets around IPv6 literals."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def strip_brackets(host: str) -> str:
    """Accept ``[::1]`` as well as ``::1``."""
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def tune(sock: socket.socket) -> None:
    """Small records (acks, heartbeats) go out at once; dead peers are noticed by TCP too."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)


def connect(host: str, port: int, timeout_s: float = CONNECT_TIMEOUT_S) -> socket.socket:
    """A connected, tuned TCP socket to ``host:port`` (names, IPv4 and IPv6).

    Raises:
        TransportError: in plain words (no receiver listening, unknown host, unreachable, timeout).
    """
    host = strip_brackets(host)
    where = display_address(host, port)
    if not host:
        raise TransportError("the destination host is empty")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise TransportError(f"cannot resolve host {host!r}: {exc.strerror}") from None
    last: Optional[OSError] = None
    for family, kind, proto, _name, addr in infos:
        sock = socket.socket(family, kind, proto)
        sock.settimeout(timeout_s)
        try:
            sock.connect(addr)
        except OSError as exc:
            sock.close()
            last = exc
            continue
        tune(sock)
        return sock
    assert last is not None
    if isinstance(last, ConnectionRefusedError):
        raise TransportError(f"no remus-receiver is listening on {where}") from None
    if isinstance(last, socket.timeout):
        raise TransportError(f"could not reach {where} within {timeout_s:.0f} s") from None
    reason = last.strerror or str(last)
    raise TransportError(f"cannot connect to {where}: {reason}") from None


class LockedSocket:
    """``sendall`` from several threads without interleaving inside a chunk."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._lock = threading.Lock()

    def send(self, data: bytes) -> None:
        with self._lock:
            self.sock.sendall(data)


class SealedSocket:
    """``send`` from several threads through the sealed link (``remus.link``): each call's
    bytes become whole frames, in nonce order, never interleaved."""

    def __init__(self, sock: socket.socket, link: SealedLink) -> None:
        self.sock = sock
        self.link = link

    def send(self, data: bytes) -> None:
        self.link.send(self.sock, data)


class Heartbeats:
    """Sends a HEARTBEAT record every ``interval_s`` until stopped or the socket fails."""

    def __init__(self, out: "LockedSocket | SealedSocket", interval_s: float = HEARTBEAT_INTERVAL_S,
                 on_error: Optional[Callable[[OSError], None]] = None) -> None:
        self._out = out
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._on_error = on_error
        self._thread = threading.Thread(target=self._run, name="remus-heartbeat", daemon=True)
        self.sent = 0

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self._out.send(encode_record(Heartbeat(self.sent)))
            except OSError as exc:
                if self._on_error is not None:
                    self._on_error(exc)
                return
            self.sent += 1

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=2)


class TcpChannel:
    """The primary's connection to ``remus-receiver`` (see the module docstring)."""

    def __init__(self, host: str, port: int, *, key: bytes, ack_timeout_ms: int = 5000,
                 connect_timeout_s: float = CONNECT_TIMEOUT_S,
                 heartbeat_interval_s: float = HEARTBEAT_INTERVAL_S) -> None:
        self.host = strip_brackets(host)
        self.port = port
        self.where = display_address(self.host, port)
        self.ack_timeout_s = ack_timeout_ms / 1000.0
        self.connect_timeout_s = connect_timeout_s
        self.heartbeat_interval_s = heartbeat_interval_s
        self.key = key
        #: What the backup said in its ACCEPT: after how long without a word from us it may take over.
        self.accepted: Optional[Accept] = None
        self._sock: Optional[socket.socket] = None
        self._link: Optional[SealedLink] = None
        self._out: Optional[SealedSocket] = None
        self._heartbeats: Optional[Heartbeats] = None
        self._reader: Optional[threading.Thread] = None
        self._cond = threading.Condition()
        self._acked = -1
        self._lost: Optional[str] = None
        self._closing = False
        self._last_heard = time.monotonic()

    # -- Channel -------------------------------------------------------------------------
    def open(self, opening: bytes) -> None:
        sock = connect(self.host, self.port, self.connect_timeout_s)
        try:
            link = initiate(sock, self.key, self.connect_timeout_s)
        except AuthenticationFailed as exc:
            sock.close()
            raise TransportError(f"the receiver at {self.where} did not authenticate: {exc} "
                                 "(both hosts need the same key file: see remus-keygen)") from None
        except (RemusError, OSError) as exc:
            sock.close()
            raise TransportError(f"no authenticated link to {self.where}: {exc}") from None
        sock.settimeout(self.ack_timeout_s)
        self._sock = sock
        self._link = link
        self._out = SealedSocket(sock, link)
        self._last_heard = time.monotonic()
        self._reader = threading.Thread(target=self._read_loop, name="remus-ack-reader", daemon=True)
        self._reader.start()
        self._send(opening)
        try:
            self.wait_for_ack(0, timeout_s=self.connect_timeout_s)  # the session was accepted
        except BackupLost as exc:
            self.abort()
            raise TransportError(str(exc)) from None
        self._heartbeats = Heartbeats(self._out, self.heartbeat_interval_s, self._write_failed)
        self._heartbeats.start()

    def send(self, checkpoint: EncodedCheckpoint) -> None:
        for chunk in checkpoint.chunks:
            self._send(chunk)

    def wait_for_ack(self, seq: int, timeout_s: Optional[float] = None) -> None:
        silence_s = self.ack_timeout_s if timeout_s is None else timeout_s
        with self._cond:
            while True:
                if self._acked >= seq:
                    return
                if self._lost is not None:
                    raise BackupLost(self._lost)
                quiet = time.monotonic() - self._last_heard
                if quiet >= silence_s:
                    self._set_lost(f"no ack or heartbeat from the backup at {self.where} for {quiet:.1f} s")
                    raise BackupLost(self._lost or "")
                self._cond.wait(min(0.1, silence_s - quiet))

    def close(self, message: str) -> None:
        self._closing = True
        if self._heartbeats is not None:
            self._heartbeats.stop()  # no heartbeat may follow the CLOSE
        try:
            if self._out is not None:
                self._out.send(encode_record(Close(CloseReason.STOPPED, message)))
                assert self._sock is not None and self._link is not None
                self._link.send_final(self._sock)
                self._sock.shutdown(socket.SHUT_WR)
                if self._reader is not None:
                    self._reader.join(timeout=2)  # the backup closes its side in turn
        except OSError:
            pass
        finally:
            self.abort()

    def abort(self) -> None:
        self._closing = True
        if self._heartbeats is not None:
            self._heartbeats.stop()
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()
            self._sock = None
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(timeout=2)

    # -- internals -------------------------------------------------------------------------
    def _send(self, data: bytes) -> None:
        if self._lost is not None:
            raise BackupLost(self._lost)
        assert self._out is not None, "TcpChannel used before open()"
        try:
            self._out.send(data)
        except socket.timeout:
            self._set_lost(f"the backup at {self.where} stopped taking data for {self.ack_timeout_s:.1f} s")
            raise BackupLost(self._lost or "") from None
        except OSError as exc:
            self._write_failed(exc)
            raise BackupLost(self._lost or "") from None

    def _write_failed(self, exc: OSError) -> None:
        if exc.errno in (errno.EPIPE, errno.ECONNRESET):
            self._set_lost(f"the backup at {self.where} closed the connection")
        else:
            self._set_lost(f"writing to the backup at {self.where} failed: {exc.strerror or exc}")

    def _set_lost(self, reason: str) -> None:
        with self._cond:
            if self._lost is None:
                self._lost = reason
            self._cond.notify_all()

    def _read_loop(self) -> None:
        decoder = StreamDecoder(max_record_bytes=64 * 1024)
        sock = self._sock
        assert sock is not None
        try:
            while True:
                try:
                    data = sock.recv(_RECV_BYTES)
                except socket.timeout:
                    with self._cond:
                        self._cond.notify_all()  # let wait_for_ack look at the silence
                    continue
                with self._cond:
                    self._last_heard = time.monotonic()
                assert self._link is not None
                try:
                    plaintexts = self._link.receive_data(data)
                except AuthenticationFailed as exc:
                    if data:
                        raise RemoteProtocolError(f"the sealed link failed its check: {exc}") from None
                    plaintexts = []  # EOF inside a frame: treated as the EOF it is
                for plain in plaintexts:
                    decoder.receive_data(plain)
                if not data:
                    decoder.receive_data(b"")
                for event in decoder.events():
                    if isinstance(event, EndOfStream):
                        if not self._closing:
                            self._set_lost(f"the backup at {self.where} closed the connection")
                        return
                    self._on_event(event)
        except RemoteProtocolError as exc:
            self._set_lost(f"the backup at {self.where} sent an invalid stream: {exc}")
        except OSError as exc:
            if not self._closing:
                self._set_lost(f"the connection to the backup at {self.where} failed: {exc.strerror or exc}")
        finally:
            with self._cond:
                self._cond.notify_all()

    def _on_event(self, event: object) -> None:
        if isinstance(event, Ack):
            with self._cond:
                if event.seq > self._acked:
                    self._acked = event.seq
                self._cond.notify_all()
        elif isinstance(event, Close):
            reason = CloseReason(event.reason).name.lower()
            self._set_lost(f"the backup at {self.where} ended the session ({reason}): {event.message}")
        elif isinstance(event, Accept):
            self.accepted = event
        elif isinstance(event, (Heartbeat, StreamHeader)):
            pass
        else:
            self._set_lost(f"the backup at {self.where} sent an unexpected {type(event).__name__} record")

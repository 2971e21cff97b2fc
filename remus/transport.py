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
silent for ``ack_timeout_ms`` (the primary's give-up timeout).

Theory of operation of the primary's timing.  The session record carries the
give-up timeout as ``give_up_ms``; the backup answers ACCEPT with its
``takeover_ms`` (at least ``give_up_ms + TAKEOVER_MARGIN_MS``; a backup that
sends no ACCEPT is assumed to use exactly that), then ACK 0.  From then on
the channel keeps track of contact both ways: when it last heard from the
backup, and whether its own heartbeat thread ever went longer than
``takeover_ms`` between two beats (a stopped or stalled primary sends
nothing, so the backup hears nothing).  Gaps are latched when they are seen,
so heartbeats that the backup sent while this process was stopped, all read
at once after SIGCONT, never hide the stall.  ``out_of_contact`` reports
either; the engine then holds still (``remus.errors.HoldStill``).

Ending: ``close`` stops the heartbeat thread (joined; no heartbeat can be
written after it returns), then writes CLOSE, then waits a bounded time for
the backup to close its side, which confirms the CLOSE was read.  A CLOSE
from the backup ends the session in order whatever follows it in the same
read.  A second stop request (``StopFlag.hurry``) cuts connecting and every
wait short with ``Interrupted``; a first one cuts only connecting and the
wait for the session's acceptance.

Dying: with ``death_watch`` (the ``remus`` command), a helper shuts the
connection as soon as this process's main thread starts to exit, so a killed
primary's backup hears of it before the kernel has torn the process down
(``remus.deathwatch``); ``abort`` disarms it before closing the socket.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import threading
import time
from typing import Callable, Optional

from remus.channel import CLOSE_TIMEOUT_S, Silence
from remus.clock import StopFlag
from remus.deathwatch import DeathWatch, watch_death
from remus.errors import AuthenticationFailed, BackupLost, Interrupted, RemoteProtocolError, RemusError, TransportError
from remus.link.blocking import SealedLink, initiate
from remus.settings import TAKEOVER_MARGIN_MS
from remus.stream.codec import EndOfStream, StreamDecoder, encode_record
from remus.stream.records import Accept, Ack, Close, CloseReason, DiskHashes, Heartbeat, StreamHeader
from remus.stream.sender import FramedCheckpoint

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_S = 0.1
CONNECT_TIMEOUT_S = 10.0
#: The longest an orderly stop waits for a backup that is still talking to confirm its CLOSE.
CLOSE_CAP_S = 30.0
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


def connect(host: str, port: int, timeout_s: float = CONNECT_TIMEOUT_S,
            stop: Optional[StopFlag] = None) -> socket.socket:
    """A connected, tuned TCP socket to ``host:port`` (names, IPv4 and IPv6).

    A stop request on ``stop`` ends the attempt at once.

    Raises:
        Interrupted: ``stop`` was set while connecting.
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
        try:
            _connect_interruptibly(sock, addr, timeout_s, stop)
        except OSError as exc:
            sock.close()
            last = exc
            continue
        except BaseException:
            sock.close()
            raise
        sock.settimeout(timeout_s)
        tune(sock)
        return sock
    assert last is not None
    if isinstance(last, ConnectionRefusedError):
        raise TransportError(f"no remus-receiver is listening on {where}") from None
    if isinstance(last, socket.timeout):
        raise TransportError(f"could not reach {where} within {timeout_s:.0f} s") from None
    reason = last.strerror or str(last)
    raise TransportError(f"cannot connect to {where}: {reason}") from None


def _connect_interruptibly(sock: socket.socket, addr: object, timeout_s: float,
                          stop: Optional[StopFlag]) -> None:
    """``sock.connect(addr)`` that gives up at ``timeout_s`` or when ``stop`` is set."""
    sock.setblocking(False)
    code = sock.connect_ex(addr)  # type: ignore[arg-type]
    deadline = time.monotonic() + timeout_s
    while code in (errno.EINPROGRESS, errno.EALREADY, errno.EWOULDBLOCK, errno.EINTR):
        if stop is not None and stop.is_set():
            raise Interrupted("stopped while connecting to the backup")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise socket.timeout("timed out")
        _, writable, _ = select.select([], [sock], [], min(0.05, remaining))
        if writable:
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            break
    if code == errno.ECONNREFUSED:
        raise ConnectionRefusedError(code, os.strerror(code))
    if code != 0:
        raise OSError(code, os.strerror(code))
    sock.setblocking(True)


class LockedSocket:
    """``sendall`` from several threads without interleaving inside a chunk."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._lock = threading.Lock()

    def send(self, data: bytes) -> None:
        with self._lock:
            self.sock.sendall(data)

    def send_unless(self, data: bytes, cancelled: threading.Event) -> bool:
        """Send ``data`` unless ``cancelled`` is set, checked under the lock; True if sent."""
        with self._lock:
            if cancelled.is_set():
                return False
            self.sock.sendall(data)
            return True


class SealedSocket:
    """``LockedSocket`` through the sealed link (``remus.link``): each call's bytes become
    whole frames, in nonce order, never interleaved between threads."""

    def __init__(self, sock: socket.socket, link: SealedLink) -> None:
        self.sock = sock
        self.link = link
        self._lock = threading.Lock()

    def send(self, data: bytes) -> None:
        with self._lock:
            self.link.send(self.sock, data)

    def send_unless(self, data: bytes, cancelled: threading.Event) -> bool:
        """Send ``data`` unless ``cancelled`` is set, checked under the lock; True if sent."""
        with self._lock:
            if cancelled.is_set():
                return False
            self.link.send(self.sock, data)
            return True

    def send_final(self) -> None:
        """The link's FINAL frame: this side ended its stream in order."""
        with self._lock:
            self.link.send_final(self.sock)

    def send_last(self, data: bytes) -> None:
        """``data`` and then the FINAL frame, in one write: a backup that closes as soon as
        it has read ``data`` (a CLOSE) finds nothing unread behind it (unread bytes would
        make its kernel answer with a reset instead of an orderly end)."""
        with self._lock:
            self.sock.sendall(self.link.seal(data) + self.link.sealer.final())


class Heartbeats:
    """Sends a HEARTBEAT record every ``interval_s`` until stopped or the socket fails.

    After ``stop`` returns no heartbeat is written any more, even if the thread
    could not be joined in time (the stop is checked under the socket's lock).
    ``on_beat(now)`` is called at each wake-up, before the beat is written,
    with ``time.monotonic()``: a caller can see gaps in the schedule there.
    """

    def __init__(self, out: "LockedSocket | SealedSocket", interval_s: float = HEARTBEAT_INTERVAL_S,
                 on_error: Optional[Callable[[OSError], None]] = None,
                 on_beat: Optional[Callable[[float], None]] = None) -> None:
        self._out = out
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._on_error = on_error
        self._on_beat = on_beat
        self._thread = threading.Thread(target=self._run, name="remus-heartbeat", daemon=True)
        self.sent = 0

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            if self._on_beat is not None:
                self._on_beat(time.monotonic())
            try:
                if not self._out.send_unless(encode_record(Heartbeat(self.sent)), self._stop):
                    return
            except OSError as exc:
                if self._on_error is not None:
                    self._on_error(exc)
                return
            self.sent += 1

    def stop(self) -> None:
        """Stop beating and join the thread (bounded); no beat is written after this returns."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=2)


class _Contact:
    """Contact with the backup, both ways, as seen from the primary (see the module docstring).

    Every method is called with the channel's condition held.
    """

    def __init__(self, takeover_s: Optional[float]) -> None:
        self.takeover_s = takeover_s  # None: the backup never takes over by itself
        now, wall = time.monotonic(), time.time()
        self.heard, self.heard_wall = now, wall
        self.beat: Optional[float] = None
        self.beat_wall = wall
        self.acked, self.acked_wall = now, wall
        self.latched: Optional[Silence] = None

    def acked_now(self) -> None:
        """An ACK arrived: proof that the backup heard this primary a moment ago."""
        self.acked, self.acked_wall = time.monotonic(), time.time()

    def check_proof(self) -> None:
        """Latch a silence if the backup has proved it hears us (an ACK) longer than
        its takeover timeout ago.  Only asked when the backup did not confirm the end:
        its heartbeats say it is alive, not that our bytes reach it (a link cut in one
        direction only)."""
        self._gap(time.monotonic() - self.acked, self.acked_wall,
                  "the backup acknowledged nothing (it may not have heard this primary)")

    def heard_now(self) -> None:
        now, wall = time.monotonic(), time.time()
        self._gap(now - self.heard, self.heard_wall, "nothing was heard from the backup")
        self.heard, self.heard_wall = now, wall

    def beat_now(self, now: float) -> None:
        wall = time.time()
        if self.beat is not None:
            self._gap(now - self.beat, self.beat_wall,
                      "this process was stopped or stalled (it sent the backup nothing)")
        self.beat, self.beat_wall = now, wall

    def _gap(self, gap_s: float, since_wall: float, what: str) -> None:
        if self.latched is None and self.takeover_s is not None and gap_s > self.takeover_s:
            self.latched = Silence(f"{what} for {gap_s:.1f} s, longer than the backup's takeover "
                                   f"timeout ({self.takeover_s:.1f} s)", since_wall + self.takeover_s)

    def silence(self, beating: bool) -> Optional[Silence]:
        if self.latched is not None or self.takeover_s is None:
            return self.latched
        now = time.monotonic()
        # Live gaps: the thread that would latch them may not have run yet (just after SIGCONT).
        self._gap(now - self.heard, self.heard_wall, "nothing was heard from the backup")
        if beating and self.beat is not None:
            self._gap(now - self.beat, self.beat_wall,
                      "this process was stopped or stalled (it sent the backup nothing)")
        return self.latched


class TcpChannel:
    """The primary's connection to ``remus-receiver`` (see the module docstring)."""

    def __init__(self, host: str, port: int, *, key: bytes, ack_timeout_ms: int = 5000,
                 connect_timeout_s: float = CONNECT_TIMEOUT_S,
                 heartbeat_interval_s: float = HEARTBEAT_INTERVAL_S,
                 stop: Optional[StopFlag] = None, death_watch: bool = False) -> None:
        self.host = strip_brackets(host)
        self.port = port
        self.where = display_address(self.host, port)
        self.ack_timeout_s = ack_timeout_ms / 1000.0
        self.give_up_ms = ack_timeout_ms
        self.connect_timeout_s = connect_timeout_s
        self.heartbeat_interval_s = heartbeat_interval_s
        self.key = key
        self.stop = stop or StopFlag()
        #: Arm ``remus.deathwatch`` on the connection (the ``remus`` command does).
        self.death_watch = death_watch
        self._watch: Optional[DeathWatch] = None
        #: The backup's takeover timeout: from its ACCEPT, else the timing rule's minimum;
        #: None when it never takes over by itself (``--takeover=manual``).
        self.takeover_ms: Optional[int] = ack_timeout_ms + TAKEOVER_MARGIN_MS
        self.accept: Optional[Accept] = None
        self._sock: Optional[socket.socket] = None
        self._link: Optional[SealedLink] = None
        self._out: Optional[SealedSocket] = None
        self._heartbeats: Optional[Heartbeats] = None
        self._reader: Optional[threading.Thread] = None
        self._cond = threading.Condition()
        self._acked = -1
        self._lost: Optional[BackupLost] = None
        self._closing = False
        self._close_sent = False
        self._eof = False
        self._session_sent = False
        self._contact = _Contact(self.takeover_ms / 1000.0)
        #: DISK_HASHES the backup sent before accepting the session (``remus.disk``).
        self.disk_hashes: list[DiskHashes] = []

    # -- Channel -------------------------------------------------------------------------
    def open(self, opening: bytes) -> None:
        sock = connect(self.host, self.port, self.connect_timeout_s, self.stop)
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
        if self.death_watch:
            self._watch = watch_death(sock)
        self._link = link
        self._out = SealedSocket(sock, link)
        with self._cond:
            self._contact.heard_now()
        self._reader = threading.Thread(target=self._read_loop, name="remus-ack-reader", daemon=True)
        self._reader.start()
        self._send(opening)
        self._session_sent = True
        try:
            self._wait_for(0, self.connect_timeout_s, interrupt=self.stop.is_set)
        except BackupLost as exc:
            self.abort()
            raise TransportError(str(exc)) from None
        self._heartbeats = Heartbeats(self._out, self.heartbeat_interval_s, self._write_failed, self._beat)
        self._heartbeats.start()

    def send(self, checkpoint: FramedCheckpoint) -> None:
        for chunk in checkpoint.chunks:
            self._send(chunk)

    def wait_for_ack(self, seq: int, timeout_s: Optional[float] = None) -> None:
        self._wait_for(seq, self.ack_timeout_s if timeout_s is None else timeout_s,
                       interrupt=lambda: self.stop.urgent)

    def out_of_contact(self) -> Optional[Silence]:
        with self._cond:
            if not self._session_sent:
                return None
            if self._lost is not None and self._lost.orderly:
                return None  # the backup ended the session itself: it will not take over
            beating = self._heartbeats is not None and self._heartbeats.running
            return self._contact.silence(beating)

    def close(self, message: str, *, error: bool = False, timeout_s: float = CLOSE_TIMEOUT_S) -> bool:
        self._closing = True
        if not self._session_sent or self._sock is None or self._out is None:
            self.abort()
            return True  # no session was ever offered: nothing to close
        if self._heartbeats is not None:
            self._heartbeats.stop()  # joined before CLOSE: no beat can follow it
        if self._lost is not None and self._lost.orderly:
            self.abort()
            return True  # the backup ended the session first
        reason = CloseReason.ERROR if error else CloseReason.STOPPED
        try:
            self._sock.settimeout(timeout_s)
            self._close_sent = True
            self._out.send_last(encode_record(Close(reason, message)))
            self._sock.shutdown(socket.SHUT_WR)
            self._await_confirmation(timeout_s, timeout_s if error else CLOSE_CAP_S)
        except OSError:
            pass
        finally:
            confirmed = self._eof or (self._lost is not None and self._lost.orderly)
            if not confirmed:
                with self._cond:
                    self._contact.check_proof()
            self.abort()
        return confirmed

    def abort(self) -> None:
        self._closing = True
        if self._heartbeats is not None:
            self._heartbeats.stop()
        if self._watch is not None:
            self._watch.disarm()  # before the close: the helper's copy must not keep the socket open
            self._watch = None
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
    def _await_confirmation(self, silence_s: float, cap_s: float) -> None:
        """Wait for the backup to close its side after our CLOSE: as long as it keeps
        talking (a busy backup still sends heartbeats) and has not been silent for
        ``silence_s`` since the CLOSE or its last word, at most ``cap_s`` in all."""
        reader = self._reader
        if reader is None:
            return
        started = time.monotonic()
        while reader.is_alive():
            reader.join(0.05)
            now = time.monotonic()
            with self._cond:
                quiet = now - max(self._contact.heard, started)
            if quiet >= silence_s or now - started >= cap_s:
                return

    def _wait_for(self, seq: int, silence_s: float, interrupt: Callable[[], bool]) -> None:
        with self._cond:
            while True:
                if self._acked >= seq:
                    return
                if self._lost is not None:
                    raise self._lost
                if interrupt():
                    raise Interrupted("stopped while waiting for the backup")
                quiet = time.monotonic() - self._contact.heard
                if quiet >= silence_s and not self._data_waiting():
                    self._set_lost_locked(BackupLost(
                        f"no ack or heartbeat from the backup at {self.where} for {quiet:.1f} s"))
                    continue
                self._cond.wait(0.05)

    def _data_waiting(self) -> bool:
        """True if bytes sit unread in the socket (the reader is about to take them:
        after a stall of this process, the backup's heartbeats are there)."""
        sock = self._sock
        if sock is None:
            return False
        try:
            readable, _, _ = select.select([sock], [], [], 0)
        except (OSError, ValueError):
            return False
        return bool(readable)

    def _beat(self, now: float) -> None:
        with self._cond:
            self._contact.beat_now(now)

    def _send(self, data: bytes) -> None:
        if self._lost is not None:
            raise self._lost
        assert self._out is not None, "TcpChannel used before open()"
        try:
            self._out.send(data)
        except socket.timeout:
            self._set_lost(f"the backup at {self.where} stopped taking data for {self.ack_timeout_s:.1f} s")
            assert self._lost is not None
            raise self._lost from None
        except OSError as exc:
            self._write_failed(exc)
            assert self._lost is not None
            raise self._lost from None

    def _write_failed(self, exc: OSError) -> None:
        if exc.errno in (errno.EPIPE, errno.ECONNRESET):
            self._set_lost(f"the backup at {self.where} closed the connection")
        else:
            self._set_lost(f"writing to the backup at {self.where} failed: {exc.strerror or exc}")

    def _set_lost(self, reason: str, orderly: bool = False) -> None:
        with self._cond:
            self._set_lost_locked(BackupLost(reason, orderly=orderly))

    def _set_lost_locked(self, lost: BackupLost) -> None:
        if self._lost is None:
            self._lost = lost
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
                    self._contact.heard_now()
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
                    if self._lost is not None and self._lost.orderly:
                        continue  # whatever follows the backup's CLOSE changes nothing
                    if isinstance(event, EndOfStream):
                        self._eof = True
                        if not self._closing:
                            self._set_lost(f"the backup at {self.where} closed the connection")
                        return
                    self._on_event(event)
        except RemoteProtocolError as exc:
            if self._lost is None or not self._lost.orderly:
                self._set_lost(f"the backup at {self.where} sent an invalid stream: {exc}")
        except OSError as exc:
            if self._close_sent and exc.errno == errno.ECONNRESET:
                # The backup dropped the connection after our CLOSE: it ended the session (it
                # may have closed with our last bytes unread). Silence long enough for a takeover
                # was ruled out before the CLOSE, so this ends the session as EOF does.
                self._eof = True
            elif not self._closing:
                self._set_lost(f"the connection to the backup at {self.where} failed: {exc.strerror or exc}")
        finally:
            with self._cond:
                self._cond.notify_all()

    def _on_event(self, event: object) -> None:
        if isinstance(event, Ack):
            with self._cond:
                self._contact.acked_now()
                if self._lost is None and event.seq > self._acked:  # none counts after a refusal
                    self._acked = event.seq
                self._cond.notify_all()
        elif isinstance(event, Accept):
            self._accepted(event)
        elif isinstance(event, Close):
            reason = CloseReason(event.reason).name.lower()
            self._set_lost(f"the backup at {self.where} ended the session ({reason}): {event.message}",
                           orderly=True)
        elif isinstance(event, DiskHashes):
            self.disk_hashes.append(event)
        elif isinstance(event, (Heartbeat, StreamHeader)):
            pass
        else:
            self._set_lost(f"the backup at {self.where} sent an unexpected {type(event).__name__} record")

    def _accepted(self, accept: Accept) -> None:
        """The backup's ACCEPT: its takeover timeout replaces the assumed one, if it keeps the rule."""
        least = self.give_up_ms + TAKEOVER_MARGIN_MS
        with self._cond:
            self.accept = accept
            if accept.takeover == "manual":
                self.takeover_ms = None
            elif accept.takeover_ms < least:
                self._set_lost_locked(BackupLost(
                    f"the backup at {self.where} would take over after {accept.takeover_ms} ms of silence, "
                    f"less than this primary's --ack-timeout ({self.give_up_ms} ms) + {TAKEOVER_MARGIN_MS} ms: "
                    f"lower --ack-timeout or raise the receiver's takeover timeout"))
                return
            else:
                self.takeover_ms = accept.takeover_ms
            self._contact.takeover_s = None if self.takeover_ms is None else self.takeover_ms / 1000.0

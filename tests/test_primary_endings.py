"""The primary's channel against a scripted backup on loopback: the timing rule (give_up_ms,
ACCEPT), how a session ends (heartbeats stopped before CLOSE, the backup's CLOSE with a
heartbeat behind it), stop requests while connecting and waiting, and contact tracking."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any, Callable, Optional

import pytest

import remus.transport as transport
from remus.clock import StopFlag
from remus.errors import BackupLost, Interrupted, TransportError
from remus.run import session_info
from remus.settings import Settings
from remus.stream.codec import EndOfStream, StreamDecoder, encode_record
from remus.stream.records import Accept, Ack, Close, CloseReason, Heartbeat, Session, StreamHeader
from remus.stream.sender import session_header
from remus.link.blocking import SealedLink, respond
from remus.transport import TcpChannel
from tests.helpers import LINK_KEY

OPENING = session_header({"domain": "t", "kind": "sim", "give_up_ms": 600})


class _SealedConn:
    """The backup's end of the sealed link, with the socket calls the scripts use."""

    def __init__(self, raw: socket.socket, link: SealedLink) -> None:
        self.raw, self.link = raw, link

    def sendall(self, data: bytes) -> None:
        self.link.send(self.raw, data)

    def shutdown(self, how: int) -> None:
        self.raw.shutdown(how)

    def close(self) -> None:
        self.raw.close()


class FakeBackup:
    """Accepts one connection on loopback and runs ``script(conn, records)`` in a thread;
    ``records`` collects what the primary sent, read by a second thread until EOF."""

    def __init__(self, script: Callable[["FakeBackup", socket.socket], None]) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1)
        self.port = self.listener.getsockname()[1]
        self.records: list[Any] = []
        self.eof = threading.Event()
        self.script = script
        self.conn: Optional[socket.socket] = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        raw, _ = self.listener.accept()
        self.conn = raw
        conn = _SealedConn(raw, respond(raw, LINK_KEY))
        reader = threading.Thread(target=self._read, args=(conn,), daemon=True)
        reader.start()
        conn.sendall(StreamHeader().encode())
        self.script(self, conn)  # type: ignore[arg-type]

    def _read(self, conn: "_SealedConn") -> None:
        decoder = StreamDecoder()
        try:
            while True:
                data = conn.raw.recv(65536)
                for plain in conn.link.receive_data(data):
                    decoder.receive_data(plain)
                if not data:
                    decoder.receive_data(b"")
                for event in decoder.events():
                    if isinstance(event, EndOfStream):
                        self.eof.set()
                        return
                    self.records.append(event)
        except OSError:
            self.eof.set()

    def wait(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, f"timed out; records: {self.records}"
            time.sleep(0.01)

    def session(self) -> Session:
        self.wait(lambda: any(isinstance(r, Session) for r in self.records))
        return next(r for r in self.records if isinstance(r, Session))

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.listener.close()


def accepting(accept: Optional[Accept], then: Optional[Callable[[FakeBackup, socket.socket], None]] = None
              ) -> Callable[[FakeBackup, socket.socket], None]:
    """A backup that answers the session with ACCEPT (if given) and ACK 0, then runs ``then``
    (default: close its side once the primary closed its own)."""

    def script(backup: FakeBackup, conn: socket.socket) -> None:
        backup.session()
        conn.sendall((encode_record(accept) if accept else b"") + encode_record(Ack(0)))
        if then is not None:
            then(backup, conn)
        else:
            backup.eof.wait(10)
            conn.shutdown(socket.SHUT_WR)

    return script


def test_the_session_record_carries_the_give_up_timeout() -> None:
    info = session_info(Settings(domain="sim:t", ack_timeout_ms=750))
    assert info["give_up_ms"] == 750
    backup = FakeBackup(accepting(None))
    channel = TcpChannel("127.0.0.1", backup.port, key=LINK_KEY, ack_timeout_ms=750)
    channel.open(session_header(dict(info, domain="t", kind="sim")))
    assert backup.session().info["give_up_ms"] == 750
    assert channel.close("bye") is True
    backup.close()


@pytest.mark.parametrize("accept,expected", [
    (None, 600 + 2000),  # today's receiver sends no ACCEPT: the rule's minimum is assumed
    (Accept(5000, "auto", True), 5000),
    (Accept(0, "manual", False), None),
], ids=["no-accept", "auto", "manual"])
def test_takeover_timeout_comes_from_accept(accept: Optional[Accept], expected: Optional[int]) -> None:
    backup = FakeBackup(accepting(accept))
    channel = TcpChannel("127.0.0.1", backup.port, key=LINK_KEY, ack_timeout_ms=600)
    channel.open(OPENING)
    assert channel.takeover_ms == expected
    assert channel.accept == accept
    assert channel.out_of_contact() is None
    assert channel.close("bye") is True
    backup.close()


def test_a_backup_that_would_take_over_too_soon_is_refused_in_plain_words() -> None:
    backup = FakeBackup(accepting(Accept(2599, "auto", False)))
    channel = TcpChannel("127.0.0.1", backup.port, key=LINK_KEY, ack_timeout_ms=600)
    with pytest.raises(TransportError, match=r"take over after 2599 ms .* --ack-timeout \(600 ms\) \+ 2000 ms"):
        channel.open(OPENING)
    backup.close()


def test_close_stops_heartbeats_before_close_and_waits_for_the_backup() -> None:
    backup = FakeBackup(accepting(None))
    # A heartbeat every millisecond: one written after CLOSE would show up here.
    channel = TcpChannel("127.0.0.1", backup.port, key=LINK_KEY, heartbeat_interval_s=0.001)
    channel.open(OPENING)
    backup.wait(lambda: sum(isinstance(r, Heartbeat) for r in backup.records) >= 20)
    assert channel.close("primary stopped: SIGINT") is True
    backup.wait(backup.eof.is_set)
    last = backup.records[-1]
    assert isinstance(last, Close) and last.reason == CloseReason.STOPPED and last.message.endswith("SIGINT")
    backup.close()


def test_close_unconfirmed_when_the_backup_never_answers() -> None:
    backup = FakeBackup(accepting(None, then=lambda b, c: b.eof.wait(10)))  # never closes its side
    channel = TcpChannel("127.0.0.1", backup.port, key=LINK_KEY)
    channel.open(OPENING)
    started = time.monotonic()
    assert channel.close("giving up", error=True, timeout_s=0.3) is False
    assert time.monotonic() - started < 2.5
    backup.wait(lambda: any(isinstance(r, Close) for r in backup.records))
    assert next(r for r in backup.records if isinstance(r, Close)).reason == CloseReason.ERROR
    backup.close()


def test_a_close_from_the_backup_followed_by_a_heartbeat_is_an_orderly_end() -> None:
    def then(backup: FakeBackup, conn: socket.socket) -> None:
        conn.sendall(encode_record(Close(CloseReason.STOPPED, "receiver stopped")) + encode_record(Heartbeat(7))
                     + b"\x00trailing junk that is not a record" * 4)
        backup.eof.wait(10)

    backup = FakeBackup(accepting(None, then))
    channel = TcpChannel("127.0.0.1", backup.port, key=LINK_KEY)
    channel.open(OPENING)
    with pytest.raises(BackupLost) as info:
        channel.wait_for_ack(1)
    assert info.value.orderly and "ended the session (stopped): receiver stopped" in str(info.value)
    assert channel.out_of_contact() is None  # it will not take over: nothing to hold for
    assert channel.close("bye") is True  # nothing more to confirm
    backup.close()


def test_a_second_stop_request_cuts_the_ack_wait_short() -> None:
    backup = FakeBackup(accepting(None))
    stop = StopFlag()
    channel = TcpChannel("127.0.0.1", backup.port, key=LINK_KEY, ack_timeout_ms=60_000, stop=stop)
    channel.open(OPENING)
    stop.set("SIGINT")
    threading.Timer(0.2, stop.hurry, args=("SIGINT",)).start()
    started = time.monotonic()
    with pytest.raises(Interrupted):
        channel.wait_for_ack(1)  # a first request alone does not cut it; the second does
    assert 0.15 < time.monotonic() - started < 5
    assert channel.close("primary stopped: SIGINT") is True
    backup.close()


def test_a_stop_while_waiting_for_the_sessions_acceptance_still_closes() -> None:
    backup = FakeBackup(lambda b, conn: b.eof.wait(10))  # reads, never answers
    stop = StopFlag()
    channel = TcpChannel("127.0.0.1", backup.port, key=LINK_KEY, stop=stop)
    threading.Timer(0.2, stop.set, args=("SIGINT",)).start()
    with pytest.raises(Interrupted):
        channel.open(OPENING)
    channel.close("primary stopped: SIGINT", timeout_s=0.2)
    backup.wait(lambda: any(isinstance(r, Close) for r in backup.records))
    assert [type(r).__name__ for r in backup.records] == ["StreamHeader", "Session", "Close"]
    backup.close()


def test_a_stop_while_connecting_ends_the_attempt_at_once() -> None:
    # A listener whose accept queue is full drops further SYNs: connect() would hang.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(3):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        fillers.append(s)
    stop = StopFlag()
    threading.Timer(0.3, stop.set, args=("SIGTERM",)).start()
    started = time.monotonic()
    try:
        with pytest.raises(Interrupted, match="while connecting"):
            transport.connect("127.0.0.1", port, timeout_s=30, stop=stop)
        assert time.monotonic() - started < 5
    finally:
        for s in fillers:
            s.close()
        listener.close()


# --------------------------------------------------------------------------- contact, on a fake clock


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.now + 1_700_000_000.0


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(transport, "time", fake)
    return fake


def test_heartbeats_read_all_at_once_after_a_stall_do_not_hide_it(clock: Clock) -> None:
    contact = transport._Contact(takeover_s=2.6)
    contact.heard_now()
    clock.now += 0.1
    contact.heard_now()
    clock.now += 4.0  # SIGSTOP for 4 s; then the backup's buffered heartbeats arrive together
    for _ in range(40):
        contact.heard_now()
    silence = contact.silence(beating=True)
    assert silence is not None and "nothing was heard from the backup for 4.0 s" in silence.reason
    assert silence.since_unix == pytest.approx(100.1 + 1_700_000_000.0 + 2.6)


def test_a_gap_in_our_own_heartbeats_is_a_stall(clock: Clock) -> None:
    contact = transport._Contact(takeover_s=2.6)
    contact.beat_now(clock.now)
    clock.now += 3.0
    contact.beat_now(clock.now)
    contact.heard_now()  # only 3.0 s since the last: also a gap; either reason is right
    silence = contact.silence(beating=True)
    assert silence is not None and "3.0 s" in silence.reason


def test_a_live_gap_is_seen_before_the_threads_that_latch_it_run(clock: Clock) -> None:
    contact = transport._Contact(takeover_s=2.6)
    contact.beat_now(clock.now)
    clock.now += 1.0
    assert contact.silence(beating=True) is None
    clock.now += 2.0  # just after SIGCONT: neither the reader nor the heartbeat thread ran yet
    silence = contact.silence(beating=True)
    assert silence is not None and "3.0 s" in silence.reason


def test_short_gaps_and_a_manual_backup_never_hold(clock: Clock) -> None:
    contact = transport._Contact(takeover_s=2.6)
    for _ in range(10):
        clock.now += 2.5
        contact.heard_now()
        contact.beat_now(clock.now)
    assert contact.silence(beating=True) is None
    manual = transport._Contact(takeover_s=None)
    clock.now += 60
    manual.heard_now()
    assert manual.silence(beating=True) is None

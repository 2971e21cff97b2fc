"""The receiver as an attacker and an admin meet it: only a primary with the key gets anything
committed, strangers cannot hold it, nothing a peer sends ends it, and it lives on as a service
(status, activate, manual takeover, fencing, refusing a domain it runs)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

from remus.backup.control import request
from remus.backup.listening import hosts_allow_matcher
from remus.errors import TransportError
from remus.stream.codec import encode_record
from remus.stream.records import Heartbeat, RemusRecType, StreamHeader
from remus.stream.sender import session_header
from remus.transport import TcpChannel
from tests.helpers import LINK_KEY, SealedClient
from tests.test_backup import make_primary
from tests.test_transport import ReceiverThread

OTHER_KEY = bytes(range(100, 164))


def until(condition: Callable[[], Any], what: str, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def events_named(backup: ReceiverThread, name: str) -> list[dict[str, Any]]:
    return [e for e in list(backup.events) if e["event"] == name]


def replicate(backup: ReceiverThread, checkpoints: int = 2, seed: int = 1) -> None:
    """A real primary's session: ``checkpoints`` committed, then an orderly CLOSE."""
    primary = make_primary(checkpoints, seed=seed)
    before = len(events_named(backup, "closed"))
    with SealedClient(backup.port) as client:
        client.sendall(bytes(primary.stream) + _close_record())
        until(lambda: len(events_named(backup, "closed")) > before, "the orderly close")


def send_until_refused(sock: socket.socket, data: bytes) -> None:
    """Send ``data``, or as much of it as the receiver takes before it refuses and closes."""
    try:
        sock.sendall(data)
    except (ConnectionResetError, BrokenPipeError):
        pass


def _close_record() -> bytes:
    from remus.stream.records import Close, CloseReason

    return encode_record(Close(CloseReason.STOPPED, "test done"))


class Recorder:
    """A TCP proxy in front of the receiver that records what the primary sent, and can
    flip one byte of it (``flip_at``) or stop forwarding after ``cut_at`` bytes."""

    def __init__(self, port: int, flip_at: Optional[int] = None, cut_at: Optional[int] = None) -> None:
        self.target = port
        self.flip_at, self.cut_at = flip_at, cut_at
        self.sent = bytearray()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        client, _ = self.listener.accept()
        upstream = socket.create_connection(("127.0.0.1", self.target))
        threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()
        self._pump(client, upstream, True)

    def _pump(self, src: socket.socket, dst: socket.socket, record: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if record:
                    data = bytearray(data)
                    start = len(self.sent)
                    if self.flip_at is not None and start <= self.flip_at < start + len(data):
                        data[self.flip_at - start] ^= 0x01
                    self.sent += data
                    if self.cut_at is not None and len(self.sent) >= self.cut_at:
                        dst.sendall(data[: len(data) - (len(self.sent) - self.cut_at)])
                        break
                dst.sendall(bytes(data))
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


# --------------------------------------------------------------------------- keyless clients


def test_a_client_of_the_old_unauthenticated_protocol_gets_nothing() -> None:
    backup = ReceiverThread(once=False)
    with socket.create_connection(("127.0.0.1", backup.port)) as sock:
        send_until_refused(sock, bytes(make_primary(3).stream))
        until(lambda: events_named(backup, "rejected"), "the rejection")
    assert "old unauthenticated remus protocol" in events_named(backup, "rejected")[0]["reason"]
    replicate(backup)  # a real primary right afterwards
    assert not events_named(backup, "activated")
    assert [e["seq"] for e in events_named(backup, "commit")] == [1, 2]
    assert backup.finish() == 0


def test_a_client_with_the_wrong_key_is_refused_before_any_record() -> None:
    backup = ReceiverThread(once=False)
    with pytest.raises(TransportError, match="did not authenticate|no authenticated link"):
        TcpChannel("127.0.0.1", backup.port, key=OTHER_KEY).open(make_primary(0).opening)
    until(lambda: events_named(backup, "rejected"), "the rejection")
    assert not events_named(backup, "session")
    replicate(backup)
    assert not events_named(backup, "activated")
    backup.finish()


@pytest.mark.parametrize("how", ["whole", "truncated", "flipped"])
def test_a_replayed_recording_of_a_real_session_gets_nothing(how: str) -> None:
    backup = ReceiverThread(once=False)
    proxy = Recorder(backup.port)
    with SealedClient(proxy.port) as client:  # a real primary, recorded on the wire
        client.sendall(bytes(make_primary(3).stream) + _close_record())
        until(lambda: events_named(backup, "closed"), "the recorded session's end")
    recording = bytes(proxy.sent)
    commits = len(events_named(backup, "commit"))
    if how == "truncated":
        recording = recording[: len(recording) // 2]
    elif how == "flipped":
        recording = recording[:300] + bytes([recording[300] ^ 1]) + recording[301:]
    with socket.create_connection(("127.0.0.1", backup.port)) as sock:
        send_until_refused(sock, recording)
        until(lambda: events_named(backup, "rejected"), "the replay's rejection")
    assert len(events_named(backup, "commit")) == commits  # the replay committed nothing
    assert len(events_named(backup, "session")) == 1
    assert not events_named(backup, "activated")
    replicate(backup, seed=2)
    backup.finish()


def test_a_byte_flipped_in_a_live_checkpoint_breaks_the_session_and_commits_nothing_more() -> None:
    backup = ReceiverThread(once=False)
    primary = make_primary(3)
    # Flip one byte well inside checkpoint 3's sealed frame.
    proxy = Recorder(backup.port, flip_at=None)
    with SealedClient(proxy.port) as client:
        client.sendall(bytes(primary.stream[: primary.commit_ends[2]]))
        until(lambda: len(events_named(backup, "commit")) == 2, "two commits")
        proxy.flip_at = len(proxy.sent) + 200
        client.sendall(bytes(primary.stream[primary.commit_ends[2]:]))
        event = until(lambda: events_named(backup, "broken"), "the broken session")[0]
    assert "failed its check" in event["reason"]
    assert [e["seq"] for e in events_named(backup, "commit")] == [1, 2]
    assert not events_named(backup, "activated")  # tampering is not a lost primary
    replicate(backup, seed=3)
    backup.finish()


def test_a_reflected_handshake_fails() -> None:
    """The receiver's own first message sent back to it (another connection) is refused."""
    from remus.link.handshake import Initiator

    backup = ReceiverThread(once=False)
    hello = Initiator(LINK_KEY).start()
    with socket.create_connection(("127.0.0.1", backup.port)) as first:
        first.sendall(hello)
        first.settimeout(5)
        reply = first.recv(4096)
        with socket.create_connection(("127.0.0.1", backup.port)) as second:
            second.sendall(reply)  # the responder's reply, reflected to a responder
            until(lambda: events_named(backup, "rejected"), "the reflection's rejection")
    assert not events_named(backup, "session")
    replicate(backup)
    backup.finish()


# --------------------------------------------------------------------------- strangers cannot hold it


def test_idle_and_slow_strangers_do_not_keep_a_real_primary_out() -> None:
    backup = ReceiverThread(once=False)
    idle = [socket.create_connection(("127.0.0.1", backup.port)) for _ in range(20)]
    slow = socket.create_connection(("127.0.0.1", backup.port))
    stop = threading.Event()

    def trickle() -> None:  # one byte a second, as an attacker would
        try:
            while not stop.wait(1.0):
                slow.send(b"\xff")
        except OSError:
            pass

    threading.Thread(target=trickle, daemon=True).start()
    try:
        started = time.monotonic()
        replicate(backup, checkpoints=3)
        assert time.monotonic() - started < 10
        assert [e["seq"] for e in events_named(backup, "commit")] == [1, 2, 3]
    finally:
        stop.set()
        for sock in idle + [slow]:
            sock.close()
    backup.finish()


# --------------------------------------------------------------------------- nothing a peer sends ends it


def test_a_session_then_eof_does_not_end_a_receiver_without_once() -> None:
    backup = ReceiverThread(once=False)
    with SealedClient(backup.port) as client:
        client.sendall(bytes(make_primary(0).stream))
        until(lambda: events_named(backup, "session"), "the session")
    until(lambda: any("nothing to activate" in line for line in backup.lines), "the loss")
    assert backup.thread.is_alive()
    replicate(backup)
    backup.finish()


def test_deeply_nested_session_json_is_refused_and_the_receiver_lives() -> None:
    backup = ReceiverThread(once=False)
    body = b"[" * 20000 + b"]" * 20000
    header = int(RemusRecType.SESSION).to_bytes(4, "little") + len(body).to_bytes(4, "little")
    raw = StreamHeader().encode() + header + body + b"\0" * (-len(body) % 8)
    with SealedClient(backup.port) as client:
        client.sendall(raw)
        event = until(lambda: events_named(backup, "broken"), "the refusal")[0]
    assert "nests deeper" in event["reason"]
    replicate(backup)
    backup.finish()


def test_an_output_file_the_receiver_cannot_open_is_refused_at_session_start(tmp_path: Path) -> None:
    backup = ReceiverThread(once=False)
    info = {"domain": "t", "kind": "sim", "give_up_ms": 200,
            "sim": {"name": "t", "memory": 1 << 20, "output": str(tmp_path / "no" / "such" / "dir" / "out")}}
    with SealedClient(backup.port) as client:
        client.sendall(session_header(info))
        event = until(lambda: events_named(backup, "refused"), "the refusal")[0]
    assert "cannot open output file" in event["reason"]
    replicate(backup)
    backup.finish()


@pytest.mark.parametrize("kind", ["sim", "xen"])
def test_a_session_declaring_more_memory_than_the_host_takes_is_refused(kind: str) -> None:
    backup = ReceiverThread(once=False, max_memory=64 << 20)
    if kind == "sim":
        info: dict[str, Any] = {"domain": "big", "kind": "sim", "sim": {"name": "big", "memory": 1 << 30}}
    else:
        info = {"domain": "big", "kind": "xen", "max_pages": 2 ** 40,
                "libxl_config": json.dumps({"c_info": {"name": "big"}})}
    with SealedClient(backup.port) as client:
        client.sendall(session_header(info))
        event = until(lambda: events_named(backup, "refused"), "the refusal")[0]
    assert "more than this receiver takes (64M; see remus-receiver --max-memory)" in event["reason"]
    replicate(backup)
    backup.finish()


# --------------------------------------------------------------------------- hosts-allow


def test_hosts_allow_is_anchored_and_names_must_be_forward_confirmed(monkeypatch: pytest.MonkeyPatch) -> None:
    allowed = hosts_allow_matcher(r"127\.0\.0\.1 good\.example")
    assert allowed("127.0.0.1")
    assert not allowed("127.0.0.10")  # anchored: no prefix match
    monkeypatch.setattr(socket, "gethostbyaddr", lambda addr: ("good.example", [], [addr]))
    monkeypatch.setattr(socket, "getaddrinfo", lambda name, port: [(0, 0, 0, "", ("127.9.9.9", 0))])
    assert not allowed("127.1.2.3")  # the name claims good.example, which does not point back
    monkeypatch.setattr(socket, "getaddrinfo", lambda name, port: [(0, 0, 0, "", ("127.1.2.3", 0))])
    assert allowed("127.1.2.3")


# --------------------------------------------------------------------------- a service


def test_status_and_a_commanded_activation_with_manual_takeover(tmp_path: Path) -> None:
    control = str(tmp_path / "receiver.sock")
    backup = ReceiverThread(once=False, takeover="manual", control=control)
    until(lambda: os.path.exists(control), "the control socket")
    assert request(control, {"op": "status"})["state"] == "listening"
    primary = make_primary(3)
    client = SealedClient(backup.port)
    client.sendall(bytes(primary.stream))
    until(lambda: len(events_named(backup, "commit")) == 3, "three commits")
    status = request(control, {"op": "status"})
    assert (status["state"], status["domain"], status["seq"], status["primary"]) == \
        ("protecting", "sim:t", 3, "127.0.0.1")
    client.sendall(encode_record(Heartbeat(0)))  # a live primary is heard (this one only on demand)
    refused = request(control, {"op": "activate", "domain": "t"})
    assert not refused["ok"] and "is alive" in refused["error"]
    client.close()  # the primary dies
    until(lambda: events_named(backup, "holding"), "the held checkpoint")
    assert request(control, {"op": "status"})["state"] == "holding"
    assert not events_named(backup, "activated")  # manual: never by itself
    answer = request(control, {"op": "activate", "domain": "sim:t"})
    assert answer == {"ok": True, "domain": "sim:t", "seq": 3}
    activated = events_named(backup, "activated")[0]
    assert activated["verified"] is True and isinstance(activated["time"], float)
    assert abs(activated["time"] - time.time()) < 60
    assert request(control, {"op": "status"})["state"] == "active"
    # A new primary for the domain it now runs is refused in plain words; others are served.
    with SealedClient(backup.port) as again:
        again.sendall(bytes(make_primary(1).stream))
        event = until(lambda: events_named(backup, "refused"), "the refusal")[0]
    assert "sim:t runs on this host since its activation from checkpoint 3" in event["reason"]
    assert backup.finish() == 0


def test_the_cli_status_and_activate_commands(tmp_path: Path) -> None:
    import subprocess

    from tests.test_transport import ROOT

    control = str(tmp_path / "receiver.sock")
    backup = ReceiverThread(once=False, takeover="manual", control=control)
    until(lambda: os.path.exists(control), "the control socket")
    env = dict(os.environ, PYTHONPATH=str(ROOT))

    def cli(*args: str) -> "subprocess.CompletedProcess[str]":
        return subprocess.run([sys.executable, "-m", "remus.backup.cli", *args, "--control", control],
                              env=env, text=True, capture_output=True, timeout=60)

    with SealedClient(backup.port) as client:
        client.sendall(bytes(make_primary(2).stream))
        until(lambda: len(events_named(backup, "commit")) == 2, "two commits")
    until(lambda: events_named(backup, "holding"), "the held checkpoint")
    shown = cli("status", "--json")
    assert shown.returncode == 0 and json.loads(shown.stdout)["state"] == "holding"
    assert "state: holding" in cli("status").stdout
    wrong = cli("activate", "vm9")
    assert wrong.returncode == 1 and "no committed checkpoint of vm9" in wrong.stderr
    done = cli("activate", "t")
    assert done.returncode == 0 and "activated sim:t from checkpoint 2" in done.stdout
    backup.finish()
    gone = cli("status")
    assert gone.returncode == 1 and "no remus-receiver is running here" in gone.stderr


def test_fencing_runs_before_activation_and_a_failing_fence_activates_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "fenced"
    fail = ReceiverThread(once=False, fence=f"echo $REMUS_PEER > {marker}; exit 3")
    with SealedClient(fail.port) as client:
        client.sendall(bytes(make_primary(2).stream))
        until(lambda: len(events_named(fail, "commit")) == 2, "two commits")
    until(lambda: events_named(fail, "fence-failed"), "the failed fence")
    assert marker.read_text().strip() == "127.0.0.1"
    assert not events_named(fail, "activated")
    assert any("not activated; retrying" in line for line in fail.lines)
    fail.finish()

    ok = ReceiverThread(once=True, fence=f"test \"$REMUS_ROLE\" = backup && touch {marker}.ok")
    with SealedClient(ok.port) as client:
        client.sendall(bytes(make_primary(2).stream))
        until(lambda: len(events_named(ok, "commit")) == 2, "two commits")
    until(lambda: events_named(ok, "activated"), "the activation")
    assert (tmp_path / "fenced.ok").exists()
    assert [e["event"] for e in ok.events if e["event"] in ("fenced", "activated")] == ["fenced", "activated"]
    ok.finish()


def test_the_receiver_keeps_serving_after_a_failover_and_after_a_primary_that_died_early() -> None:
    backup = ReceiverThread(once=False)
    with SealedClient(backup.port) as client:
        client.sendall(bytes(make_primary(0).stream))  # dies before its first checkpoint
        until(lambda: events_named(backup, "session"), "the session")
    until(lambda: events_named(backup, "nothing-to-activate"), "nothing to activate")
    with SealedClient(backup.port) as client:
        client.sendall(bytes(make_primary(2).stream))
        until(lambda: len(events_named(backup, "commit")) == 2, "two commits")
    until(lambda: events_named(backup, "activated"), "the failover")
    info = {"domain": "other", "kind": "sim", "give_up_ms": 200, "sim": {"name": "other", "memory": 1 << 20}}
    with SealedClient(backup.port) as client:  # another domain is still welcome
        client.sendall(session_header(info))
        until(lambda: len(events_named(backup, "session")) == 3, "the third session")
    assert backup.thread.is_alive()
    assert backup.finish() == 0


def test_a_slow_hosts_allow_lookup_still_lets_the_refusal_reach_the_primary(monkeypatch: pytest.MonkeyPatch) -> None:
    # The handshake ends before the name lookup does: the stranger's next bytes must wait unread,
    # not be fed to a finished handshake (which dropped the connection with a reset).
    real = socket.gethostbyaddr

    def slow_lookup(addr: str) -> Any:
        time.sleep(0.5)
        return real(addr)

    monkeypatch.setattr(socket, "gethostbyaddr", slow_lookup)
    backup = ReceiverThread(once=False, hosts_allow=r"10\..* backup\.example")
    with pytest.raises(TransportError, match="not allowed by --hosts-allow"):
        TcpChannel("127.0.0.1", backup.port, key=LINK_KEY).open(make_primary(0).opening)
    backup.finish()


def test_the_receiver_gives_its_heap_back_after_a_large_checkpoint_only(monkeypatch: pytest.MonkeyPatch) -> None:
    from remus import heap
    from remus.stream.records import PAGE_SIZE

    trims: list[int] = []
    backup = ReceiverThread(once=False)
    monkeypatch.setattr(heap, "TRIM_AFTER_BYTES", 100 * PAGE_SIZE)  # the first checkpoint: 256 pages
    monkeypatch.setattr(heap, "trim", lambda: trims.append(len(events_named(backup, "commit"))) or True)
    replicate(backup, checkpoints=4)
    # Once, after committing the first checkpoint (all of memory; the bytes that carried it may
    # have carried later ones too), never for the small ones after it.
    assert len(trims) == 1 and trims[0] >= 1
    assert backup.finish() == 0


def test_a_quick_exit_keeps_the_status_and_flushes_what_was_written() -> None:
    code = ("import logging, sys\n"
            "from remus.backup.cli import _leave_quietly\n"
            "logging.basicConfig(stream=sys.stderr)\n"
            "print('said', end='')\n"
            "logging.getLogger('t').warning('logged')\n"
            "_leave_quietly(3)\n"
            "print('never')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 3
    assert done.stdout == "said" and "logged" in done.stderr


def test_a_checkpoint_still_unread_when_the_primary_hung_up_is_not_taken() -> None:
    # The receiver is held just after committing checkpoint 2; meanwhile the primary sends
    # checkpoint 3 whole and hangs up.  Its FIN is in before checkpoint 3 is read, so the primary
    # can never read an ACK of it: the failover is from checkpoint 2, and says why.
    primary = make_primary(3)
    stream = bytes(primary.stream)
    backup = ReceiverThread()
    held, go = threading.Event(), threading.Event()

    def hold_after_the_second(session: Any) -> None:
        if session.image.seq == 2 and not held.is_set():
            held.set()
            go.wait(15)

    backup.receiver.on_progress = hold_after_the_second
    with SealedClient(backup.port) as client:
        client.sendall(stream[: primary.commit_ends[2]])
        until(held.is_set, "checkpoint 2 committed")
        client.sendall(stream[primary.commit_ends[2] :])
        client.sock.shutdown(socket.SHUT_WR)
        go.set()
        activated = backup.wait_event("activated")
    assert activated["seq"] == 2
    assert "1 checkpoint that arrived after it hung up not taken" in activated["reason"]
    assert [e["seq"] for e in events_named(backup, "commit")] == [1, 2]
    assert backup.finish() == 0

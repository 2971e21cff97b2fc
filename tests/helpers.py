"""Helpers shared by the tests: fakes (a domain, devices and a channel that log every call),
the repository's environment, waiting on a condition, and the processes a test started."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from remus.channel import Silence
from remus.clock import FakeClock, StopFlag
from remus.devices import CheckpointDevice
from remus.domain import Capture, DomainInfo
from remus.errors import BackupLost
from remus.stream.records import Checkpoint, PageData
from remus.stream.sender import EncodedCheckpoint, FramedCheckpoint


class CallLog(list):  # type: ignore[type-arg]
    """Ordered ``"who.what"`` strings."""

    def only(self, prefix: str) -> list[str]:
        return [c for c in self if c.startswith(prefix)]


class Fault:
    """Raise ``exc`` once, from the call named ``where`` on checkpoint ``seq`` (or the first)."""

    def __init__(self, where: str, exc: BaseException, seq: Optional[int] = None) -> None:
        self.where, self.exc, self.seq = where, exc, seq
        self.fired = False

    def check(self, where: str, seq: int) -> None:
        if not self.fired and where == self.where and (self.seq is None or self.seq == seq):
            self.fired = True
            raise self.exc


class FakeDomain:
    """Domain protocol over a call log.  ``prepare_s`` and ``capture_s`` advance the fake clock."""

    def __init__(self, log: CallLog, clock: FakeClock, *, capture_s: float = 0.0,
                 send_s: float = 0.0, prepare_s: float = 0.0, fault: Optional[Fault] = None,
                 on_call: Optional[Callable[[str, int], None]] = None) -> None:
        self.log, self.clock = log, clock
        self.capture_s = capture_s
        self.prepare_s = prepare_s
        self.fault = fault
        self.on_call = on_call
        self._suspended = False
        self.seq = 0
        self.closed = False
        self.held = False

    def _call(self, what: str) -> None:
        self.log.append(f"domain.{what}")
        if self.on_call:
            self.on_call(what, self.seq)
        if self.fault:
            self.fault.check(f"domain.{what}", self.seq)

    @property
    def info(self) -> DomainInfo:
        return DomainInfo("fake", "guest", {})

    @property
    def suspended(self) -> bool:
        return self._suspended

    def devices(self, net_buffering: bool, interval_ms: int = 0) -> Sequence[CheckpointDevice]:
        return []

    def prepare_suspend(self) -> None:
        """Advances the fake clock by ``prepare_s`` (a live copy before the pause); not logged."""
        self.clock.advance(self.prepare_s)

    def suspend(self) -> None:
        self.seq += 1
        self._call("suspend")
        self._suspended = True

    def capture(self) -> Capture:
        self._call("capture")
        self.clock.advance(self.capture_s)
        page = bytes([self.seq % 256]) * 4096
        return Capture([PageData((self.seq,), (page,)), Checkpoint()], 1)

    def resume(self) -> None:
        self._call("resume")
        self._suspended = False

    def hold(self) -> str:
        self.log.append("domain.hold")
        self._suspended = True
        self.held = True
        return "stopped"

    def close(self) -> None:
        self.log.append("domain.close")
        if self._suspended:
            self._suspended = False
        self.closed = True


class FakeDevice:
    """A checkpointed device that logs its calls."""

    def __init__(self, log: CallLog, name: str = "dev", fault: Optional[Fault] = None,
                 seq: Optional[Callable[[], int]] = None) -> None:
        self.log, self._name, self.fault = log, name, fault
        self._seq = seq or (lambda: 0)
        self.released = 0
        self.installed = False

    @property
    def name(self) -> str:
        return self._name

    def _call(self, what: str) -> None:
        self.log.append(f"{self._name}.{what}")
        if self.fault:
            self.fault.check(f"{self._name}.{what}", self._seq())

    def install(self) -> None:
        self._call("install")
        self.installed = True

    def postsuspend(self) -> None:
        self._call("postsuspend")

    def preresume(self) -> None:
        self._call("preresume")

    def commit(self) -> None:
        self._call("commit")

    def release(self) -> None:
        self.log.append(f"{self._name}.release")
        self.released += 1


class FakeChannel:
    """A channel that logs, keeps what it was sent, and acks at once (or not)."""

    def __init__(self, log: CallLog, clock: FakeClock, *, send_s: float = 0.0, ack_s: float = 0.0,
                 fault: Optional[Fault] = None) -> None:
        self.log, self.clock = log, clock
        self.send_s, self.ack_s = send_s, ack_s
        self.fault = fault
        self.opening = b""
        self.sent: list[EncodedCheckpoint] = []
        self.closed_with: Optional[str] = None
        self.close_error = False
        self.aborted = False
        self.confirms = True
        self.silence: Optional[Silence] = None

    def _call(self, what: str, seq: int) -> None:
        self.log.append(f"channel.{what}")
        if self.fault:
            self.fault.check(f"channel.{what}", seq)

    def open(self, opening: bytes) -> None:
        self.log.append("channel.open")
        self.opening = opening

    def send(self, checkpoint: FramedCheckpoint) -> None:
        self._call("send", checkpoint.seq)
        self.clock.advance(self.send_s)
        chunks = list(checkpoint.chunks)  # a streamed checkpoint is framed as it is sent
        self.sent.append(EncodedCheckpoint(checkpoint.seq, chunks, checkpoint.raw_bytes, checkpoint.wire_bytes))

    def wait_for_ack(self, seq: int) -> None:
        self._call("ack", seq)
        self.clock.advance(self.ack_s)

    def close(self, message: str, *, error: bool = False, timeout_s: float = 2.0) -> bool:
        self.log.append("channel.close")
        self.closed_with = message
        self.close_error = error
        return self.confirms

    def out_of_contact(self) -> Optional[Silence]:
        self.log.append("channel.contact")
        return self.silence

    def abort(self) -> None:
        self.log.append("channel.abort")
        self.aborted = True


def stop_after(stop: StopFlag, n: int) -> Callable[[object], None]:
    """An ``on_checkpoint`` callback that requests a stop after ``n`` checkpoints."""

    def callback(stats: object) -> None:
        if getattr(stats, "seq") >= n:
            stop.set("test")

    return callback




# --------------------------------------------------------------------------- the link (issue 8)

LINK_KEY = bytes(range(64))  # a throw-away key for the link tests


def seeded_random(seed: int) -> Callable[[int], bytes]:
    """A replayable source of random bytes for ``Initiator``/``Responder`` (``rng=``)."""
    import random

    return random.Random(seed).randbytes


class Handshake:
    """One complete, recorded link handshake between an ``Initiator`` and a ``Responder``."""

    def __init__(self, key: bytes = LINK_KEY, seed: int = 1) -> None:
        from remus.link.handshake import Initiator, Responder

        self.initiator = Initiator(key, rng=seeded_random(seed))
        self.responder = Responder(key, rng=seeded_random(seed + 1_000_000))
        self.hello = self.initiator.start()
        self.responder.receive_data(self.hello)
        self.reply = self.responder.data_to_send()
        self.initiator.receive_data(self.reply)
        self.finish = self.initiator.data_to_send()
        self.responder.receive_data(self.finish)


def write_key_file(directory: "os.PathLike[str] | str", key: bytes = LINK_KEY) -> str:
    """A key file (mode 0600) holding ``key`` in ``directory``, for commands run by a test."""
    import os

    path = os.path.join(os.fspath(directory), "authkey")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    return path


class SealedClient:
    """A primary's end of an authenticated link, for tests that send hand-made streams."""

    def __init__(self, port: int, key: bytes = LINK_KEY, host: str = "127.0.0.1") -> None:
        import socket

        from remus.link.blocking import initiate

        self.sock = socket.create_connection((host, port))
        self.link = initiate(self.sock, key)

    def sendall(self, data: bytes) -> None:
        self.link.send(self.sock, data)

    def read_all(self) -> bytes:
        """Everything the receiver sends until it closes, opened."""
        plain = b""
        while True:
            data = self.sock.recv(65536)
            plain += b"".join(self.link.receive_data(data))
            if not data:
                return plain

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "SealedClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["BackupLost", "CallLog", "Fault", "FakeChannel", "FakeDevice", "FakeDomain", "Handshake", "LINK_KEY",
           "LinkProxy", "SealedClient", "free_loopback_port", "seeded_random", "stop_after", "write_key_file"]


# --------------------------------------------------------------------------- loopback plumbing


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LinkProxy:
    """A TCP proxy on 127.0.0.1 between one client and ``127.0.0.1:target``.

    ``freeze()`` makes it stop forwarding in both directions without closing
    anything (no FIN, no RST): a link that silently stops.  Until then, an EOF
    from one side is passed on as a half-close to the other.  ``close()`` ends it.
    """

    def __init__(self, target: int) -> None:
        self.target = target
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(4)
        self.port = int(self.listener.getsockname()[1])
        self.frozen = threading.Event()
        self.closed = threading.Event()
        self._socks: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, name="link-proxy", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        try:
            client, _ = self.listener.accept()
        except OSError:
            return
        try:
            server = socket.create_connection(("127.0.0.1", self.target))
        except OSError:
            client.close()
            return
        self._socks += [client, server]
        for src, dst in ((client, server), (server, client)):
            threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        import select
        while not self.closed.is_set():
            if self.frozen.is_set():
                self.closed.wait(0.05)
                continue
            try:
                readable, _, _ = select.select([src], [], [], 0.05)
                if not readable or self.frozen.is_set():
                    continue
                data = src.recv(65536)
                if not data:
                    dst.shutdown(socket.SHUT_WR)
                    return
                dst.sendall(data)
            except OSError:
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return

    def freeze(self) -> None:
        self.frozen.set()

    def close(self) -> None:
        self.closed.set()
        self.listener.close()
        for s in self._socks:
            s.close()


# --------------------------------------------------------------------------- processes and waiting

#: The repository's root (what ``PYTHONPATH`` points at for commands run from the tree).
ROOT = Path(__file__).resolve().parent.parent


def repo_env(**extra: str) -> dict[str, str]:
    """The environment for running the tree's commands: ``PYTHONPATH`` at the repository."""
    return dict(os.environ, PYTHONPATH=str(ROOT), **extra)


def wait_until(condition: Callable[[], object], timeout_s: float = 20.0, what: str = "condition",
               poll_s: float = 0.02) -> object:
    """Poll ``condition`` until it returns something true; return that.  AssertionError at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(poll_s)


def child_pids(parent: int, marker: bytes = b"") -> set[int]:
    """The live processes whose parent is ``parent`` (and whose command line holds ``marker``).

    Tests use it to find the simulated guests of the remus they started, and no one else's.
    """
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == parent and marker in cmdline and fields[0] != "Z":
            found.add(int(entry.name))
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"

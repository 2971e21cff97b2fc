"""Fakes shared by the tests: a domain, devices and a channel that log every call."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

from remus.clock import FakeClock, StopFlag
from remus.devices import CheckpointDevice
from remus.domain import Capture, DomainInfo
from remus.errors import BackupLost
from remus.stream.records import Checkpoint, PageData
from remus.stream.sender import EncodedCheckpoint


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
    """Domain protocol over a call log.  ``capture_s`` and ``pause_s`` advance the fake clock."""

    def __init__(self, log: CallLog, clock: FakeClock, *, capture_s: float = 0.0,
                 send_s: float = 0.0, fault: Optional[Fault] = None,
                 on_call: Optional[Callable[[str, int], None]] = None) -> None:
        self.log, self.clock = log, clock
        self.capture_s = capture_s
        self.fault = fault
        self.on_call = on_call
        self._suspended = False
        self.seq = 0
        self.closed = False

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
        self.aborted = False

    def _call(self, what: str, seq: int) -> None:
        self.log.append(f"channel.{what}")
        if self.fault:
            self.fault.check(f"channel.{what}", seq)

    def open(self, opening: bytes) -> None:
        self.log.append("channel.open")
        self.opening = opening

    def send(self, checkpoint: EncodedCheckpoint) -> None:
        self._call("send", checkpoint.seq)
        self.clock.advance(self.send_s)
        self.sent.append(checkpoint)

    def wait_for_ack(self, seq: int) -> None:
        self._call("ack", seq)
        self.clock.advance(self.ack_s)

    def close(self, message: str) -> None:
        self.log.append("channel.close")
        self.closed_with = message

    def abort(self) -> None:
        self.log.append("channel.abort")
        self.aborted = True


def stop_after(stop: StopFlag, n: int) -> Callable[[object], None]:
    """An ``on_checkpoint`` callback that requests a stop after ``n`` checkpoints."""

    def callback(stats: object) -> None:
        if getattr(stats, "seq") >= n:
            stop.set("test")

    return callback


__all__ = ["BackupLost", "CallLog", "Fault", "FakeChannel", "FakeDevice", "FakeDomain", "stop_after"]


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

"""Engine-level epoch order, for both output buffers: the simulated domain's PlugQueue and the real
PlugBuffer (on the fake kernel).  Each must give: BUFFER at postsuspend -> send -> ack -> RELEASE_ONE,
no packet out before the ack of the checkpoint that closed its epoch, and everything out on every exit.

The fake guest emits packet 0 when the channel opens (before the first checkpoint), packet 10n just
before its n-th suspend (epoch n) and packet 10n+1 during capture n (a frame still in flight when the
plug closed epoch n, so it belongs to epoch n+1).
"""

from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import pytest
from tests.netbuf_fakes import FakeKernel

from remus.clock import FakeClock, StopFlag
from remus.devices import CheckpointDevice
from remus.domain import Capture, DomainInfo
from remus.engine import Engine
from remus.errors import BackupLost, CheckpointError, DomainError
from remus.netbuf.netlink import RtnlSocket
from remus.netbuf.plug import PlugBuffer
from remus.sim.output import PlugQueue, SimOutputBuffer
from remus.stream.records import Checkpoint
from remus.stream.sender import EncodedCheckpoint

Event = Tuple[object, ...]
Emit = Callable[[List[int]], None]


def epoch_of(packet: int) -> int:
    if packet == 0:
        return 1
    return packet // 10 + (packet % 10)


class FakeDomain:
    def __init__(self, events: List[Event], emit: Emit, fail_capture_at: Optional[int] = None) -> None:
        self.events = events
        self.emit = emit
        self.fail_capture_at = fail_capture_at
        self.n = 0
        self._suspended = False

    @property
    def info(self) -> DomainInfo:
        return DomainInfo("fake", "guest")

    @property
    def suspended(self) -> bool:
        return self._suspended

    def devices(self, net_buffering: bool) -> Sequence[CheckpointDevice]:
        return []

    def suspend(self) -> None:
        self.n += 1
        self.emit([10 * self.n])
        self._suspended = True
        self.events.append(("suspend", self.n))

    def capture(self) -> Capture:
        self.emit([10 * self.n + 1])
        self.events.append(("capture", self.n))
        if self.n == self.fail_capture_at:
            raise DomainError("capture failed on purpose")
        return Capture([Checkpoint()], 0)

    def resume(self) -> None:
        self._suspended = False
        self.events.append(("resume", self.n))

    def close(self) -> None:
        pass


class FakeChannel:
    def __init__(self, events: List[Event], emit: Emit, stop: StopFlag, stop_after: int,
                 lose_backup_at: Optional[int] = None) -> None:
        self.events, self.emit, self.stop = events, emit, stop
        self.stop_after, self.lose_backup_at = stop_after, lose_backup_at

    def open(self, opening: bytes) -> None:
        self.emit([0])
        self.events.append(("open",))

    def send(self, checkpoint: EncodedCheckpoint) -> None:
        self.events.append(("send", checkpoint.seq))

    def wait_for_ack(self, seq: int) -> None:
        if seq == self.lose_backup_at:
            self.events.append(("backup lost", seq))
            raise BackupLost("backup went away")
        self.events.append(("ack", seq))
        if seq == self.stop_after:
            self.stop.set("SIGTERM")   # as the signal handler does

    def close(self, message: str) -> None:
        self.events.append(("close",))

    def abort(self) -> None:
        self.events.append(("abort",))


class Logged:
    """A device wrapper that records each hook in the event list before calling it."""

    def __init__(self, inner: CheckpointDevice, events: List[Event]) -> None:
        self.inner, self.events = inner, events

    @property
    def name(self) -> str:
        return self.inner.name

    def install(self) -> None:
        self.inner.install()

    def postsuspend(self) -> None:
        self.events.append(("postsuspend",))
        self.inner.postsuspend()

    def preresume(self) -> None:
        self.events.append(("preresume",))
        self.inner.preresume()

    def commit(self) -> None:
        self.events.append(("commit",))
        self.inner.commit()

    def release(self) -> None:
        self.events.append(("release",))
        self.inner.release()


class NoNic:
    def drain(self) -> None:
        pass


def sim_buffer(events: List[Event], tmp_path: Path) -> Tuple[CheckpointDevice, Emit, Optional[FakeKernel]]:
    queue = PlugQueue(lambda pkts: events.append(("out", tuple(pkts))))
    return SimOutputBuffer(queue, NoNic(), buffering=True), queue.enqueue, None  # type: ignore[arg-type]


def plug_buffer(events: List[Event], tmp_path: Path) -> Tuple[CheckpointDevice, Emit, Optional[FakeKernel]]:
    kernel = FakeKernel(deliver=lambda pkts: events.append(("out", tuple(pkts))), log=events)
    device = PlugBuffer("vif1.0", limit_bytes=10_000_000, state_dir=str(tmp_path),
                        rtnl_factory=lambda: RtnlSocket(kernel))
    return device, lambda pkts: kernel.inject("vif1.0", pkts), kernel


BUFFERS = [pytest.param(sim_buffer, id="sim-PlugQueue"), pytest.param(plug_buffer, id="PlugBuffer")]


def run(make, tmp_path: Path, *, checkpoints: int = 4, lose_backup_at: Optional[int] = None,
        fail_capture_at: Optional[int] = None):
    events: List[Event] = []
    device, emit, kernel = make(events, tmp_path)
    stop = StopFlag()
    domain = FakeDomain(events, emit, fail_capture_at)
    channel = FakeChannel(events, emit, stop, checkpoints, lose_backup_at)
    engine = Engine(domain, channel, interval_ms=100, devices=[Logged(device, events)],  # type: ignore[arg-type]
                    clock=FakeClock(), stop=stop)
    error: Optional[BaseException] = None
    try:
        engine.run()
    except (BackupLost, CheckpointError) as exc:
        error = exc
    return events, error, kernel, domain.n


def out_packets(events: List[Event]) -> List[int]:
    return [p for e in events if e[0] == "out" for p in e[1]]  # type: ignore[union-attr]


def check_no_early_release(events: List[Event]) -> None:
    """No packet leaves before the ack of its epoch, unless released on the way out."""
    release = events.index(("release",))
    for i, event in enumerate(events):
        if event[0] != "out" or i > release:
            continue
        for packet in event[1]:  # type: ignore[union-attr]
            assert ("ack", epoch_of(packet)) in events[:i], f"packet {packet} out before ack {epoch_of(packet)}"


@pytest.mark.parametrize("make", BUFFERS)
def test_epoch_order_and_release_on_stop(make, tmp_path: Path) -> None:
    events, error, kernel, n = run(make, tmp_path, checkpoints=4)
    assert error is None and n == 4
    for k in range(1, 5):
        window = events[events.index(("suspend", k)):]
        steps = [e for e in window if e[0] in ("suspend", "postsuspend", "capture", "preresume", "resume",
                                               "send", "ack", "commit")][:8]
        assert [s[0] for s in steps] == ["suspend", "postsuspend", "capture", "preresume", "resume",
                                         "send", "ack", "commit"]
        assert steps[5] == ("send", k) and steps[6] == ("ack", k)
        # packet 10k (sent just before suspend k) is in the first release after ack k
        out_after_commit = events[events.index(("ack", k)) + 1:]
        first_out = next(e for e in out_after_commit if e[0] == "out")
        assert 10 * k in first_out[1]  # type: ignore[operator]
    check_no_early_release(events)
    assert sorted(out_packets(events)) == sorted([0] + [p for k in range(1, 5) for p in (10 * k, 10 * k + 1)])
    assert events.index(("close",)) < events.index(("release",))
    if kernel is not None:
        assert kernel.leftovers() == set()
        plug_actions = [e[1] for e in events if e[0] == "plug"]
        assert plug_actions == ["BUFFER", "RELEASE_ONE"] * 4 + ["RELEASE_INDEFINITE"]
        for k in range(4):   # the kernel saw BUFFER right at postsuspend and RELEASE_ONE right at commit
            assert events[events.index(("suspend", k + 1)) + 2] == ("plug", "BUFFER")


@pytest.mark.parametrize("make", BUFFERS)
def test_backup_lost_releases_everything(make, tmp_path: Path) -> None:
    events, error, kernel, _n = run(make, tmp_path, checkpoints=9, lose_backup_at=3)
    assert isinstance(error, BackupLost)
    check_no_early_release(events)
    lost = events.index(("backup lost", 3))
    assert 30 not in out_packets(events[:lost])           # epoch 3 was never acknowledged...
    assert {0, 10, 11, 20, 21, 30, 31} == set(out_packets(events))   # ...but is let go on the way out
    assert events.index(("abort",)) > events.index(("release",))
    if kernel is not None:
        assert kernel.leftovers() == set()


@pytest.mark.parametrize("make", BUFFERS)
def test_failed_checkpoint_releases_everything(make, tmp_path: Path) -> None:
    events, error, kernel, _n = run(make, tmp_path, checkpoints=9, fail_capture_at=2)
    assert isinstance(error, CheckpointError) and error.phase == "capture"
    check_no_early_release(events)
    assert ("commit",) not in events[events.index(("suspend", 2)):]
    assert set(out_packets(events)) == {0, 10, 11, 20, 21}
    assert events.index(("resume", 2)) < events.index(("release",))
    if kernel is not None:
        assert kernel.leftovers() == set()

"""Engine-level epoch order, for both output buffers: the simulated domain's PlugQueue and the real
PlugBuffer (on the fake kernel).  Each must give: BUFFER at postsuspend -> send -> ack -> RELEASE_ONE,
no packet out before the ack of the checkpoint that closed its epoch, and everything out on every exit.

The fake guest emits packet 0 once buffering is installed (before the first checkpoint), packet 10n
just before its n-th suspend (epoch n) and packet 10n+1 during capture n (a frame still in flight
when the plug closed epoch n, so it belongs to epoch n+1).  Released packets are logged as "out P".
"""

from pathlib import Path
from typing import Callable, List, Optional, Tuple

import pytest

from remus.clock import FakeClock, StopFlag
from remus.devices import CheckpointDevice
from remus.engine import Engine
from remus.errors import BackupLost, CheckpointError, DomainError
from remus.netbuf.netlink import RtnlSocket
from remus.netbuf.plug import PlugBuffer
from remus.sim.output import PlugQueue, SimOutputBuffer
from tests.helpers import CallLog, FakeChannel, FakeDomain, Fault, stop_after
from tests.netbuf_fakes import FakeKernel

Emit = Callable[[List[int]], None]


def epoch_of(packet: int) -> int:
    return 1 if packet == 0 else packet // 10 + packet % 10


class Logged:
    """The buffer under test, its hooks logged as "buffer.<hook>"; packet 0 goes out after install."""

    def __init__(self, inner: CheckpointDevice, log: CallLog, emit: Emit) -> None:
        self.inner, self.log, self.emit = inner, log, emit

    @property
    def name(self) -> str:
        return self.inner.name

    def install(self) -> None:
        self.inner.install()
        self.emit([0])

    def postsuspend(self) -> None:
        self.log.append("buffer.postsuspend")
        self.inner.postsuspend()

    def preresume(self) -> None:
        self.inner.preresume()

    def commit(self) -> None:
        self.log.append("buffer.commit")
        self.inner.commit()

    def release(self) -> None:
        self.log.append("buffer.release")
        self.inner.release()


class NoNic:
    def drain(self) -> None:
        pass


def sim_buffer(log: CallLog, tmp_path: Path) -> Tuple[CheckpointDevice, Emit, Optional[FakeKernel]]:
    queue = PlugQueue(lambda pkts: log.extend(f"out {p}" for p in pkts))
    return SimOutputBuffer(queue, NoNic(), buffering=True), queue.enqueue, None  # type: ignore[arg-type]


def plug_buffer(log: CallLog, tmp_path: Path) -> Tuple[CheckpointDevice, Emit, Optional[FakeKernel]]:
    kernel = FakeKernel(deliver=lambda pkts: log.extend(f"out {p}" for p in pkts))
    kernel.log = log   # the kernel's ("plug", "BUFFER") entries land in the same order
    device = PlugBuffer("vif1.0", limit_bytes=10_000_000, state_dir=str(tmp_path),
                        rtnl_factory=lambda: RtnlSocket(kernel))
    return device, lambda pkts: kernel.inject("vif1.0", pkts), kernel


BUFFERS = [pytest.param(sim_buffer, id="sim-PlugQueue"), pytest.param(plug_buffer, id="PlugBuffer")]


def run(make, tmp_path: Path, *, checkpoints: int = 4, fault: Optional[Fault] = None):
    log = CallLog()
    device, emit, kernel = make(log, tmp_path)

    def guest(what: str, seq: int) -> None:
        if what == "suspend":
            emit([10 * seq])
        elif what == "capture":
            emit([10 * seq + 1])

    clock, stop = FakeClock(), StopFlag()
    domain_fault = fault if fault and fault.where.startswith("domain.") else None
    channel_fault = fault if fault and fault.where.startswith("channel.") else None
    domain = FakeDomain(log, clock, fault=domain_fault, on_call=guest)
    engine = Engine(domain, FakeChannel(log, clock, fault=channel_fault), interval_ms=100,
                    devices=[Logged(device, log, emit)], clock=clock, stop=stop,
                    on_checkpoint=stop_after(stop, checkpoints))
    error: Optional[BaseException] = None
    try:
        engine.run()
    except (BackupLost, CheckpointError) as exc:
        error = exc
    return log, error, kernel


def nth(log: CallLog, entry: object, n: int) -> int:
    """Index of the n-th (1-based) occurrence of ``entry``."""
    return [i for i, e in enumerate(log) if e == entry][n - 1]


def out(log: List[object]) -> List[int]:
    return [int(e[4:]) for e in log if isinstance(e, str) and e.startswith("out ")]


def check_no_early_release(log: CallLog) -> None:
    """No packet leaves before the ack of its epoch, unless released on the way out."""
    release = log.index("buffer.release")
    for i, entry in enumerate(log[:release]):
        if isinstance(entry, str) and entry.startswith("out "):
            epoch = epoch_of(int(entry[4:]))
            assert log[:i].count("channel.ack") >= epoch, f"{entry} before ack {epoch}"


@pytest.mark.parametrize("make", BUFFERS)
def test_epoch_order_and_release_on_stop(make, tmp_path: Path) -> None:
    log, error, kernel = run(make, tmp_path, checkpoints=4)
    assert error is None
    steps = [e for e in log if e in ("domain.suspend", "buffer.postsuspend", "domain.capture", "domain.resume",
                                     "channel.send", "channel.ack", "buffer.commit")]
    assert steps == ["domain.suspend", "buffer.postsuspend", "domain.capture", "domain.resume",
                     "channel.send", "channel.ack", "buffer.commit"] * 4
    for k in range(1, 5):
        # packet 10k, sent just before suspend k, is in the release that follows ack k, not earlier
        commit = nth(log, "buffer.commit", k)
        next_suspend = nth(log, "domain.suspend", k + 1) if k < 4 else log.index("buffer.release")
        assert 10 * k in out(log[commit:next_suspend])
    check_no_early_release(log)
    assert sorted(out(log)) == [0] + [p for k in range(1, 5) for p in (10 * k, 10 * k + 1)]
    assert log.index("channel.close") < log.index("buffer.release")
    if kernel is not None:
        assert kernel.leftovers() == set()
        plug = [e[1] for e in log if isinstance(e, tuple) and e[0] == "plug"]
        assert plug == ["BUFFER", "RELEASE_ONE"] * 4 + ["RELEASE_INDEFINITE"]
        for k in range(1, 5):   # the kernel saw BUFFER at postsuspend and RELEASE_ONE at commit
            assert log[nth(log, "buffer.postsuspend", k) + 1] == ("plug", "BUFFER")
            assert log[nth(log, "buffer.commit", k) + 1] == ("plug", "RELEASE_ONE")


@pytest.mark.parametrize("make", BUFFERS)
def test_backup_lost_releases_everything(make, tmp_path: Path) -> None:
    log, error, kernel = run(make, tmp_path, checkpoints=9, fault=Fault("channel.ack", BackupLost("gone"), seq=3))
    assert isinstance(error, BackupLost)
    check_no_early_release(log)
    lost = nth(log, "channel.ack", 3)
    assert 30 not in out(log[:lost])                  # epoch 3 was never acknowledged...
    assert set(out(log)) == {0, 10, 11, 20, 21, 30, 31}   # ...but is let go on the way out
    assert log.index("buffer.release") < log.index("channel.abort")
    if kernel is not None:
        assert kernel.leftovers() == set()


@pytest.mark.parametrize("make", BUFFERS)
def test_failed_checkpoint_releases_everything(make, tmp_path: Path) -> None:
    fault = Fault("domain.capture", DomainError("capture failed on purpose"), seq=2)
    log, error, kernel = run(make, tmp_path, checkpoints=9, fault=fault)
    assert isinstance(error, CheckpointError) and error.phase == "capture"
    check_no_early_release(log)
    assert "buffer.commit" not in log[nth(log, "domain.suspend", 2):]
    assert set(out(log)) == {0, 10, 11, 20, 21}
    assert nth(log, "domain.resume", 2) < log.index("buffer.release")
    if kernel is not None:
        assert kernel.leftovers() == set()

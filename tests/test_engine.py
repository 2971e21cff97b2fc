"""The checkpoint engine, on fakes and a fake clock: order, pacing, and every exit path."""

from __future__ import annotations

import weakref
from typing import Optional

import pytest

from remus import heap
from remus.clock import FakeClock, StopFlag
from remus.engine import Engine
from remus.channel import Silence
from remus.errors import BackupLost, CheckpointError, DomainError, HoldStill, Interrupted
from remus.domain import Capture
from remus.stats import CheckpointStats
from remus.stream.records import PAGE_SIZE, Checkpoint, PageData
from remus.stream.sender import FramedCheckpoint
from tests.helpers import CallLog, FakeChannel, FakeDevice, FakeDomain, Fault, stop_after

PER_CHECKPOINT = [
    "domain.suspend",
    "disk.postsuspend",
    "nic.postsuspend",
    "channel.contact",
    "domain.capture",
    "disk.preresume",
    "nic.preresume",
    "domain.resume",
    "channel.send",
    "channel.ack",
    "channel.contact",
    "disk.commit",
    "nic.commit",
]


def make(
    *,
    checkpoints: int = 3,
    interval_ms: int = 100,
    timer: bool = False,
    capture_s: float = 0.0,
    send_s: float = 0.0,
    prepare_s: float = 0.0,
    domain_fault: Optional[Fault] = None,
    device_fault: Optional[Fault] = None,
    channel_fault: Optional[Fault] = None,
) -> tuple[Engine, CallLog, FakeClock, FakeDomain, list[FakeDevice], FakeChannel, list[CheckpointStats]]:
    log = CallLog()
    clock = FakeClock()
    stop = StopFlag()
    domain = FakeDomain(log, clock, capture_s=capture_s, prepare_s=prepare_s, fault=domain_fault)
    devices = [
        FakeDevice(log, "disk", fault=device_fault, seq=lambda: domain.seq),
        FakeDevice(log, "nic", fault=device_fault, seq=lambda: domain.seq),
    ]
    channel = FakeChannel(log, clock, send_s=send_s, fault=channel_fault)
    seen: list[CheckpointStats] = []
    done = stop_after(stop, checkpoints)

    def on_checkpoint(stats: CheckpointStats) -> None:
        seen.append(stats)
        done(stats)

    engine = Engine(domain, channel, interval_ms=interval_ms, timer=timer, devices=devices,
                    clock=clock, stop=stop, on_checkpoint=on_checkpoint)
    return engine, log, clock, domain, devices, channel, seen


def test_callback_order_per_checkpoint() -> None:
    engine, log, _clock, domain, devices, channel, seen = make(checkpoints=3)
    result = engine.run()
    assert result.stop_reason == "test"
    assert log[:3] == ["disk.install", "nic.install", "channel.open"]
    body = log[3 : 3 + 3 * len(PER_CHECKPOINT)]
    assert body == PER_CHECKPOINT * 3
    assert log[3 + 3 * len(PER_CHECKPOINT) :] == ["channel.contact", "channel.close", "disk.release",
                                                  "nic.release", "channel.abort"]
    assert [s.seq for s in seen] == [1, 2, 3]
    assert not domain.suspended
    assert channel.closed_with == "primary stopped: test" and not channel.close_error


def test_the_pause_is_timed_from_when_the_domain_can_stop() -> None:
    # A Xen domain's first checkpoint waits through libxc's live copy (the guest running) before
    # it suspends: 30 s of that is not pause.  The 10 ms capture is.
    engine, _log, _clock, _d, _dev, _ch, seen = make(checkpoints=2, prepare_s=30.0, capture_s=0.01)
    engine.run()
    assert [round(s.pause_ms, 6) for s in seen] == [10.0, 10.0]


def test_checkpoints_are_framed_with_sequence_numbers() -> None:
    engine, _log, _clock, _domain, _devices, channel, _seen = make(checkpoints=2)
    engine.run()
    assert [c.seq for c in channel.sent] == [1, 2]
    assert channel.opening.startswith(b"\xff" * 8 + b"RMUS")


def test_interval_mode_waits_the_rest_of_the_interval() -> None:
    # Checkpoint work takes 30 ms of a 100 ms interval: suspends 100 ms apart.
    engine, _log, _clock, _d, _dev, _ch, seen = make(checkpoints=4, interval_ms=100, capture_s=0.01, send_s=0.02)
    engine.run()
    assert [round(s.period_ms or 0, 6) for s in seen[1:]] == [100.0, 100.0, 100.0]
    assert all(s.overruns == 0 for s in seen)


def test_interval_mode_overrun_starts_next_checkpoint_at_once() -> None:
    # 150 ms of work for a 100 ms interval: the period is the checkpoint time.
    engine, _log, _clock, _d, _dev, _ch, seen = make(checkpoints=4, interval_ms=100, capture_s=0.05, send_s=0.1)
    engine.run()
    assert [round(s.period_ms or 0, 6) for s in seen[1:]] == [150.0, 150.0, 150.0]
    assert all(s.overruns == 0 for s in seen)


def test_timer_mode_keeps_the_grid() -> None:
    engine, _log, _clock, _d, _dev, _ch, seen = make(checkpoints=4, interval_ms=100, timer=True, capture_s=0.03)
    engine.run()
    assert [round(s.period_ms or 0, 6) for s in seen[1:]] == [100.0, 100.0, 100.0]
    assert seen[-1].overruns == 0


def test_timer_mode_counts_overruns_and_stays_on_the_grid() -> None:
    # 150 ms of work on a 100 ms grid: every checkpoint misses one grid point,
    # so suspends land 200 ms apart, on the grid, and each counts one overrun.
    engine, _log, _clock, _d, _dev, _ch, seen = make(checkpoints=4, interval_ms=100, timer=True, capture_s=0.15)
    engine.run()
    assert [round(s.period_ms or 0, 6) for s in seen[1:]] == [200.0, 200.0, 200.0]
    assert [s.overruns for s in seen] == [1, 2, 3, 4]


def test_stop_is_honoured_only_between_checkpoints() -> None:
    engine, log, _clock, domain, devices, channel, seen = make(checkpoints=99)

    def stop_mid_checkpoint(what: str, seq: int) -> None:
        if what == "capture" and seq == 2:
            engine.stop.set("SIGINT")

    domain.on_call = stop_mid_checkpoint
    result = engine.run()
    assert result.stop_reason == "SIGINT"
    assert [s.seq for s in seen] == [1, 2]  # checkpoint 2 completed, 3 never started
    assert log.only("domain.suspend") == ["domain.suspend"] * 2
    assert all(d.released == 1 for d in devices)


PHASES = [
    ("suspend", "domain", "domain.suspend"),
    ("postsuspend", "device", "nic.postsuspend"),
    ("capture", "domain", "domain.capture"),
    ("preresume", "device", "disk.preresume"),
    ("resume", "domain", "domain.resume"),
    ("send", "channel", "channel.send"),
    ("ack", "channel", "channel.ack"),
    ("commit", "device", "nic.commit"),
]


@pytest.mark.parametrize("phase,who,where", PHASES, ids=[p[0] for p in PHASES])
@pytest.mark.parametrize("exc", [DomainError("boom"), RuntimeError("bug"), KeyboardInterrupt()],
                         ids=["remus-error", "other-error", "keyboard-interrupt"])
def test_exception_from_each_callback_leaves_domain_running_and_buffers_released(
    phase: str, who: str, where: str, exc: BaseException
) -> None:
    fault = Fault(where, exc, seq=2)
    engine, log, _clock, domain, devices, channel, seen = make(
        checkpoints=5,
        domain_fault=fault if who == "domain" else None,
        device_fault=fault if who == "device" else None,
        channel_fault=fault if who == "channel" else None,
    )
    if isinstance(exc, KeyboardInterrupt):
        with pytest.raises(KeyboardInterrupt):
            engine.run()
    else:
        with pytest.raises(CheckpointError) as info:
            engine.run()
        assert info.value.phase == phase
        assert info.value.seq == 2
        assert info.value.__cause__ is exc
    assert not domain.suspended, "the domain must be running after any failure"
    assert all(d.released == 1 for d in devices), "every output buffer must be released"
    # The backup was told (CLOSE, reason ERROR) before anything was released.
    assert channel.close_error and channel.aborted
    assert log.index("channel.close") < log.index("disk.release")
    assert [s.seq for s in seen] == [1]
    # Every successful suspend was followed by a resume (a failed resume is retried).
    suspends = len(log.only("domain.suspend")) - (phase == "suspend")
    resumes = len(log.only("domain.resume")) - (phase == "resume")
    assert resumes == suspends


def test_backup_lost_passes_through_after_cleanup() -> None:
    fault = Fault("channel.ack", BackupLost("backup went away"), seq=3)
    engine, log, _clock, domain, devices, channel, seen = make(checkpoints=5, channel_fault=fault)
    with pytest.raises(BackupLost):
        engine.run()
    assert not domain.suspended
    assert all(d.released == 1 for d in devices)
    assert channel.aborted
    assert [s.seq for s in seen] == [1, 2]
    # Epoch 3 was never committed (its output is released by release(), not commit()).
    assert log.only("nic.commit") == ["nic.commit"] * 2


def test_failed_install_still_releases_everything() -> None:
    fault = Fault("nic.install", DomainError("no plug"))
    engine, log, _clock, domain, devices, channel, _seen = make(device_fault=fault)
    with pytest.raises(DomainError):
        engine.run()
    assert all(d.released == 1 for d in devices)
    assert "domain.suspend" not in log
    assert channel.aborted


def test_interval_must_be_positive() -> None:
    log, clock = CallLog(), FakeClock()
    with pytest.raises(ValueError):
        Engine(FakeDomain(log, clock), FakeChannel(log, clock), interval_ms=0)


# --------------------------------------------------------------------------- endings (issue 9)


def released_at(log: list[str]) -> int:
    return log.index("disk.release")


def test_second_stop_request_cuts_the_ack_wait_and_still_resumes_closes_then_releases() -> None:
    fault = Fault("channel.ack", Interrupted("stopped while waiting for the backup"), seq=2)
    engine, log, _clock, domain, devices, channel, seen = make(checkpoints=5, channel_fault=fault)
    engine.stop.hurry("SIGINT")  # what the second SIGINT does; the ack wait raises Interrupted
    engine.stop = StopFlag()  # let checkpoints 1 and 2 start (the flag was only needed above)
    result = engine.run()
    assert result.stop_reason == "requested"
    assert [s.seq for s in seen] == [1]
    tail = log[log.index("channel.ack", len(PER_CHECKPOINT)) + 1:]
    assert tail == ["channel.contact", "channel.close", "disk.release", "nic.release", "channel.abort"]
    assert not channel.close_error and not domain.suspended


def test_interrupted_while_suspended_resumes_before_close() -> None:
    engine, log, _clock, domain, _devices, channel, _seen = make(checkpoints=5)

    def cut(what: str, seq: int) -> None:
        if what == "capture" and seq == 2:
            raise Interrupted("stopped")

    domain.on_call = cut
    engine.run()
    assert log.index("domain.resume", log.index("domain.capture", 10)) < log.index("channel.close")
    assert log.index("channel.close") < released_at(log)
    assert not domain.suspended and channel.closed_with is not None


@pytest.mark.parametrize("where", ["after-suspend", "after-ack"])
def test_out_of_contact_holds_still_nothing_resumed_nothing_released(where: str) -> None:
    engine, log, _clock, domain, devices, channel, seen = make(checkpoints=5)
    hit = {"after-suspend": "nic.postsuspend", "after-ack": "channel.ack"}[where]

    original = channel.out_of_contact

    def out_of_contact() -> Optional[Silence]:
        silence = original()
        if domain.seq == 2 and log[-2] == hit:
            return Silence("nothing was heard from the backup for 9.0 s", 1234.0)
        return silence

    channel.out_of_contact = out_of_contact  # type: ignore[method-assign]
    with pytest.raises(HoldStill) as info:
        engine.run()
    assert info.value.since_unix == 1234.0 and "9.0 s" in str(info.value)
    assert domain.held and domain.suspended
    assert all(d.released == 0 for d in devices), "held output must stay held"
    assert channel.closed_with is None and channel.aborted
    second = [i for i, c in enumerate(log) if c == "domain.suspend"][1]
    after = log[second:]
    assert after[-2:] == ["domain.hold", "channel.abort"]
    assert ("domain.resume" in after) == (where == "after-ack")  # never resumed once silence was seen
    assert not any(c.endswith(".commit") for c in after)
    assert [s.seq for s in seen] == [1]


def test_silence_at_the_end_holds_still_instead_of_closing() -> None:
    engine, log, _clock, domain, devices, channel, _seen = make(checkpoints=2)
    engine._on_checkpoint = lambda stats: (engine.stop.set("SIGINT"),  # type: ignore[assignment]
                                           setattr(channel, "silence", Silence("stalled", 1.0)))
    with pytest.raises(HoldStill):
        engine.run()
    assert "channel.close" not in log and all(d.released == 0 for d in devices) and domain.held


@pytest.mark.parametrize("orderly", [False, True], ids=["lost", "closed-by-backup"])
def test_backup_lost_closes_best_effort_then_fences_before_release(orderly: bool) -> None:
    fault = Fault("channel.ack", BackupLost("no ack", orderly=orderly), seq=2)
    engine, log, _clock, domain, devices, channel, _seen = make(checkpoints=5, channel_fault=fault)
    channel.confirms = False
    fenced: list[str] = []
    engine._fence = lambda reason: (fenced.append(reason), log.append("fence"))  # type: ignore[assignment]
    with pytest.raises(BackupLost):
        engine.run()
    assert channel.close_error
    if orderly:  # the backup ended the session itself: it will not take over, no fence
        assert fenced == []
    else:
        assert fenced == ["no ack"]
        assert log.index("channel.close") < log.index("fence") < released_at(log)
    assert all(d.released == 1 for d in devices) and not domain.held


def test_failed_fence_holds_still() -> None:
    fault = Fault("channel.ack", BackupLost("no ack"), seq=2)
    engine, log, _clock, domain, devices, channel, _seen = make(checkpoints=5, channel_fault=fault)
    channel.confirms = False

    def fence(reason: str) -> None:
        raise HoldStill("not fenced")

    engine._fence = fence
    with pytest.raises(HoldStill) as info:
        engine.run()
    assert isinstance(info.value.__cause__, BackupLost)
    assert domain.held and all(d.released == 0 for d in devices) and channel.aborted


def test_unconfirmed_orderly_stop_without_fence_releases_and_says_so() -> None:
    engine, log, _clock, _domain, devices, channel, _seen = make(checkpoints=2)
    channel.confirms = False
    engine.run()
    assert engine.close_confirmed is False
    assert all(d.released == 1 for d in devices)


class _LargeFirstCapture(FakeDomain):
    """The first capture carries ``heap.TRIM_AFTER_BYTES`` of pages, like a whole guest."""

    def __init__(self, log: CallLog, clock: FakeClock) -> None:
        super().__init__(log, clock)
        self.captures: list[weakref.ref[Capture]] = []

    def capture(self) -> Capture:
        if self.seq != 1:
            return super().capture()
        self._call("capture")
        n = heap.TRIM_AFTER_BYTES // PAGE_SIZE
        captured = Capture([PageData(tuple(range(n)), tuple(bytes(PAGE_SIZE) for _ in range(n))), Checkpoint()], n)
        self.captures.append(weakref.ref(captured))
        return captured


def test_memory_is_released_after_a_large_checkpoint_once_its_pages_are_dropped() -> None:
    log, clock, stop = CallLog(), FakeClock(), StopFlag()
    domain = _LargeFirstCapture(log, clock)

    class Channel(FakeChannel):
        def send(self, checkpoint: FramedCheckpoint) -> None:
            self._call("send", checkpoint.seq)
            for _chunk in checkpoint.chunks:  # sent, not kept
                pass

    def release() -> None:
        log.append("release_memory")
        assert all(ref() is None for ref in domain.captures), "the checkpoint's pages are still held"

    engine = Engine(domain, Channel(log, clock), interval_ms=100, clock=clock, stop=stop,
                    on_checkpoint=stop_after(stop, 3), release_memory=release)
    engine.run()
    assert log.count("release_memory") == 1  # after the first checkpoint only: later ones are small
    at = log.index("release_memory")
    assert log[at - 2 : at] == ["channel.ack", "channel.contact"] and log[at + 1] == "domain.suspend"
    assert domain.captures


def test_memory_is_released_every_ten_seconds_after_a_checkpoint() -> None:
    # Small checkpoints 4 s apart (t = 0, 4, ... 24): a trim after those at 12 and 24 s.
    log, clock, stop = CallLog(), FakeClock(), StopFlag()
    start = clock.now()
    released: list[float] = []
    engine = Engine(FakeDomain(log, clock), FakeChannel(log, clock), interval_ms=4000, clock=clock,
                    stop=stop, on_checkpoint=stop_after(stop, 7),
                    release_memory=lambda: released.append(clock.now() - start))
    unmapped: list[float] = []
    unmap = engine.encoder.unmap_cache

    def unmap_cache() -> None:
        unmapped.append(clock.now() - start)
        unmap()

    engine.encoder.unmap_cache = unmap_cache  # type: ignore[method-assign]
    engine.run()
    assert released == [pytest.approx(12.0), pytest.approx(24.0)]
    assert unmapped == released  # the compression cache's mappings go with the heap's free pages

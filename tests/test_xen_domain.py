"""XenDomain driven by the real engine, over a fake libxc and a fake guest."""

from __future__ import annotations

from typing import Optional

import pytest

from remus.channel import BlackholeChannel
from remus.clock import StopFlag
from remus.engine import Engine
from remus.errors import CheckpointError, DomainError
from remus.stats import CheckpointStats
from remus.stream.records import DomainHeader
from tests.xen_fakes import FakeGuest, FakeLibxc, make_domain


def run_engine(domain, checkpoints: int, device=None) -> list[CheckpointStats]:
    stop = StopFlag()
    seen: list[CheckpointStats] = []

    def on_checkpoint(stats: CheckpointStats) -> None:
        seen.append(stats)
        if len(seen) >= checkpoints:
            stop.set("test")

    engine = Engine(domain, BlackholeChannel(), interval_ms=1, stop=stop, on_checkpoint=on_checkpoint,
                    devices=[device] if device else None)
    engine.run()
    return seen


def test_engine_checkpoints_a_xen_domain_and_leaves_it_running() -> None:
    libxc = FakeLibxc(dirty_per_checkpoint=5)
    domain, guest = make_domain(libxc)
    try:
        stats = run_engine(domain, 4)
    finally:
        domain.close()
    assert [s.seq for s in stats] == [1, 2, 3, 4]
    assert all(s.dirty_pages == 5 for s in stats[1:])
    assert libxc.checkpoints == 4
    assert not guest.is_suspended
    assert guest.log[:3] == ["suspend", "resume", "xs_resume"]
    assert guest.log.count("suspend") == 4
    assert guest.closed == ["closed"] * 3  # control, store and suspender
    assert domain.info.kind == "xen" and domain.info.details["domid"] == guest.domid


def test_first_capture_starts_with_the_libxc_headers() -> None:
    domain, guest = make_domain(FakeLibxc())
    try:
        domain.suspend()
        capture = domain.capture()
        domain.resume()
    finally:
        domain.close()
    assert isinstance(capture.records[0], DomainHeader)
    assert not guest.is_suspended


class Interrupting:
    """A device whose postsuspend raises, as a second Ctrl-C would, while the guest is suspended."""

    name = "interrupting"

    def __init__(self, exc: BaseException, at: int = 2) -> None:
        self.exc = exc
        self.at = at
        self.calls = 0

    def install(self) -> None: ...

    def postsuspend(self) -> None:
        self.calls += 1
        if self.calls == self.at:
            raise self.exc

    def preresume(self) -> None: ...

    def commit(self) -> None: ...

    def release(self) -> None: ...


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), RuntimeError("boom")], ids=["sigint", "error"])
def test_an_interruption_while_suspended_leaves_the_guest_running(exc: BaseException) -> None:
    libxc = FakeLibxc()
    domain, guest = make_domain(libxc)
    try:
        with pytest.raises((KeyboardInterrupt, CheckpointError)):
            run_engine(domain, 10, Interrupting(exc))
        assert not guest.is_suspended  # the engine's cleanup resumed it
    finally:
        domain.close()
    assert not guest.is_suspended
    assert not any(t.is_alive() for t in domain._saver._threads)  # libxc's save ended


def test_close_resumes_a_guest_the_bookkeeping_thinks_is_running() -> None:
    domain, guest = make_domain(FakeLibxc())
    domain.suspend()
    domain._suspended = False  # e.g. a suspend that landed after remus gave up on it
    domain.close()
    assert not guest.is_suspended
    assert "resume" in guest.log


def test_a_guest_that_does_not_suspend_fails_the_checkpoint_and_runs_on() -> None:
    libxc = FakeLibxc()
    domain, guest = make_domain(libxc, FakeGuest(suspend_fails=True))
    domain_late: Optional[float] = None
    try:
        with pytest.raises(CheckpointError, match="suspend"):
            run_engine(domain, 3)
    finally:
        import remus.xen.domain as mod

        domain_late, mod.LATE_SUSPEND_S = mod.LATE_SUSPEND_S, 0.05
        try:
            domain.close()
        finally:
            mod.LATE_SUSPEND_S = domain_late
    assert ("suspend", 0) in libxc.calls
    assert not guest.is_suspended


def test_a_failed_save_fails_the_checkpoint_and_the_guest_runs_on() -> None:
    domain, guest = make_domain(FakeLibxc(fail="copy"))
    try:
        with pytest.raises(CheckpointError, match="capture.*xc_domain_save"):
            run_engine(domain, 3)
    finally:
        domain.close()
    assert not guest.is_suspended


def test_closed_domain_refuses_to_suspend() -> None:
    domain, _ = make_domain(FakeLibxc())
    domain.close()
    domain.close()
    with pytest.raises(DomainError, match="closed"):
        domain.suspend()


def test_vifs_without_net_buffering_support_are_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    from remus.xen.domain import XenDomain

    domain, guest = make_domain(FakeLibxc())
    vif_domain = XenDomain(domain.ref, guest, guest, guest, domain._saver, vifs=["vif7.0"])
    try:
        assert vif_domain.devices(net_buffering=True) == []
        assert "vif7.0" in caplog.text
        caplog.clear()
        assert vif_domain.devices(net_buffering=False) == []
        assert caplog.text == ""
    finally:
        vif_domain.close()

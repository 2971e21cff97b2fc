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


def test_prepare_suspend_waits_for_libxc_once() -> None:
    # The engine waits for libxc's request (the live precopy, the first time) before it times
    # the pause; suspend() must then not ask again (a second answer to libxc's checkpoint
    # callback would be left over for the next one).
    domain, guest = make_domain(FakeLibxc())
    asked = []
    wait = domain._saver.wait_for_suspend_request

    def counted() -> None:
        asked.append(1)
        wait()

    domain._saver.wait_for_suspend_request = counted  # type: ignore[method-assign]
    try:
        for _ in range(2):
            domain.prepare_suspend()
            domain.prepare_suspend()
            assert not guest.is_suspended
            domain.suspend()
            domain.capture()
            domain.resume()
    finally:
        domain.close()
    assert guest.log.count("suspend") == 2 and len(asked) == 2
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


def test_vifs_get_an_output_plug_each_unless_no_net() -> None:
    from remus.errors import NetbufError
    from remus.xen.domain import assemble

    store = AssemblyStore(dict(TREE))
    domain = assemble("web", store, AssemblyControl(), no_channel)
    try:
        assert domain.devices(False, 200) == []  # --no-net: nothing looked at, nothing installed
        # With buffering, the vif named in xenstore must exist here; on this host it does not.
        with pytest.raises(NetbufError, match="vif4.0"):
            domain.devices(True, 200)
    finally:
        domain.close()


# --------------------------------------------------------------------------- assemble


class AssemblyStore:
    """A fake xenstore holding ``tree`` (enough for ``assemble`` and the xenstore suspender)."""

    def __init__(self, tree: dict[str, str]) -> None:
        self.tree = tree
        self.watches: list[tuple[str, str]] = []

    def read(self, path: str) -> Optional[str]:
        return self.tree.get(path)

    def directory(self, path: str) -> list[str]:
        prefix = path.rstrip("/") + "/"
        return sorted({p[len(prefix):].split("/")[0] for p in self.tree if p.startswith(prefix)})

    def write(self, path: str, value: str) -> None:
        self.tree[path] = value

    def watch(self, path: str, token: str) -> None:
        self.watches.append((path, token))

    def unwatch(self, path: str, token: str) -> None:
        self.watches.remove((path, token))

    def drain_watches(self) -> int:
        return 0

    def wait_watch(self, timeout_s: float) -> bool:
        return False

    def resume_domain(self, domid: int) -> None: ...

    def close(self) -> None: ...


class AssemblyControl(FakeGuest):
    def __init__(self, **state: object) -> None:
        super().__init__(domid=4)
        self.state = state

    def info(self, domid: int):  # type: ignore[override]
        from dataclasses import replace

        base = super().info(domid)
        return None if self.state.get("gone") else replace(base, **self.state)

    def save_function(self, domid: int) -> FakeLibxc:
        return FakeLibxc()


TREE = {
    "/local/domain/0/name": "Domain-0",
    "/local/domain/4/name": "web",
    "/local/domain/4/device/vif/0/backend": "/local/domain/0/backend/vif/4/0",
    "/local/domain/0/backend/vif/4/0/vifname": "vif4.0",
}


def no_channel(domid: int, port: int):
    raise AssertionError("no suspend event channel expected")


@pytest.mark.parametrize("spec", ["web", "4"])
def test_assemble_a_pv_guest(spec: str) -> None:
    from remus.xen.domain import assemble
    from remus.xen.suspend import XenstoreSuspender

    store = AssemblyStore(dict(TREE))
    domain = assemble(spec, store, AssemblyControl(), no_channel)
    try:
        assert domain.ref == (4, "web")
        assert isinstance(domain._suspender, XenstoreSuspender)
        assert domain.info.details == {"dom_type": "pv", "max_memkb": 256, "vcpus": 1, "domid": 4,
                                       "suspend": "xenstore"}
        assert store.watches == [("@releaseDomain", "remus-suspend")]
    finally:
        domain.close()
    assert store.watches == []


def test_assemble_prefers_the_suspend_event_channel() -> None:
    from remus.xen.domain import assemble

    bound: list[tuple[int, int]] = []

    class Channel:
        def notify(self) -> None: ...

        def wait(self, timeout_s: float) -> bool:
            return True

        def close(self) -> None:
            bound.append((-1, -1))

    def bind(domid: int, port: int) -> Channel:
        bound.append((domid, port))
        return Channel()

    tree = dict(TREE, **{"/local/domain/4/device/suspend/event-channel": "17"})
    domain = assemble("web", AssemblyStore(tree), AssemblyControl(), bind)
    assert domain.info.details["suspend"] == "event channel"
    domain.close()
    assert bound == [(4, 17), (-1, -1)]


@pytest.mark.parametrize("state, message", [
    ({"hvm": True}, "HVM guest"),
    ({"shutdown": True, "shutdown_reason": 0}, "not running: shut down \\(poweroff\\)"),
    ({"dying": True}, "not running: dying"),
    ({"gone": True}, "not running: gone"),
])
def test_assemble_refuses_what_it_cannot_protect(state: dict, message: str) -> None:
    from remus.xen.domain import assemble

    with pytest.raises(DomainError, match=message):
        assemble("web", AssemblyStore(dict(TREE)), AssemblyControl(**state), no_channel)


def test_unprotected_disks_are_named_in_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    from remus.xen.domain import assemble

    tree = dict(TREE, **{
        "/local/domain/4/device/vbd/51712/backend": "/local/domain/0/backend/vbd/4/51712",
        "/local/domain/0/backend/vbd/4/51712/dev": "xvda",
        "/local/domain/4/device/vbd/51728/backend": "/local/domain/0/backend/vbd/4/51728",
        "/local/domain/0/backend/vbd/4/51728/dev": "xvdb",
    })
    assemble("web", AssemblyStore(tree), AssemblyControl(), no_channel).close()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == ["domain web has disks that remus does not replicate: xvda, xvdb (not protected)"]


def test_assemble_unknown_domain() -> None:
    from remus.errors import DomainNotFound
    from remus.xen.domain import assemble

    with pytest.raises(DomainNotFound, match="'nosuch' does not exist"):
        assemble("nosuch", AssemblyStore(dict(TREE)), AssemblyControl(), no_channel)


# --------------------------------------------------------------------------- disks


def disk_tree(mode: str, script: str = "") -> dict[str, str]:
    backend = "/local/domain/0/backend/vbd/4/51712"
    tree = dict(TREE, **{
        "/local/domain/4/device/vbd/51712/backend": backend,
        f"{backend}/dev": "xvda",
        f"{backend}/mode": mode,
        f"{backend}/params": "/var/lib/xen/images/web.img",
    })
    if script:
        tree[f"{backend}/script"] = script
    return tree


def test_a_writable_disk_that_is_not_replicated_is_refused_in_one_line() -> None:
    from remus.xen.domain import assemble

    with pytest.raises(DomainError) as info:
        assemble("web", AssemblyStore(disk_tree("w", "/etc/xen/scripts/block")), AssemblyControl(), no_channel,
                 disk_replication=True)
    assert str(info.value) == (
        "domain web: writable disk xvda (/var/lib/xen/images/web.img) is not replicated: give it "
        "script=block-remus in the domain's configuration (or pass --no-disk to protect memory only)")


def test_no_disk_protects_memory_only_and_warns_what_it_risks(caplog: pytest.LogCaptureFixture) -> None:
    from remus.xen.domain import assemble

    domain = assemble("web", AssemblyStore(disk_tree("w")), AssemblyControl(), no_channel, disk_replication=False)
    assert "disks" not in domain.info.details
    assert domain.devices(False, 100) == []
    domain.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "--no-disk" in warnings[0] and "xvda" in warnings[0]
    assert "do not match" in warnings[0]


def test_read_only_disks_need_nothing() -> None:
    from remus.xen.domain import assemble

    domain = assemble("web", AssemblyStore(disk_tree("r")), AssemblyControl(), no_channel, disk_replication=True)
    assert domain.devices(False, 100) == [] and "disks" not in domain.info.details
    domain.close()


def test_a_block_remus_disk_becomes_the_first_device(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket
    import threading

    from remus.disk import xen as disk_xen
    from remus.disk.control import ControlledDisk, serve_control
    from remus.disk.epochs import RecordingImage
    from remus.disk.server import ImageFile
    from remus.xen.domain import assemble

    image = tmp_path / "web.img"
    image.write_bytes(bytes(8192))
    monkeypatch.setattr(disk_xen, "RUN_DIR", str(tmp_path))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "4-51712.sock"))
    listener.listen(1)
    target = RecordingImage(ImageFile(str(image)))

    def serve() -> None:
        conn, _ = listener.accept()
        serve_control(conn, target)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    domain = assemble("web", AssemblyStore(disk_tree("w", "/etc/xen/scripts/block-remus")), AssemblyControl(),
                      no_channel, disk_replication=True)
    devices = domain.devices(False, 100)
    assert len(devices) == 1 and isinstance(devices[0], ControlledDisk)
    assert domain.info.details["disks"] == [{"path": str(image), "size": 8192}]
    devices[0].release()
    domain.close()
    thread.join(timeout=10)
    listener.close()
    target.image.close()


def test_holding_still_pauses_the_guest_ends_its_suspend_and_close_resumes_nothing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The backup may be running the guest: it is paused (xl pause, which outlives the fast
    # resume that ends the checkpoint's suspend), and close() never lets it run.
    from remus.xen import xl

    paused: list[str] = []
    monkeypatch.setattr(xl, "pause", paused.append)
    domain, guest = make_domain(FakeLibxc())
    try:
        domain.suspend()
        domain.capture()
        assert guest.is_suspended
        assert domain.hold() == "paused"
        assert paused == [str(guest.domid)]
        assert not guest.is_suspended and not domain.suspended  # out of the suspend, under the pause
        resumes = guest.log.count("resume")
    finally:
        domain.close()
    assert guest.log.count("resume") == resumes  # close resumed nothing more
    assert guest.closed == ["closed"] * 3

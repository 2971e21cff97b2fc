"""PlugBuffer against the fake kernel: install order, epochs, release, leftovers, and errors in plain words."""

import dataclasses
import errno
import json
import os
import subprocess
from pathlib import Path

import pytest
from tests.netbuf_fakes import FakeKernel, KernelError

from remus.errors import NetbufError, NetbufUnavailable
from remus.netbuf import devices_for, plug_limit_bytes
from remus.netbuf.netlink import RtnlSocket
from remus.netbuf.owners import RecordStore
from remus.netbuf.plug import MAX_LIMIT_BYTES, MIN_LIMIT_BYTES, PlugBuffer

LIMIT = 50_000_000
INSTALL = ["RTM_GETLINK", "RTM_NEWLINK", "RTM_GETLINK", "RTM_NEWQDISC", "RTM_NEWQDISC", "RTM_NEWTFILTER"]
TEARDOWN = ["RTM_GETLINK", "RTM_NEWQDISC", "RTM_DELTFILTER", "RTM_DELQDISC", "RTM_GETQDISC", "RTM_GETLINK",
            "RTM_DELQDISC", "RTM_DELLINK"]


def make(kernel: FakeKernel, state_dir: Path, vif: str = "vif1.0") -> PlugBuffer:
    return PlugBuffer(vif, limit_bytes=LIMIT, state_dir=str(state_dir), rtnl_factory=lambda: RtnlSocket(kernel))


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_install_builds_plug_before_redirect_and_records_each_step(tmp_path: Path) -> None:
    kernel = FakeKernel()
    dev = make(kernel, tmp_path)
    dev.install()
    assert kernel.requests == INSTALL
    assert kernel.log == [("link", "new", "remus5"), ("qdisc", "new", "plug"),
                          ("qdisc", "new", "ingress"), ("filter", "new")]
    ifb = kernel.index("remus5")
    assert kernel.limits[ifb] == LIMIT
    assert kernel.redirects == {kernel.index("vif1.0"): ifb}
    record = json.loads((tmp_path / "vif1.0").read_text())
    assert record["done"] == ["ifb", "plug", "ingress", "redirect"]
    assert (record["vif"], record["vif_index"], record["ifb"], record["pid"]) == ("vif1.0", 5, "remus5", os.getpid())
    dev.release()


def test_epochs_buffer_at_postsuspend_and_release_at_commit(tmp_path: Path) -> None:
    kernel = FakeKernel()
    dev = make(kernel, tmp_path)
    dev.install()
    kernel.inject("vif1.0", [1, 2])      # sent before the first checkpoint
    dev.postsuspend()                     # BUFFER: epoch 1 = [1, 2]
    kernel.inject("vif1.0", [3])          # after the suspend: epoch 2
    assert kernel.delivered == []
    dev.preresume()
    dev.commit()                          # RELEASE_ONE: epoch 1 goes
    assert kernel.delivered == [1, 2]
    dev.postsuspend()
    dev.commit()
    assert kernel.delivered == [1, 2, 3]
    assert [e for e in kernel.log if e[0] == "plug"] == [("plug", "BUFFER"), ("plug", "RELEASE_ONE")] * 2
    dev.release()


def test_release_lets_everything_go_then_removes_all_and_is_idempotent(tmp_path: Path) -> None:
    kernel = FakeKernel()
    dev = make(kernel, tmp_path)
    dev.install()
    kernel.inject("vif1.0", [1])
    dev.postsuspend()
    kernel.inject("vif1.0", [2])
    kernel.requests.clear()
    dev.release()
    assert kernel.delivered == [1, 2]
    assert kernel.requests == TEARDOWN
    assert kernel.log[-5:] == [("plug", "RELEASE_INDEFINITE"), ("filter", "del"), ("qdisc", "del", "ingress"),
                               ("qdisc", "del", "plug"), ("link", "del", "remus5")]
    assert kernel.leftovers() == set()
    assert kernel.closed and not (tmp_path / "vif1.0").exists() and dev.record is None
    dev.release()
    kernel.inject("vif1.0", [3])          # the vif is back to normal: straight through
    assert kernel.delivered == [1, 2, 3]


def test_release_waits_until_the_ifb_has_handed_every_frame_back(tmp_path: Path) -> None:
    kernel = FakeKernel()
    dev = make(kernel, tmp_path)
    dev.install()
    kernel.inject("vif1.0", [1, 2, 3])
    kernel.ifb_backlog = [0, 2, 1, 0]        # frames inside the IFB at each look (teardown's lookup first)
    kernel.requests.clear()
    dev.release()
    assert kernel.requests.count("RTM_GETLINK") == 1 + 3
    assert kernel.ifb_backlog == [] and kernel.leftovers() == set()


def test_release_without_install_does_nothing(tmp_path: Path) -> None:
    kernel = FakeKernel()
    make(kernel, tmp_path).release()
    assert kernel.requests == []


def test_no_sch_plug_is_unavailable_in_plain_words_and_leaves_nothing(tmp_path: Path) -> None:
    kernel = FakeKernel(has_plug=False)
    dev = make(kernel, tmp_path)
    with pytest.raises(NetbufUnavailable) as info:
        dev.install()
    message = str(info.value)
    assert "sch_plug" in message and "modprobe sch_plug" in message and "CONFIG_NET_SCH_PLUG" in message
    assert kernel.leftovers() == set()
    assert "RTM_NEWTFILTER" not in kernel.requests   # the vif was never touched
    assert os.listdir(tmp_path) == []


def test_no_ifb_is_unavailable(tmp_path: Path) -> None:
    kernel = FakeKernel(has_ifb=False)
    with pytest.raises(NetbufUnavailable, match=r"modprobe ifb.*CONFIG_IFB"):
        make(kernel, tmp_path).install()
    assert kernel.leftovers() == set() and os.listdir(tmp_path) == []


@pytest.mark.parametrize("code", [errno.EPERM, errno.EACCES])
def test_not_root_is_unavailable(tmp_path: Path, code: int) -> None:
    kernel = FakeKernel()
    kernel.fail["RTM_NEWLINK"] = KernelError(code)
    with pytest.raises(NetbufUnavailable, match=r"needs root \(CAP_NET_ADMIN\)"):
        make(kernel, tmp_path).install()


def test_missing_interface(tmp_path: Path) -> None:
    with pytest.raises(NetbufError, match="interface vif9.0 does not exist"):
        make(FakeKernel(), tmp_path, vif="vif9.0").install()


def test_foreign_ingress_qdisc_is_not_replaced(tmp_path: Path) -> None:
    kernel = FakeKernel()
    kernel.qdiscs[(kernel.index("vif1.0"), 0xFFFFFFF1)] = "ingress"   # the admin's own
    with pytest.raises(NetbufError, match="already has an ingress .* will not replace it") as info:
        make(kernel, tmp_path).install()
    assert not isinstance(info.value, NetbufUnavailable)
    assert kernel.leftovers() == {"qdisc ingress on vif1.0"}           # theirs, untouched


def test_no_mirred_is_unavailable(tmp_path: Path) -> None:
    kernel = FakeKernel()
    kernel.fail["RTM_NEWTFILTER"] = KernelError(errno.ENOENT, "TC classifier not found")
    with pytest.raises(NetbufUnavailable, match="cls_u32 act_mirred"):
        make(kernel, tmp_path).install()
    assert kernel.leftovers() == set()


def test_interface_vanishing_during_checkpoints_is_a_netbuf_error(tmp_path: Path) -> None:
    kernel = FakeKernel()
    dev = make(kernel, tmp_path)
    dev.install()
    kernel.fail["RTM_NEWQDISC"] = KernelError(errno.ENODEV)
    with pytest.raises(NetbufError, match="TCQ_PLUG_BUFFER on remus5 failed: .*No such device"):
        dev.postsuspend()
    dev.release()
    assert kernel.leftovers() == set()


def test_actions_before_install_are_refused(tmp_path: Path) -> None:
    with pytest.raises(NetbufError, match="before install"):
        make(FakeKernel(), tmp_path).postsuspend()


def test_leftovers_of_a_dead_remus_are_cleaned_before_install(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    kernel = FakeKernel()
    crashed = make(kernel, tmp_path)
    crashed.install()
    kernel.inject("vif1.0", [1])           # held by the plug nobody will release
    store = RecordStore(str(tmp_path))
    record = store.read("vif1.0")
    assert record is not None
    store.update(dataclasses.replace(record, pid=dead_pid()))   # as if its owner had been SIGKILLed
    kernel.log.clear()
    fresh = make(kernel, tmp_path)
    fresh.install()
    assert "cleaning up after remus pid" in caplog.text
    assert kernel.delivered == [1]         # the dead one's held output was let go first
    assert kernel.log[0] == ("plug", "RELEASE_INDEFINITE")
    assert json.loads((tmp_path / "vif1.0").read_text())["pid"] == os.getpid()
    fresh.release()
    assert kernel.leftovers() == set()


def test_a_live_owner_is_refused(tmp_path: Path) -> None:
    kernel = FakeKernel()
    first = make(kernel, tmp_path)
    first.install()
    with pytest.raises(NetbufError, match=rf"already buffered by remus \(pid {os.getpid()}\)"):
        make(kernel, tmp_path).install()
    assert kernel.redirects                # the first one's setup is intact
    first.release()


def test_unreadable_record_is_refused_with_its_path(tmp_path: Path) -> None:
    (tmp_path / "vif1.0").write_text("not json")
    with pytest.raises(NetbufError, match=f"{tmp_path}/vif1.0 is not a remus netbuf record"):
        make(FakeKernel(), tmp_path).install()


def test_teardown_leaves_a_foreign_device_with_the_ifb_name_alone(tmp_path: Path) -> None:
    kernel = FakeKernel()
    dev = make(kernel, tmp_path)
    dev.install()
    del kernel.links["remus5"]
    kernel.add_link("remus5", "dummy")     # someone replaced it
    with pytest.raises(NetbufError, match="remus5 is a dummy device now.*'remus-netbuf-cleanup vif1.0'"):
        dev.release()
    assert "link remus5" not in kernel.leftovers() and kernel.name_of(kernel.index("remus5")) == "remus5"
    assert kernel.redirects == {}          # the redirect was still removed
    assert (tmp_path / "vif1.0").exists()  # and the record stays for remus-netbuf-cleanup


def test_plug_limit_bytes() -> None:
    assert plug_limit_bytes(200) == 50_000_000                  # 2 x 0.2 s x 125 MB/s
    assert plug_limit_bytes(20) == MIN_LIMIT_BYTES              # the floor
    assert plug_limit_bytes(200, rate_bytes_per_s=1_250_000_000) == 500_000_000   # 10 Gbit/s
    assert plug_limit_bytes(3_600_000) == MAX_LIMIT_BYTES      # the __u32 ceiling
    with pytest.raises(ValueError):
        plug_limit_bytes(0)


def test_devices_for_checks_interfaces_and_sizes_plugs(tmp_path: Path) -> None:
    devices = devices_for(["vif1.0", "vif1.0-emu"], 200, state_dir=str(tmp_path), interfaces=lambda: ["lo", "vif1.0"])
    assert [d.name for d in devices] == ["plug:vif1.0"]
    assert isinstance(devices[0], PlugBuffer) and devices[0].limit_bytes == 50_000_000
    with pytest.raises(NetbufError, match="vif2.0 not found on this host"):
        devices_for(["vif2.0"], 200, interfaces=lambda: ["lo"])


def test_devices_for_uses_netifaces_by_default() -> None:
    assert [d.name for d in devices_for(["lo"], 200)] == ["plug:lo"]

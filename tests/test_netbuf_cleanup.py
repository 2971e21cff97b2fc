"""Ownership records and the cleanup of a killed remus's leftovers (fake kernel, plus the script)."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tests.netbuf_fakes import FakeKernel

from remus.netbuf.cleanup import Outcome, clean_stale
from remus.netbuf.netlink import RtnlSocket
from remus.netbuf.owners import Ownership, RecordError, RecordStore, process_start_time
from remus.netbuf.plug import PlugBuffer

REPO = Path(__file__).resolve().parent.parent


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def killed_remus(kernel: FakeKernel, state_dir: Path, vif: str) -> None:
    """Install buffering on ``vif``, then make its record look like its owner was SIGKILLed."""
    PlugBuffer(vif, limit_bytes=10_000_000, state_dir=str(state_dir), rtnl_factory=lambda: RtnlSocket(kernel)).install()
    store = RecordStore(str(state_dir))
    record = store.read(vif)
    assert record is not None
    store.update(dataclasses.replace(record, pid=dead_pid()))


def test_record_round_trip_and_liveness(tmp_path: Path) -> None:
    store = RecordStore(str(tmp_path / "netbuf"))
    record = Ownership.mine("vif1.0", 5, "remus5").with_step("ifb")
    assert store.create(record)
    assert not store.create(record)
    assert store.read("vif1.0") == record and record.owner_alive()
    assert record.pid_start == process_start_time(os.getpid())
    assert not dataclasses.replace(record, pid=dead_pid()).owner_alive()
    assert not dataclasses.replace(record, pid_start="1").owner_alive()   # a recycled pid
    assert store.names() == ["vif1.0"]
    store.remove("vif1.0")
    store.remove("vif1.0")
    assert store.read("vif1.0") is None and store.names() == []
    with pytest.raises(ValueError):
        record.with_step("teleport")


def test_bad_records(tmp_path: Path) -> None:
    with pytest.raises(RecordError):
        Ownership.from_json('{"vif": "x"}', "f")
    good = Ownership.mine("vif1.0", 5, "remus5").to_json()
    with pytest.raises(RecordError, match="unknown install step"):
        Ownership.from_json(good.replace('"done": []', '"done": ["warp"]'), "f")


def test_clean_stale_cleans_dead_owners_only(tmp_path: Path) -> None:
    kernel = FakeKernel(("vif1.0", "vif2.0"))
    killed_remus(kernel, tmp_path, "vif1.0")
    kernel.inject("vif1.0", [7])               # stuck in the dead one's plug
    alive = PlugBuffer("vif2.0", limit_bytes=10_000_000, state_dir=str(tmp_path),
                       rtnl_factory=lambda: RtnlSocket(kernel))
    alive.install()
    (tmp_path / "vif3.0").write_text("{}")

    dry = clean_stale(str(tmp_path), dry_run=True, rtnl_factory=lambda: RtnlSocket(kernel))
    assert [(r.vif, r.outcome) for r in dry] == [
        ("vif1.0", Outcome.WOULD_CLEAN), ("vif2.0", Outcome.IN_USE), ("vif3.0", Outcome.FAILED)]
    assert kernel.delivered == []

    results = clean_stale(str(tmp_path), rtnl_factory=lambda: RtnlSocket(kernel))
    assert [(r.vif, r.outcome) for r in results] == [
        ("vif1.0", Outcome.CLEANED), ("vif2.0", Outcome.IN_USE), ("vif3.0", Outcome.FAILED)]
    assert "remus5" in results[0].detail and "redirect" in results[0].detail
    assert kernel.delivered == [7]
    assert kernel.leftovers() == {"link remus6", "qdisc plug on remus6", "qdisc ingress on vif2.0",
                                  "redirect on vif2.0"}   # only the live one's
    assert sorted(os.listdir(tmp_path)) == ["vif2.0", "vif3.0"]
    alive.release()


def test_clean_named_interfaces(tmp_path: Path) -> None:
    kernel = FakeKernel()
    killed_remus(kernel, tmp_path, "vif1.0")
    results = clean_stale(str(tmp_path), vifs=["vif9.9", "vif1.0"], rtnl_factory=lambda: RtnlSocket(kernel))
    assert [(r.vif, r.outcome) for r in results] == [("vif9.9", Outcome.NO_RECORD), ("vif1.0", Outcome.CLEANED)]
    assert kernel.leftovers() == set()


def test_clean_after_the_domain_is_gone(tmp_path: Path) -> None:
    kernel = FakeKernel()
    killed_remus(kernel, tmp_path, "vif1.0")
    del kernel.links["vif1.0"]                 # the guest was destroyed: its vif went with it
    kernel.redirects.clear()
    kernel.qdiscs = {k: v for k, v in kernel.qdiscs.items() if v != "ingress"}
    [result] = clean_stale(str(tmp_path), rtnl_factory=lambda: RtnlSocket(kernel))
    assert result.outcome is Outcome.CLEANED and kernel.leftovers() == set()


def run_script(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, str(REPO / "bin" / "remus-netbuf-cleanup"), *args],
                          capture_output=True, text=True, env=env, timeout=60)


def test_script_with_nothing_to_do(tmp_path: Path) -> None:
    done = run_script("--state-dir", str(tmp_path))
    assert done.returncode == 0 and "nothing to clean up" in done.stdout


def test_script_reports_failures(tmp_path: Path) -> None:
    (tmp_path / "vif1.0").write_text("garbage")
    done = run_script("--state-dir", str(tmp_path), "--dry-run")
    assert done.returncode == 1 and "vif1.0: failed" in done.stderr and "not a remus netbuf record" in done.stderr

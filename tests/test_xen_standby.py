"""The hot standby (``remus.xen.standby``) against a fake ``xl migrate-receive -r`` (tests/fake_xl.py),
which checks the checkpointed stream as xl, libxl and libxc would."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from remus.backup.session import BackupSession, Committed
from remus.errors import ActivationError
from remus.xen.savefile import CHECKPOINT_TAIL, checkpoint_pieces
from remus.xen.standby import XenStandby
from remus.xen.standby_guard import destroy_standby
from tests.fake_xl import fake_xl  # noqa: F401 - a fixture
from tests.fake_xl import fake_xl_state as state
from tests.helpers import wait_until
from tests.xen_stream import STATE_TYPES, SyntheticXenGuest, xen_session

TIMEOUT_S = 20.0


def journal(home: Path) -> list[dict[str, Any]]:
    path = home / "journal.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def follow(stream: bytes, standby: XenStandby, chunk: int = 50000, batched: bool = False) -> BackupSession:
    """Feed the primary's stream to a BackupSession, handing every commit to the standby as
    the server does (a batch may commit several checkpoints: the image is then at the last)."""
    session = BackupSession()
    batches = 0
    for start in range(0, len(stream), chunk):
        commits = [o for o in session.receive_data(stream[start : start + chunk]) if isinstance(o, Committed)]
        batches += len(commits) > 1
        for output in commits:
            standby.committed(session.image, output.seq, output.changed_pfns)
    assert batches or not batched, "no batch committed two checkpoints: carrying pages is not exercised"
    return session


def expected_memory(guest: SyntheticXenGuest) -> dict[str, Any]:
    return {str(pfn): None if data is None else hashlib.sha256(data).hexdigest()  # type: ignore[arg-type]
            for pfn, (_word, data) in guest.memory.items()}


def start_standby(checkpoints: int) -> tuple[bytes, SyntheticXenGuest, XenStandby]:
    """A primary's stream of ``checkpoints`` checkpoints, its guest, and a standby started from
    the session record at the stream's start (as the receiver starts one)."""
    stream, guest = xen_session(checkpoints)
    stream_info = BackupSession()
    stream_info.receive_data(stream[:4096])
    return stream, guest, XenStandby.start(stream_info.info)


def test_the_tail_of_a_checkpoint_is_one_small_write() -> None:
    pieces = list(checkpoint_pieces({1: (1, bytes(4096))}, [1], []))
    assert pieces[-1] is CHECKPOINT_TAIL
    # libxc CHECKPOINT (0x0e, empty), then libxl CHECKPOINT_END (4, empty)
    assert CHECKPOINT_TAIL == bytes.fromhex("0e00000000000000" "0400000000000000")


def test_every_committed_checkpoint_reaches_xl_and_failover_runs_the_last(fake_xl: Path) -> None:
    stream, guest, standby = start_standby(6)
    wait_until(lambda: state(fake_xl)["domains"].get("domu--incoming"))
    session = follow(stream, standby, batched=True)
    assert session.image.seq == 6
    details = standby.activate()
    assert details["domid"] == 5 and details["name"] == "domu" and details["standby"] is True
    assert details["standby_seq"] == 6 and details["restore_s"] >= 0
    failover = json.loads((fake_xl / "failover.json").read_text())
    assert failover["memory"] == expected_memory(guest)
    # the state records of checkpoint 6: TSC_INFO ... X86_PV_VCPU_EXTENDED, tagged with seq 6
    assert [bytes.fromhex(h)[:8] for h in failover["state"]] == [
        int(t).to_bytes(4, "little") + (6).to_bytes(4, "little") for t in STATE_TYPES]
    seen = journal(fake_xl)
    assert seen[-1]["event"] == "failover" and seen[-1]["dropped"] == 0
    assert seen[-1]["ended_by"] == "END"  # libxc's END record, not the end of the pipe
    assert not [e for e in seen if e["event"] == "error"]
    stats = standby.statistics()
    assert stats["checkpoints_written"] + stats["checkpoints_merged"] == 6
    assert failover["checkpoints"] == stats["checkpoints_written"]
    assert state(fake_xl)["domains"] == {"domu": 5}


def test_xl_fails_over_at_libxcs_end_record_while_the_guard_still_holds_the_pipe(
        fake_xl: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The guard is not told and xl's stdin stays open: only libxc's END can start the failover
    # (without it activate() would give up after the shortened timeout below).
    monkeypatch.setattr("remus.xen.standby.ACTIVATE_TIMEOUT_S", 10.0)
    stream, guest, standby = start_standby(3)
    follow(stream, standby)
    told: list[bytes] = []
    monkeypatch.setattr(standby, "_tell_guard", told.append)
    monkeypatch.setattr(standby, "_close_stream", lambda: None)
    details = standby.activate()
    assert details["standby_seq"] == 3 and told == [b"a"]  # recorded, never delivered
    assert journal(fake_xl)[-1] == {"event": "failover", "checkpoints": 1, "dropped": 0, "ended_by": "END"}
    assert json.loads((fake_xl / "failover.json").read_text())["memory"] == expected_memory(guest)
    monkeypatch.undo()
    standby._tell_guard(b"a")  # the guard has seen xl end already, or lets go now
    standby._reap_guard()
    standby._close_stream()


def test_with_every_checkpoint_written_activate_ends_the_stream_before_waking_the_feeder(
        fake_xl: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The failover's first step is END to xl: waking the idle feeder and joining it first
    # would add a thread hand-off (tens of milliseconds in a busy dom0) to every failover.
    stream, guest, standby = start_standby(3)
    follow(stream, standby)
    wait_until(lambda: standby.statistics()["written_seq"] == 3)  # xl has everything; the feeder idles
    order: list[str] = []
    end_stream, join = standby._end_stream, standby._feeder.join
    monkeypatch.setattr(standby, "_end_stream", lambda: (order.append("END"), end_stream())[1])
    monkeypatch.setattr(standby._feeder, "join", lambda timeout=None: (order.append("join"), join(timeout))[1])
    details = standby.activate()
    assert order == ["END", "join"]
    assert details["backlog_pages"] == 0 and details["standby_seq"] == 3
    assert journal(fake_xl)[-1]["ended_by"] == "END"
    assert json.loads((fake_xl / "failover.json").read_text())["memory"] == expected_memory(guest)
    standby.committed(BackupSession().image, 4, frozenset({1}))  # nothing may follow END
    assert standby.statistics()["written_seq"] == 3


def test_a_standby_given_no_checkpoint_gets_no_end_record_and_activate_fails(fake_xl: Path) -> None:
    _stream, _guest, standby = start_standby(1)
    wait_until(lambda: state(fake_xl)["domains"].get("domu--incoming"))
    with pytest.raises(ActivationError, match="failed"):
        standby.activate()
    # xl read nothing after libxl's opening, not even an END record: the end of the pipe
    errors = [e["message"] for e in journal(fake_xl) if e["event"] == "error"]
    assert errors == ["bad stream opening (EOFError(0))"]
    assert state(fake_xl)["domains"] == {}


def test_a_standby_that_falls_behind_merges_checkpoints(fake_xl: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    hold = tmp_path / "go"
    monkeypatch.setenv("FAKE_XL_HOLD", str(hold))
    stream, guest = xen_session(8)
    session = BackupSession()
    session.receive_data(stream[:4096])
    # A small pipe: the first checkpoint (64 pages) cannot be written while xl reads nothing.
    standby = XenStandby.start(session.info, pipe_bytes=(65536,))
    started = time.monotonic()
    follow(stream, standby)
    assert time.monotonic() - started < TIMEOUT_S / 2  # committed() never waited for xl
    assert standby.statistics()["checkpoints_merged"] >= 6  # at most 1 being written + 1 pending
    hold.write_text("go")
    details = standby.activate()
    assert details["standby_seq"] == 8
    failover = json.loads((fake_xl / "failover.json").read_text())
    assert failover["memory"] == expected_memory(guest)
    assert failover["checkpoints"] <= 2


def test_discard_kills_xl_and_destroys_the_standby(fake_xl: Path) -> None:
    stream, _guest = xen_session(3)
    session = BackupSession()
    session.receive_data(stream[:4096])
    standby = XenStandby.start(session.info)
    follow(stream, standby)
    wait_until(lambda: any(e["event"] == "checkpoint" for e in journal(fake_xl)))
    standby.discard()
    assert state(fake_xl)["domains"] == {}
    assert ["destroy", "domu--incoming"] in state(fake_xl)["calls"]
    assert not (fake_xl / "failover.json").exists()
    assert all(e["event"] in ("created", "checkpoint") for e in journal(fake_xl))
    standby.discard()  # twice is harmless


def test_a_standby_whose_xl_died_says_so_and_activate_refuses(fake_xl: Path) -> None:
    stream, _guest = xen_session(2)
    session = BackupSession()
    session.receive_data(stream[:4096])
    standby = XenStandby.start(session.info)
    wait_until(lambda: journal(fake_xl))
    os.kill(standby._proc.pid, signal.SIGKILL)
    standby._proc.wait()  # gone, its end of the pipe closed (a kill only starts that)
    follow(stream, standby)
    wait_until(lambda: standby.broken)
    with pytest.raises(ActivationError, match="the standby of domu is broken"):
        standby.activate()
    assert state(fake_xl)["domains"] == {}


def test_a_taken_standby_name_is_said_plainly(fake_xl: Path) -> None:
    (fake_xl / "state.json").write_text(json.dumps({"domains": {"domu--incoming": 3}, "next": 5, "calls": []}))
    stream, _guest = xen_session(0)
    session = BackupSession()
    session.receive_data(stream)
    with pytest.raises(ActivationError, match="a domain named domu--incoming already exists"):
        XenStandby.start(session.info)


OWNER = r"""
import sys, time
from remus.backup.session import BackupSession, Committed
from remus.xen.standby import XenStandby
from tests.xen_stream import xen_session
stream, _ = xen_session(3)
session = BackupSession()
standby = None
for output in session.receive_data(stream):
    if standby is None and session.info:
        standby = XenStandby.start(session.info)
    if isinstance(output, Committed):  # one batch: the image is at 3 for all three
        standby.committed(session.image, output.seq, output.changed_pfns)
print(standby._proc.pid, standby._guard.pid, flush=True)
time.sleep(600)
"""


def test_a_receiver_killed_never_fails_over_its_guard_destroys_the_standby(fake_xl: Path) -> None:
    # The owner hands checkpoints 1-3 over in one batch: the standby's first checkpoint is 3.
    owner = subprocess.Popen([sys.executable, "-c", OWNER], stdout=subprocess.PIPE, text=True,
                             cwd=Path(__file__).resolve().parent.parent)
    try:
        assert owner.stdout is not None
        xl_pid, guard_pid = map(int, owner.stdout.readline().split())
        wait_until(lambda: any(e["event"] == "checkpoint" for e in journal(fake_xl)))
        owner.kill()  # SIGKILL: its end of xl's stdin closes with it
        owner.wait()
        wait_until(lambda: state(fake_xl)["domains"] == {})
        wait_until(lambda: not os.path.exists(f"/proc/{xl_pid}") or _zombie(xl_pid))
    finally:
        if owner.poll() is None:
            owner.kill()
    seen = journal(fake_xl)
    assert [e["event"] for e in seen] == ["created", "checkpoint"]  # no failover, no EOF seen
    assert not (fake_xl / "failover.json").exists()
    assert ["destroy", "domu--incoming"] in state(fake_xl)["calls"]
    wait_until(lambda: not os.path.exists(f"/proc/{guard_pid}") or _zombie(guard_pid))


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def test_destroy_standby_says_when_there_was_nothing(fake_xl: Path) -> None:
    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    assert destroy_standby(proc.pid, "domu--incoming") == "no domain domu--incoming was left"
    assert proc.wait() == -signal.SIGKILL


def test_the_standby_holds_no_copy_of_the_guest(fake_xl: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Pending checkpoints are PFNs: while xl reads nothing, committing the whole guest to the
    standby allocates a small fraction of its size (the feeder reads pages as it writes them)."""
    monkeypatch.setenv("FAKE_XL_HOLD", str(tmp_path / "go"))
    stream, guest = xen_session(3)
    session = BackupSession()
    session.receive_data(stream)
    assert session.image.seq == 3
    guest_bytes = sum(4096 for _word, data in guest.memory.values() if data is not None)
    standby = XenStandby.start(session.info, pipe_bytes=(65536,))
    tracemalloc.start()
    try:
        for seq in (1, 2, 3):
            standby.committed(session.image, seq, set(session.image.pages))
        held, _peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held < guest_bytes / 8, (held, guest_bytes)
    (tmp_path / "go").write_text("go")
    standby.activate()
    failover = json.loads((fake_xl / "failover.json").read_text())
    assert failover["memory"] == expected_memory(guest)


def start_held(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, checkpoints: int) -> tuple[XenStandby, bytes]:
    """A standby over a 64 KiB pipe whose xl reads nothing until ``tmp_path/go`` exists, and the
    primary's stream of ``checkpoints`` checkpoints."""
    monkeypatch.setenv("FAKE_XL_HOLD", str(tmp_path / "go"))
    stream, _guest = xen_session(checkpoints)
    session = BackupSession()
    session.receive_data(stream[:4096])
    return XenStandby.start(session.info, pipe_bytes=(65536,)), stream


def test_the_standby_is_warming_until_xl_has_read_the_first_checkpoint(fake_xl: Path, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    standby, stream = start_held(tmp_path, monkeypatch, 2)
    assert not standby.warming()  # nothing committed yet: no ACK to hold
    follow(stream, standby)
    assert standby.warming()  # xl reads nothing while held
    (tmp_path / "go").write_text("go")
    wait_until(lambda: not standby.warming())
    assert standby.broken is None
    standby.discard()


def test_a_standby_that_stays_cold_breaks_and_holds_nothing(fake_xl: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    standby, stream = start_held(tmp_path, monkeypatch, 1)
    follow(stream, standby)
    assert standby.warming()
    standby._warm_limit_s = 0.0  # as if ACTIVATE_TIMEOUT_S had passed
    assert not standby.warming()
    assert standby.broken == "xl did not take in the first checkpoint within 0 s"
    with pytest.raises(ActivationError, match="broken"):
        standby.activate()  # the cold path restores instead

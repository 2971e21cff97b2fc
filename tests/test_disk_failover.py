"""The whole pipeline with a disk: a real ``remus`` primary protecting a simulated guest that
writes its disk through NBD, a receiver in this process keeping the replica; SIGKILL the primary.

After every kill the backup's replica must be exactly the disk the guest had at the last
committed checkpoint: the backup checked it against the primary's digest at every commit
(a mismatch would have been a protocol error), and here it is compared byte for byte with the
guest's disk after its first J writes, J read back from the replica itself, and with the
primary's own image (which may only be ahead).

REMUS_DISK_KILLS=N for a longer campaign (default 3).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from remus.backup.session import BackupSession
from remus.sim.disk import expected_disk, writes_on
from tests.helpers import write_key_file
from tests.test_transport import ROOT, ReceiverThread

RUNS = int(os.environ.get("REMUS_DISK_KILLS", "3"))
SIZE = 1 << 20


def one_kill(run: int, tmp: Path) -> None:
    rng = random.Random(run)
    primary_img = tmp / f"primary{run}.img"
    backup_root = tmp / f"backup{run}"
    seed = 1000 + run
    target = rng.randrange(3, 8)
    state: dict[str, object] = {"looked": 0.0}

    def guest_has_written(session: BackupSession) -> bool:
        """The committed replica holds some of the guest's writes (looked at every 0.2 s)."""
        now = time.monotonic()
        if session.disks is None or now - float(state["looked"]) < 0.2:  # type: ignore[arg-type]
            return False
        state["looked"] = now
        with open(session.disks.paths[0], "rb") as f:
            return any(f.read())

    def on_progress(session: BackupSession) -> None:
        proc = state.get("proc")
        if not isinstance(proc, subprocess.Popen) or "killed_at" in state or session.image.seq < target:
            return
        if state.get("written") or guest_has_written(session):
            state["written"] = True
            extra = state.setdefault("extra", session.image.seq + rng.randrange(0, 6))
            if session.image.seq >= extra:  # type: ignore[operator]
                proc.send_signal(signal.SIGKILL)
                state["killed_at"] = session.image.seq

    backup = ReceiverThread(takeover_timeout_s=2.0, on_progress=on_progress, disk_root=str(backup_root))
    spec = (f"sim:d{run},memory=2M,dirty_rate=2000,packet_rate=50,seed={seed},"
            f"disk={primary_img},disk_size={SIZE},disk_rate=300")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "remus.cli", "-i", str(rng.choice([20, 40])),
                             "--key-file", write_key_file(tmp), spec,
                             "127.0.0.1", "-p", str(backup.port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state["proc"] = proc
    try:
        proc.wait(timeout=60)
        event = backup.wait_event("activated", "nothing-to-activate", "activation-failed", "protocol-error")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        status = backup.finish()
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    assert event["event"] == "activated", (event, backup.lines, stderr)
    assert status == 0
    replica = (backup_root / str(primary_img).lstrip("/")).read_bytes()
    assert event["disks"] == [str(backup_root / str(primary_img).lstrip("/"))]
    assert event["disk_seq"] == event["seq"] >= target
    writes = writes_on(replica, seed)
    assert writes > 0
    assert replica == expected_disk(seed, writes, SIZE)
    primary = primary_img.read_bytes()
    primary_writes = writes_on(primary, seed)
    assert primary_writes >= writes and primary == expected_disk(seed, primary_writes, SIZE)


def test_sigkill_leaves_the_backup_disk_at_the_last_committed_checkpoint(tmp_path: Path) -> None:
    for run in range(RUNS):
        one_kill(run, tmp_path)

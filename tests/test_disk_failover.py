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

from remus.backup import BackupSession
from remus.sim.disk import expected_disk, writes_on
from tests.test_transport import ROOT, ReceiverThread

RUNS = int(os.environ.get("REMUS_DISK_KILLS", "3"))
SIZE = 1 << 20


def one_kill(run: int, tmp: Path) -> None:
    rng = random.Random(run)
    primary_img = tmp / f"primary{run}.img"
    backup_root = tmp / f"backup{run}"
    seed = 1000 + run
    target = rng.randrange(3, 8)
    after_s = rng.uniform(0.4, 1.2)  # the writer process needs a moment to start writing
    state: dict[str, object] = {}

    def on_progress(session: BackupSession) -> None:
        proc = state.get("proc")
        if session.image.seq and "first" not in state:
            state["first"] = time.monotonic()
        started = state.get("first")
        if not isinstance(started, float) or time.monotonic() - started < after_s:
            return
        if isinstance(proc, subprocess.Popen) and "killed_at" not in state and session.image.seq >= target:
            proc.send_signal(signal.SIGKILL)
            state["killed_at"] = session.image.seq

    backup = ReceiverThread(heartbeat_timeout_s=2.0, on_progress=on_progress, disk_root=str(backup_root))
    spec = (f"sim:d{run},memory=2M,dirty_rate=2000,packet_rate=50,seed={seed},"
            f"disk={primary_img},disk_size={SIZE},disk_rate=300")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "remus.cli", "-i", str(rng.choice([20, 40])), spec,
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

"""The lab's CPU window (``tests/xenlab/cpuwindow.py``), on snapshots written here, and its
snapshot taken by ``exitclock.py kill`` (run against a process this test starts)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

LAB = Path(__file__).resolve().parent / "xenlab"
sys.path.insert(0, str(LAB))
import cpuwindow  # noqa: E402  (a lab script, not a package)

TICK = os.sysconf("SC_CLK_TCK")


def stat_line(pid: int, comm: str, utime: int, stime: int, start: int, vsize: int) -> str:
    """A ``/proc/PID/stat`` line with these fields (the others zero)."""
    # after the state: ppid .. cmajflt (10 fields), utime, stime, cutime .. itrealvalue (6), starttime, vsize
    fields = ["S"] + ["0"] * 10 + [str(utime), str(stime)] + ["0"] * 6 + [str(start), str(vsize)] + ["0"] * 30
    return f"{pid} ({comm}) " + " ".join(fields) + "\n"


def cpu_line(user: int, system: int, idle: int, steal: int) -> str:
    return f"cpu  {user} 0 {system} {idle} 0 0 0 {steal} 0 0\ncpu0 0 0 0 0 0 0 0 0 0 0\n"


def test_the_window_counts_each_process_once_by_pid_and_start_time(tmp_path: Path) -> None:
    before = tmp_path / "before"
    after = tmp_path / "after"
    before.write_text(cpu_line(1000, 500, 4000, 10)
                      + stat_line(10, "python3", 900, 100, 50, 1 << 20)
                      + stat_line(11, "kworker/0:0-events", 5, 5, 60, 0)
                      + stat_line(12, "old", 70, 0, 70, 0)      # its PID is reused by "new"
                      + stat_line(13, "ends", 40, 0, 80, 0))   # ends in the window: not seen
    after.write_text(cpu_line(1000 + 2 * TICK, 500 + TICK, 4000 + TICK, 10 + TICK // 2)
                     + stat_line(10, "python3", 900 + TICK, 100, 50, 9 << 20)   # grew: same process
                     + stat_line(11, "kworker/0:0-mm_percpu_wq", 5 + TICK // 10, 5, 60, 0)  # renamed
                     + stat_line(12, "new (with) parens", TICK // 2, 0, 99, 0))
    line = cpuwindow.window(str(before), str(after))
    assert line.startswith("dom0 CPU: busy 3.00 s, idle 1.00 s, stolen 0.50 s; live processes 1.60 s ")
    assert "most: python3[10] 1.00, new (with) parens[12] 0.50, kworker/0:0-mm_percpu_wq[11] 0.10)" in line
    assert line.endswith("not in a live process 1.40 s")


def test_exitclock_kill_snapshots_before_it_kills(tmp_path: Path) -> None:
    victim = subprocess.Popen(["sleep", "60"])
    snap = tmp_path / "before"
    try:
        out = subprocess.run([sys.executable, str(LAB / "exitclock.py"), "kill", str(victim.pid)],
                             env=dict(os.environ, EXITCLOCK_SNAPSHOT=str(snap)),
                             capture_output=True, text=True, timeout=30, check=True).stdout
        assert victim.wait(timeout=30) == -9
    finally:
        victim.kill()
    assert len(out.split()) == 2
    total, procs = cpuwindow.read(str(snap))
    assert total["busy"] > 0
    assert any(pid == victim.pid and name == "sleep" for (pid, _start), (name, _ticks) in procs.items())

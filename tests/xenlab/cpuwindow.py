"""Lab helper (dom0): which processes used dom0's CPUs between two snapshots.

    python3 cpuwindow.py BEFORE AFTER    one line: how busy dom0's CPUs were in between, and
                                         the processes that used the most of it

A snapshot (``snapshot``, which ``exitclock.py`` calls with EXITCLOCK_SNAPSHOT) is the text of
``/proc/stat`` followed by every ``/proc/PID/stat``: taken just before a kill and just after the
exit waited for, by a process already running (a ``python3`` start takes about a second under
emulation, too long to stand between a snapshot and the moment being timed).  Per process, the
CPU time (user + system) it used between the two; a process that started in between counts
whole, one that ended in between is not seen (its time shows only in the total, as "not in a
live process").  Clock ticks are 10 ms, so this is coarse.  Reading, it looks only at the two
files.
"""

from __future__ import annotations

import os
import re
import sys

_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")
_PROC_STAT = re.compile(r"^(\d+) \((.*)\) \S+ (.*)$")
_TOP = 6


def snapshot(path: str) -> None:
    """Write ``/proc/stat`` and every ``/proc/PID/stat``, as they are now, to ``path``."""
    texts = []
    for name in ["stat"] + [n + "/stat" for n in os.listdir("/proc") if n.isdigit()]:
        try:
            with open("/proc/" + name) as f:
                texts.append(f.read())
        except OSError:  # a process that ended meanwhile
            pass
    with open(path, "w") as f:
        f.write("".join(texts))


def read(path: str) -> tuple[dict[str, int], dict[tuple[int, int], tuple[str, int]]]:
    """The snapshot at ``path``: dom0's CPU ticks by kind (busy, idle, steal) and, per process
    (its PID and start time: a PID can be reused), its name and its user + system ticks."""
    total = {"busy": 0, "idle": 0, "steal": 0}
    procs: dict[tuple[int, int], tuple[str, int]] = {}
    with open(path, errors="replace") as f:
        for line in f:
            if line.startswith("cpu "):
                # user nice system idle iowait irq softirq steal ...
                ticks = [int(t) for t in line.split()[1:]]
                total["idle"] = ticks[3] + ticks[4]
                total["steal"] = ticks[7] if len(ticks) > 7 else 0
                total["busy"] = sum(ticks[:8]) - total["idle"] - total["steal"]
                continue
            m = _PROC_STAT.match(line.rstrip("\n"))
            if m:
                rest = m.group(3).split()
                # after the state: ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt
                # utime stime cutime cstime priority nice threads itrealvalue starttime
                procs[(int(m.group(1)), int(rest[18]))] = (m.group(2), int(rest[10]) + int(rest[11]))
    return total, procs


def window(before: str, after: str) -> str:
    """The one line this helper prints for two snapshots."""
    t0, p0 = read(before)
    t1, p1 = read(after)
    busy, idle, steal = ((t1[k] - t0[k]) * _TICK_S for k in ("busy", "idle", "steal"))
    used = []
    for key, (name, ticks) in p1.items():
        then = p0.get(key)
        delta = ticks - then[1] if then is not None else ticks
        if delta > 0:
            used.append((delta * _TICK_S, f"{name}[{key[0]}]"))
    used.sort(reverse=True)
    seen = sum(s for s, _ in used)
    top = ", ".join(f"{who} {s:.2f}" for s, who in used[:_TOP]) or "none"
    return (f"dom0 CPU: busy {busy:.2f} s, idle {idle:.2f} s, stolen {steal:.2f} s; live processes "
            f"{seen:.2f} s (most: {top}); not in a live process {max(busy - seen, 0.0):.2f} s")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    print(window(sys.argv[1], sys.argv[2]))

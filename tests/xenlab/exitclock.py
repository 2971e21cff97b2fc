"""Lab helper (dom0): when a process exits, and a SIGKILL stamped with the same clock.

    python3 exitclock.py wait PID FILE   write FILE.ready once watching, then the boot time
                                         (CLOCK_BOOTTIME, /proc/uptime's clock) at which PID
                                         exits to FILE; after WAIT_LIMIT_S without an exit, no
                                         FILE
    python3 exitclock.py kill PID        SIGKILL PID; print the boot time and the wall time
                                         (Unix seconds) read just before it

The waiter blocks on a pidfd, so it learns of the exit when the kernel signals it and adds no
polling load to the emulated dom0 while a failover is being timed: polling with shell commands
there lagged by up to a second when dom0 was busy.  Never kills anything but the PID it is given.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time

WAIT_LIMIT_S = 120.0


def boottime() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def wait(pid: int, path: str) -> int:
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:  # already gone: as good as exiting now
        fd = -1
    with open(path + ".ready", "w", encoding="ascii") as ready:
        ready.write("ready\n")
    if fd >= 0 and not select.select([fd], [], [], WAIT_LIMIT_S)[0]:
        return 1
    exited = boottime()
    with open(path, "w", encoding="ascii") as out:
        out.write(f"{exited:.3f}\n")
    return 0


def kill(pid: int) -> int:
    now_boot, now_wall = boottime(), time.time()
    os.kill(pid, signal.SIGKILL)
    print(f"{now_boot:.3f} {now_wall:.3f}")
    return 0


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "wait":
        return wait(int(argv[1]), argv[2])
    if len(argv) == 2 and argv[0] == "kill":
        return kill(int(argv[1]))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

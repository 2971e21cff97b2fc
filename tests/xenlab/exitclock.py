"""Lab helper (dom0): when a process exits or a log line appears, and a SIGKILL, on one clock.

    python3 exitclock.py wait PID FILE   write FILE.ready once watching, then the boot time
                                         (CLOCK_BOOTTIME, /proc/uptime's clock) at which PID
                                         exits to FILE; after WAIT_LIMIT_S without an exit, no
                                         FILE (with EXITCLOCK_SNAPSHOT=SNAP, /proc's CPU times
                                         as PID has just exited to SNAP first, see cpuwindow.py)
    python3 exitclock.py kill PID...     SIGKILL each PID, in order; print the boot time and the
                                         wall time (Unix seconds) read just before the first
                                         (with EXITCLOCK_SNAPSHOT=FILE, first /proc's CPU
                                         times to FILE, see cpuwindow.py; also for shut)
    python3 exitclock.py shut PID PORT   shut down (SHUT_RDWR) PID's TCP connections to PORT,
                                         taken with pidfd_getfd, leaving PID as it is (a frozen
                                         primary "vanishes" without its teardown); print the
                                         times as kill does; exit 1 if it has no such connection
    python3 exitclock.py line FILE REGEX LOG:SKIP...
                                         write FILE.ready once watching, then the boot time at
                                         which a line matching REGEX is first seen in a LOG
                                         beyond its first SKIP lines (a LOG may not exist yet);
                                         after WAIT_LIMIT_S without one, no FILE

The waiter blocks on a pidfd, so it learns of the exit when the kernel signals it and adds no
polling load to the emulated dom0 while a failover is being timed: polling with shell commands
there lagged by up to a second when dom0 was busy.  The line watcher sleeps on inotify until a
file in its logs' directories is written, then reads only what the logs gained (every
``LINE_POLL_S`` where inotify is missing); it is started before the moment it times, so a
shell loop does not stand between that moment and the stamp.  Never kills
anything but the PIDs it is given, never writes to a LOG, shuts no connection but PID's to PORT.
"""

from __future__ import annotations

import ctypes
import os
import re
import select
import signal
import socket
import sys
import time

WAIT_LIMIT_S = 120.0
LINE_POLL_S = 0.02


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
    snapshot()
    with open(path, "w", encoding="ascii") as out:
        out.write(f"{exited:.3f}\n")
    return 0


class _Tail:
    """The lines a log gains beyond its first ``skip``, read from where the last look stopped."""

    def __init__(self, name: str, skip: int) -> None:
        self.name, self.skip = name, skip
        self.offset = self.lines = 0
        self.partial = b""

    def new_lines(self) -> list[str]:
        try:
            with open(self.name, "rb") as log:
                log.seek(self.offset)
                data = log.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        *whole, self.partial = (self.partial + data).split(b"\n")
        first = self.lines
        self.lines += len(whole)
        return [text.decode("utf-8", "replace") for k, text in enumerate(whole, first) if k >= self.skip]


#: inotify(7): a file in a watched directory was written, created or moved in.
_IN_MODIFY, _IN_CREATE, _IN_MOVED_TO = 0x2, 0x100, 0x80


def _watch_directories(names: list[str]) -> int:
    """An inotify descriptor that becomes readable when a file in the logs' directories changes,
    or -1 where there is none (the caller then polls)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    if fd < 0:
        return -1
    for directory in {os.path.dirname(os.path.abspath(name)) for name in names}:
        if libc.inotify_add_watch(fd, directory.encode(), _IN_MODIFY | _IN_CREATE | _IN_MOVED_TO) < 0:
            os.close(fd)
            return -1
    return fd


def line(path: str, pattern: str, logs: list[str]) -> int:
    regex = re.compile(pattern)
    tails = []
    for spec in logs:
        name, _, skip = spec.rpartition(":")
        tails.append(_Tail(name, int(skip or 0)))
    # Woken by inotify when a log is written, it reads only what was added: on a one-CPU dom0
    # the watcher would otherwise take a visible share of the CPU it is timing.
    notify = _watch_directories([tail.name for tail in tails])
    with open(path + ".ready", "w", encoding="ascii") as ready:
        ready.write("ready\n")
    deadline = time.monotonic() + WAIT_LIMIT_S
    while time.monotonic() < deadline:
        for tail in tails:
            if any(regex.search(text) for text in tail.new_lines()):
                seen = boottime()
                with open(path, "w", encoding="ascii") as out:
                    out.write(f"{seen:.3f}\n")
                return 0
        if notify < 0:
            time.sleep(LINE_POLL_S)
        elif select.select([notify], [], [], 1.0)[0]:
            while True:  # drain the events: which file changed does not matter
                try:
                    if not os.read(notify, 4096):
                        break
                except BlockingIOError:
                    break
    return 1


def stamp() -> str:
    """The boot time and the wall time (Unix seconds), as ``kill`` and ``shut`` print them."""
    return f"{boottime():.3f} {time.time():.3f}"


def snapshot() -> None:
    """With EXITCLOCK_SNAPSHOT=FILE: /proc's CPU times, as they are now, to FILE
    (``cpuwindow.snapshot``): just before a kill or a shutdown, or just after the exit waited
    for."""
    path = os.environ.get("EXITCLOCK_SNAPSHOT")
    if path:
        import cpuwindow  # beside this script

        cpuwindow.snapshot(path)


def kill(pids: list[int]) -> int:
    snapshot()
    now = stamp()
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    print(now)
    return 0


#: pidfd_getfd(2) (Linux 5.6); Python has no wrapper for it.
SYS_PIDFD_GETFD = 438


def shut(pid: int, port: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    found: list[socket.socket] = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            if not os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                continue
        except OSError:
            continue
        fd = libc.syscall(SYS_PIDFD_GETFD, pidfd, int(name), 0)
        if fd < 0:
            print(f"pidfd_getfd of fd {name}: {os.strerror(ctypes.get_errno())}", file=sys.stderr)
            continue
        sock = socket.socket(fileno=fd)
        try:
            if sock.type == socket.SOCK_STREAM and sock.family in (socket.AF_INET, socket.AF_INET6) \
                    and sock.getpeername()[1] == port:
                found.append(sock)
                continue
        except OSError:
            pass
        sock.close()  # our copy only
    if not found:
        print(f"process {pid} has no TCP connection to port {port}", file=sys.stderr)
        return 1
    snapshot()
    now = stamp()
    for sock in found:
        sock.shutdown(socket.SHUT_RDWR)
    print(now)
    return 0


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "wait":
        return wait(int(argv[1]), argv[2])
    if len(argv) >= 2 and argv[0] == "kill":
        return kill([int(pid) for pid in argv[1:]])
    if len(argv) == 3 and argv[0] == "shut":
        return shut(int(argv[1]), int(argv[2]))
    if len(argv) >= 4 and argv[0] == "line":
        return line(argv[1], argv[2], argv[3:])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

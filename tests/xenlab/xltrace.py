"""Lab helper (dom0): where the time of a standby's failover goes inside ``xl migrate-receive -r``.

    python3 xltrace.py exec DIR XL ARGS...
        run ``XL -vvv ARGS...`` in this process (same pid: the job's pidfd clocks keep
        working); a child copies xl's stderr to the original stderr unchanged and, each
        line stamped with the boot time (CLOCK_BOOTTIME, /proc/uptime's clock) at which it
        was read, to DIR/xl-PID.log
    python3 xltrace.py phases T0 LOG
        print, after T0 (a boot time: the SIGKILL), when xl's failover reached each of its
        landmarks (libxc completing the domain, libxl's save helper done, the console, the
        rename, the unpause, xl's exit) and how long each step took

Used by jobs/failover-xen.sh with REMUS_LAB_XL_TRACE=1, for remus's standby and for
``xl remus``'s alike.  xl's messages are stamped when read, so a stamp may lag its message
by the time the stamper waited for the CPU; both standbys are stamped the same way.  Never
writes to xl's stdin or stdout and never changes what xl says.
"""

from __future__ import annotations

import os
import sys

from exitclock import boottime  # beside this file: the same clock as the job's kill

#: (what xl says, the landmark's name), in the order a failover says them (Xen 4.17.7:
#: xg_sr_restore.c, xg_sr_restore_x86_pv.c, libxl_stream_read.c, xl_migrate.c).
LANDMARKS = (
    ("Failed to read Record Header", "eof"),  # the end of the pipe (absent after libxc's END)
    ("xc_dom_set_gnttab_entry", "libxc_complete"),  # vCPUs set, page tables pinned, p2m done
    ("Restore successful", "restored"),
    ("libxl-save-helper: debug: complete", "helper_done"),
    ("console/tty", "console"),
    ("libxl__ao_complete", "created"),
    ("Remus Failover for domain", "failover_said"),
    ("libxl_domain_unpause", "unpause"),
)


def run(directory: str, argv: list[str]) -> int:
    """Exec ``argv[0] -vvv argv[1:]`` with its stderr stamped (see the module docstring)."""
    os.makedirs(directory, exist_ok=True)
    read_end, write_end = os.pipe()
    original = os.dup(2)
    log_path = os.path.join(directory, f"xl-{os.getpid()}.log")
    if os.fork() == 0:
        os.close(write_end)
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)  # hold none of xl's pipes
        os.dup2(null, 1)
        with open(log_path, "ab", buffering=0) as log:
            rest = b""
            while True:
                chunk = os.read(read_end, 65536)
                now = boottime()
                if not chunk:
                    break
                os.write(original, chunk)
                *lines, rest = (rest + chunk).replace(b"\r", b"\n").split(b"\n")
                log.write(b"".join(b"%.6f %s\n" % (now, line) for line in lines if line))
            log.write(b"%.6f exit %s\n" % (boottime(), rest))
        os._exit(0)
    os.close(read_end)
    os.dup2(write_end, 2)
    os.close(write_end)
    os.close(original)
    os.execvp(argv[0], [argv[0], "-vvv"] + argv[1:])
    return 127  # not reached


def phases(t0: float, log_path: str) -> str:
    """One line: each landmark's time after ``t0`` and the step before it."""
    seen: dict[str, float] = {}
    for line in open(log_path, encoding="utf-8", errors="replace"):
        stamp, _, text = line.partition(" ")
        try:
            when = float(stamp)
        except ValueError:
            continue
        if when < t0:
            continue
        for needle, name in LANDMARKS + (("exit ", "exit"),):
            if name not in seen and (text.startswith(needle) if name == "exit" else needle in text):
                seen[name] = when
    parts, previous = [], t0
    for name in [name for _needle, name in LANDMARKS] + ["exit"]:
        if name in seen:
            parts.append(f"{name} {seen[name] - t0:.3f} (+{seen[name] - previous:.3f})")
            previous = seen[name]
    return ", ".join(parts) or "no landmark after the kill"


def main(argv: list[str]) -> int:
    if len(argv) >= 3 and argv[0] == "exec":
        return run(argv[1], argv[2:])
    if len(argv) == 3 and argv[0] == "phases":
        print(phases(float(argv[1]), argv[2]))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

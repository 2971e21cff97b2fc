"""The standby's guard: a receiver that dies must never turn into a failover.

``xl migrate-receive -r`` fails a domain over when its stdin reaches the end
of the stream (or libxc's END record, which only the receiver's
``XenStandby.activate`` writes, once it has decided to fail over).  If the
receiver held the only write end of that pipe, its death (SIGKILL, a crash,
the OOM killer) would close it and start the standby domain while the primary
may be running: two copies of one guest.  So
``remus.xen.standby`` starts this small process (``python3 -m
remus.xen.standby_guard CONTROL_FD STREAM_FD XL_PID NAME``), in its own
session, holding a second write end of xl's stdin (``STREAM_FD``) and the
read end of a control pipe (``CONTROL_FD``) whose only writer is the receiver.
It then waits for one of:

* ``a`` (activate) or ``q`` (quit: the receiver destroys the standby itself):
  it closes its end of xl's stdin and exits;
* the end of the control pipe without a word: the receiver is gone.  It kills
  xl's process group (xl and libxl's restore helper) *before* letting go of
  xl's stdin, so xl never reads the end of the stream, then destroys the
  paused ``NAME`` (``DOMAIN--incoming``) domain;
* xl ending on its own (seen through a pidfd, or by polling where there is
  none): nothing is left to guard.

``destroy_standby`` is the one place that destroys a standby; the receiver
calls it too (``XenStandby.discard``).  The guard never writes to xl's stdin
and never starts a domain.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import sys
from typing import Optional, Sequence

from remus.errors import XlError
from remus.xen import xl

log = logging.getLogger(__name__)

ACTIVATE = b"a"
QUIT = b"q"
#: How often the guard looks at xl where the kernel offers no pidfd.
_POLL_S = 1.0


def destroy_standby(xl_pgid: int, name: str) -> str:
    """Kill xl's process group (``xl migrate-receive`` and its helpers), then ``xl destroy NAME``.

    Returns what was done, as a sentence for a log line; never raises.
    """
    try:
        os.killpg(xl_pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    except OSError as exc:
        return f"could not kill xl (process group {xl_pgid}): {exc.strerror or exc}; {name} may be LEFT BEHIND"
    try:
        domid = xl.domid(name)
        if domid is None:
            return f"no domain {name} was left"
        xl.destroy(name)
    except XlError as exc:
        return f"the standby domain {name} is LEFT BEHIND: {exc}"
    return f"the standby domain {name} (id {domid}) was destroyed"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def guard(control_fd: int, stream_fd: int, xl_pid: int, name: str) -> str:
    """Watch until told, or until the receiver or xl is gone; return what happened."""
    pidfd: Optional[int] = None
    try:
        pidfd = os.pidfd_open(xl_pid)
    except (AttributeError, OSError):  # no pidfd (Linux < 5.3) or xl already gone
        pidfd = None
    watched = [control_fd] if pidfd is None else [control_fd, pidfd]
    try:
        while True:
            readable, _, _ = select.select(watched, [], [], None if pidfd is not None else _POLL_S)
            if control_fd in readable:
                word = os.read(control_fd, 1)
                if word in (ACTIVATE, QUIT):
                    return "activated" if word == ACTIVATE else "released"
                # The receiver is gone (or said something it never says): no failover.
                return destroy_standby(xl_pid, name)
            if (pidfd is not None and pidfd in readable) or (pidfd is None and not _alive(xl_pid)):
                return "xl ended"
    finally:
        os.close(stream_fd)  # after any kill: xl must never read the end of the stream from us
        if pidfd is not None:
            os.close(pidfd)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 4:
        print("usage: python3 -m remus.xen.standby_guard CONTROL_FD STREAM_FD XL_PID NAME", file=sys.stderr)
        return 2
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    outcome = guard(int(args[0]), int(args[1]), int(args[2]), args[3])
    if outcome not in ("activated", "released", "xl ended"):
        print(f"remus standby guard: the receiver is gone; {outcome}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    status = main()
    sys.stderr.flush()
    # At a failover xl is completing the domain right now: no interpreter teardown to compete
    # with it for dom0's CPU (everything the guard held is closed already).
    os._exit(status)

"""Running a fence command: the one way either side makes sure the other cannot run the guest.

``run_fence`` runs an admin's command (a fence agent such as
``fence_ipmilan`` or ``fence_xvm``, or any script) through ``sh -c`` with
the environment it is given added to this process's, in a session of its
own, with a deadline: when the deadline passes, the whole process group is
killed and the fence counts as failed.  Its output (stdout and stderr
together) is captured and the last lines kept for the log.  Only an exit
status of 0 means "fenced".

Used by the primary (``remus --fence``: before it releases output and lets
the domain run on after losing its backup) and by the backup
(``remus-receiver --fence``: before it activates the domain).  This module
decides nothing and prints nothing: the caller acts on the ``FenceResult``.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import Mapping

log = logging.getLogger(__name__)

#: Default deadline of a fence command (``--fence-timeout``), milliseconds.
DEFAULT_FENCE_TIMEOUT_MS = 30_000
#: How much of the command's output is kept (its tail), bytes.
OUTPUT_TAIL_BYTES = 2000


@dataclass(frozen=True)
class FenceResult:
    """How a fence command ended.

    ``ok``: it exited 0 in time.  ``status``: its exit status, or the negative
    signal number that killed it, or None when it did not finish in time or
    could not be started.  ``output_tail``: the end of what it printed (or why
    it could not run).  ``seconds``: how long it took.
    """

    ok: bool
    status: int | None
    output_tail: str
    seconds: float

    def describe(self) -> str:
        """One line: what the fence command did, with the last line it printed."""
        if self.ok:
            what = f"exited 0 after {self.seconds:.1f} s"
        elif self.status is None:
            what = f"did not finish ({self.seconds:.1f} s)"
        elif self.status < 0:
            what = f"was killed by signal {-self.status}"
        else:
            what = f"exited {self.status} after {self.seconds:.1f} s"
        last = self.output_tail.strip().splitlines()[-1:] if self.output_tail.strip() else []
        return f"fence command {what}" + (f": {last[0]}" if last else "")


def run_fence(cmd: str, env: Mapping[str, str], timeout_s: float) -> FenceResult:
    """Run ``sh -c cmd`` with ``env`` added to the environment; wait at most ``timeout_s``.

    Never raises for a command that fails, hangs or cannot be started: that is
    a ``FenceResult`` with ``ok`` False.  The command's output goes to the log
    (``logging``, this module's logger) as well.
    """
    started = time.monotonic()
    try:
        proc = subprocess.Popen(["/bin/sh", "-c", cmd], env={**os.environ, **env}, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    except OSError as exc:
        return FenceResult(False, None, f"cannot run /bin/sh: {exc.strerror or exc}", time.monotonic() - started)
    try:
        output, _ = proc.communicate(timeout=timeout_s)
        status: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        output, _ = proc.communicate()
        status = None
    seconds = time.monotonic() - started
    tail = output[-OUTPUT_TAIL_BYTES:].decode("utf-8", "replace")
    for line in tail.splitlines():
        log.info("fence: %s", line)
    if status is None:
        tail += f"\n(no answer within {timeout_s:.1f} s: killed)"
    return FenceResult(status == 0, status, tail, seconds)


def _kill_group(proc: "subprocess.Popen[bytes]") -> None:
    """SIGKILL the command and everything it started (its own session)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()

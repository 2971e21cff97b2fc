"""Activating a Xen domain on the backup: ``xl restore`` of the last committed checkpoint.

``restore_domain(info, image)`` recreates the domain a session protected: it
checks the image and the configuration the primary sent, checks that no
domain on this host has the domain's name, then streams the xl save file that
``remus.xen.savefile`` builds into ``xl restore /dev/stdin`` through a pipe
(the receiver holds the guest's memory already; a pipe needs no second copy
on disk) and waits, with a deadline that grows with the guest's memory, for xl
to restore and unpause it.  As after ``xl create``, xl leaves a daemon that
watches the domain and applies its configuration's on_poweroff / on_reboot /
on_crash: the domain runs on its own and outlives the receiver.  It returns
the new domain id and how long the restore took.

Why xl and not libxl through the cffi binding: ``xl restore`` is the
toolstack's own restore path, with everything libxl needs around it (an event
loop, hotplug scripts run as child processes, the console, the monitoring
daemon); driving that from Python would redo xl.

Failures raise ``ActivationError`` with xl's own words and what is left: xl
destroys a domain it failed to restore; when xl has to be killed (deadline,
or a second Ctrl-C) the half-restored domain is destroyed here, and if even
that fails the message names it.  A SIGINT or SIGTERM that only asks the
receiver to stop does not interrupt a restore under way.  Nothing here prints.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import subprocess
import tempfile
import threading
import time
from typing import IO, Any, Iterable, Mapping, Optional, Sequence

from remus.errors import ActivationError, XlError
from remus.backup.image import Image
from remus.stream.records import PAGE_SIZE
from remus.xen import xl
from remus.xen.savefile import DomainConfig, save_file

log = logging.getLogger(__name__)

#: Deadline of ``xl restore``: a base, and more per GiB of guest memory (generous: the lab's
#: emulated dom0 needs minutes per GiB, and a deadline that kills a working restore loses the guest).
RESTORE_TIMEOUT_S = 300.0
RESTORE_TIMEOUT_S_PER_GIB = 240.0
#: Pipe buffer asked for (Linux F_SETPIPE_SZ; beyond /proc/sys/fs/pipe-max-size only for root):
#: room for a whole PAGE_DATA record, so fewer wake-ups of the feeding and the reading side.
PIPE_BYTES = (4 << 20, 1 << 20)
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


def enlarge_pipe(fd: int, sizes: Sequence[int] = PIPE_BYTES) -> None:
    """Give the pipe ``fd`` the first buffer size in ``sizes`` the kernel grants; keep its own
    otherwise (a smaller pipe only means more wake-ups).  Never raises."""
    for size in sizes:
        try:
            fcntl.fcntl(fd, _F_SETPIPE_SZ, size)
            return
        except OSError:
            continue


#: Pieces per writev (the kernel's UIO_MAXIOV).
_IOV_MAX = 1024
#: How long the feeding thread may take to notice that xl is gone.
_FEEDER_JOIN_S = 30.0


def restore_domain(info: Mapping[str, Any], image: Image, *,
                   timeout_s: Optional[float] = None) -> dict[str, Any]:
    """Restore the domain of a session from ``image`` with ``xl restore``; it runs when this returns.

    Returns ``domid`` (the new domain's id), ``name`` and ``restore_s``.

    Raises:
        ActivationError: the image or the configuration cannot be restored, the
            name is taken on this host, or xl failed (the message says what is left).
        XlError: xl is missing or could not tell whether the name is taken.
    """
    config = DomainConfig.parse(info.get("libxl_config"))
    chunks = save_file(image, config)  # checks the image now, builds it as xl reads
    name = config.name
    existing = xl.domid(name)
    if existing is not None:
        raise ActivationError(
            f"a domain named {name} already exists on this host (id {existing}): the backup cannot "
            f"take its name while it does (on a single host, destroy the primary's domain first)"
        )
    if timeout_s is None:
        timeout_s = RESTORE_TIMEOUT_S + RESTORE_TIMEOUT_S_PER_GIB * len(image.pages) * PAGE_SIZE / (1 << 30)
    started = time.monotonic()
    _run_xl_restore(name, chunks, timeout_s)
    domid = xl.domid(name)
    if domid is None:
        raise ActivationError(f"xl restore of {name} succeeded, but no domain {name} exists afterwards")
    return {"domid": domid, "name": name, "restore_s": round(time.monotonic() - started, 2)}


def _run_xl_restore(name: str, chunks: Iterable[bytes], timeout_s: float) -> None:
    command = [xl.xl_path(), "restore", "/dev/stdin"]
    with tempfile.TemporaryFile() as messages:
        try:
            # Its own session: a Ctrl-C meant for the receiver must not kill xl mid-restore.
            proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=messages, stderr=messages,
                                    start_new_session=True)
        except OSError as exc:
            raise ActivationError(f"cannot run xl restore: {exc.strerror or exc}") from None
        assert proc.stdin is not None
        enlarge_pipe(proc.stdin.fileno())
        feeder = _Feeder(proc.stdin, chunks)
        feeder.start()
        try:
            status: Optional[int] = proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            status = None
            _kill(proc)
        except BaseException:  # a second Ctrl-C: leave nothing half-restored behind
            _kill(proc)
            log.error("xl restore of %s interrupted; %s", name, _clean_up(name))
            raise
        feeder.join(_FEEDER_JOIN_S)
        if feeder.is_alive():
            log.error("the thread feeding xl restore did not end within %.0f s", _FEEDER_JOIN_S)
        messages.seek(0)
        said = messages.read().decode("utf-8", "replace")
    log.debug("xl restore of %s said:\n%s", name, said)
    if status == 0:
        return
    if status is None:
        what = f"did not finish within {timeout_s:.0f} s"
    else:
        what = f"failed (exit status {status}): {xl.summary(said)}"
    if feeder.error:
        what += f" ({feeder.error})"
    raise ActivationError(f"xl restore of {name} {what}; {_clean_up(name)}")


class _Feeder(threading.Thread):
    """Writes the save file into xl's stdin, a batch of pieces per ``writev``, then closes it."""

    def __init__(self, pipe: IO[bytes], chunks: Iterable[bytes]) -> None:
        super().__init__(name="xl restore feeder", daemon=True)
        self._pipe = pipe
        self._chunks = chunks
        self.error: Optional[str] = None

    def run(self) -> None:
        fd = self._pipe.fileno()
        try:
            batch: list[bytes] = []
            for piece in self._chunks:
                batch.append(piece)
                if len(batch) == _IOV_MAX:
                    write_all(fd, batch)
                    batch = []
            write_all(fd, batch)
        except BrokenPipeError:
            self.error = "xl stopped reading the save file"
        except OSError as exc:
            self.error = f"writing the save file to xl failed: {exc.strerror or exc}"
        finally:
            try:
                self._pipe.close()
            except OSError:
                pass


def write_all(fd: int, pieces: Sequence[bytes]) -> None:
    """Write ``pieces`` (at most IOV_MAX of them) to ``fd`` with as few ``writev`` calls as it takes.

    Raises:
        OSError: a write failed (BrokenPipeError: the reader is gone).
    """
    views = [memoryview(piece) for piece in pieces if piece]
    first = 0
    while first < len(views):
        written = os.writev(fd, views[first:])
        while written:
            size = len(views[first])
            if written < size:
                views[first] = views[first][written:]
                break
            written -= size
            first += 1


def _kill(proc: "subprocess.Popen[bytes]") -> None:
    """SIGKILL xl and whatever it started in its session (libxl's save helper, hotplug scripts)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _clean_up(name: str) -> str:
    """Destroy the domain a failed restore left, if any; say what is left.

    The name was free when the restore began, so a domain that has it now is
    the half-restored one.
    """
    try:
        domid = xl.domid(name)
    except XlError as exc:
        return f"could not check for a half-restored domain {name}: {exc}"
    if domid is None:
        return "no domain was left behind"
    try:
        xl.destroy(str(domid))
    except XlError as exc:
        return f"the half-restored domain {name} (id {domid}) is LEFT BEHIND: {exc}"
    return f"the half-restored domain {name} (id {domid}) was destroyed"

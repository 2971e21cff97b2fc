"""A hot standby of a protected Xen domain: ``xl migrate-receive -r`` fed checkpoint by checkpoint.

``XenStandby.start(info)`` runs when a Xen session opens.  It starts Xen's own
receiving side of ``xl remus``, ``xl migrate-receive -r``, in its own session
with pipes for its stdin and stdout, and a guard process
(``remus.xen.standby_guard``) holding a second write end of xl's stdin.  xl
creates the domain paused as ``NAME--incoming``; from then on it keeps it one
committed checkpoint behind the primary.

Theory of operation.  ``committed(image, seq, changed_pfns)`` is called by the
receiver after checkpoint ``seq`` was committed and acknowledged.  It never
blocks on xl: it records the checkpoint in the *pending* slot (the PFNs it
changed and its state records) and wakes the feeder thread.  If the slot still
holds a checkpoint xl has not been given yet, the two merge: the union of
their PFNs, the newer state records.  So at most two checkpoints are in
flight (one being written, one pending) and xl catching up sees fewer,
bigger ones.  Page contents are never copied here: the feeder reads each
page from the image as it writes it (under the image's lock, one page at a
time), so the receiver holds the guest once, not twice.  A page read that
way may already hold a later checkpoint's contents; that later checkpoint
lists the page again, and xl is given the end of the stream only after
everything committed was written, so the checkpoint the standby completes
from is exactly the last committed one.
The feeder waits for xl's banner, writes xl's header and libxl's stream header
once, then per taken checkpoint libxc's records (``remus.xen.savefile``): the
first one with the libxc headers, the static records and every page; later
ones with the changed pages, TSC/shared-info/vCPU records; each one closed by
CHECKPOINT and libxl's CHECKPOINT_END in a single 16-byte write.  libxc keeps
what follows a CHECKPOINT aside until the next one arrives, so the standby
domain only ever holds complete checkpoints.

Until xl has read the whole first checkpoint (all of the guest's memory:
under emulation xl can take minutes to populate the domain) ``warming()`` is
true, and the receiver holds its ACKs: the primary, hearing heartbeats,
waits, and becomes protected only once a failover would be quick.  Later
checkpoints are small and are never held.

``activate()`` (failover) lets the feeder finish everything committed and
writes libxc's END record after it (``LIBXC_END``); when xl already has every
committed checkpoint and the feeder is idle, it writes END itself at once,
without waking the feeder first (a thread hand-off is tens of milliseconds in
a busy dom0, all of it added to the failover).  xl completes the domain
from the last complete checkpoint at once, without waiting for the guard to
let go of its end of the pipe (it is told to next, and xl's stdin is closed).
xl attaches its devices, renames it ``NAME``, leaves its monitoring daemon (no
``-e``: on_poweroff/on_reboot/on_crash apply as after ``xl create``) and
unpauses it.  ``discard()`` (orderly end, refused or broken session) kills
xl's process group and destroys ``NAME--incoming``; it starts nothing.  A
standby that broke on the way (xl died, refused the stream) says so in
``broken``; the receiver then uses the cold path
(``remus.xen.restore``).  Nothing here prints.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import select
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
from dataclasses import dataclass, field
from typing import IO, AbstractSet, Any, Iterable, Iterator, Mapping, Optional, Sequence

from remus.errors import ActivationError
from remus.backup.image import Image, PageStore
from remus.stream.records import PAGE_SIZE, DomainHeader, Record
from remus.xen import xl
from remus.xen.restore import PIPE_BYTES, enlarge_pipe, write_all
from remus.xen.savefile import (
    CHECKPOINT_TAIL,
    LIBXC_END,
    DomainConfig,
    check_restorable,
    checkpoint_pieces,
    checkpointed_opening,
)
from remus.xen.standby_guard import ACTIVATE, QUIT, destroy_standby

log = logging.getLogger(__name__)

#: tools/xl/xl_migrate.c (Xen 4.17): what ``xl migrate-receive`` writes to stdout when ready.
MIGRATE_RECEIVER_BANNER = b"xl migration receiver ready, send binary domain data.\n"
#: What xl calls the domain until failover (tools/xl/xl_vmcontrol.c ``create_domain``).
INCOMING_SUFFIX = "--incoming"
#: How long xl may take to start and say it is ready (an emulated dom0 is slow).
BANNER_TIMEOUT_S = 120.0
#: How long the feeder may take to hand xl what was committed when a failover begins, and xl to
#: complete, attach devices and unpause: a base, and more per GiB of guest memory.
ACTIVATE_TIMEOUT_S = 120.0
ACTIVATE_TIMEOUT_S_PER_GIB = 120.0
#: What xl migrate-receive says once the stream ended and the domain is complete (xl_migrate.c).
_FAILOVER_SAID = re.compile(r"migration target: Remus Failover for domain (\d+)")
_IOV_MAX = 1024
#: How often the feeder looks whether xl has read the first checkpoint.
_READ_POLL_S = 0.02
_JOIN_S = 30.0


@dataclass
class _Pending:
    """Checkpoints committed but not yet handed to xl, merged into one."""

    seq: int
    #: The PFNs to write; None: every page the image holds (the first checkpoint).
    pfns: Optional[set[int]]
    state: list[Record]
    #: The first checkpoint of the stream: libxc's headers and static records go with it.
    header: Optional[DomainHeader] = None
    static: list[Record] = field(default_factory=list)
    merged: int = 1


class _LockedPages(Mapping[int, tuple[int, Optional[bytes]]]):
    """The image's pages as the feeder reads them: one page at a time, copied under the image's
    lock (a commit never changes a page while it is read); never a copy of the whole image."""

    def __init__(self, image: Image) -> None:
        self._image = image

    def __getitem__(self, pfn: int) -> tuple[int, Optional[bytes]]:
        with self._image.lock:
            return self._image.pages[pfn]

    def __iter__(self) -> Iterator[int]:
        """The image's PFNs in ascending order; a ``PageStore`` lists them as it goes (no list of
        every PFN is made), other mappings are listed under the lock."""
        pages = self._image.pages
        if isinstance(pages, PageStore):
            return iter(pages)
        with self._image.lock:
            return iter(sorted(pages))

    def __len__(self) -> int:
        return len(self._image.pages)


class XenStandby:
    """A paused standby domain kept in step by ``xl migrate-receive -r`` (see the module docstring)."""

    def __init__(self, name: str, config: DomainConfig, proc: "subprocess.Popen[bytes]",
                 guard: "subprocess.Popen[bytes]", control_fd: int, messages: IO[bytes]) -> None:
        self.name = name
        self.incoming = name + INCOMING_SUFFIX
        self._config = config
        self._proc = proc
        self._guard = guard
        self._control_fd: Optional[int] = control_fd
        self._messages = messages
        self._lock = threading.Condition()
        self._pending: Optional[_Pending] = None
        self._image: Optional[Image] = None  # the receiver's image, read by the feeder
        self._carry: set[int] = set()  # pages of committed checkpoints the image is already past
        self._started_stream = False  # the first checkpoint was taken by the feeder
        self._writing = False  # the feeder is writing a taken checkpoint to xl
        self._finishing = False  # activate(): write what is pending, then stop
        self._abandon = False  # discard(): stop at once
        self._done = False
        self._warm = False  # xl has read the whole first checkpoint
        self._first_at: Optional[float] = None  # when the first checkpoint was committed (monotonic)
        self._warm_limit_s = ACTIVATE_TIMEOUT_S
        #: Why the standby cannot be activated (None while it can).
        self.broken: Optional[str] = None
        self.written_seq = 0
        self.checkpoints_written = 0
        self.checkpoints_merged = 0
        self.bytes_written = 0
        self._feeder = threading.Thread(target=self._feed, name=f"standby feeder {name}", daemon=True)
        self._feeder.start()

    # -- creation ---------------------------------------------------------------------------
    @classmethod
    def start(cls, info: Mapping[str, Any], *, pipe_bytes: Sequence[int] = PIPE_BYTES) -> "XenStandby":
        """Start ``xl migrate-receive -r`` and the guard for the domain a session protects.

        Raises:
            ActivationError: the configuration is unusable, or a domain already has
                the standby's name on this host, or xl could not be started.
            XlError: xl is missing or could not tell whether the name is taken.
        """
        config = DomainConfig.parse(info.get("libxl_config"))
        name = config.name
        incoming = name + INCOMING_SUFFIX
        existing = xl.domid(incoming)
        if existing is not None:
            raise ActivationError(f"a domain named {incoming} already exists on this host (id {existing}): "
                                  f"a standby of {name} is already kept here; destroy it with "
                                  f"`xl destroy {incoming}` if no receiver owns it")
        messages = tempfile.TemporaryFile()
        try:
            # Its own session: a Ctrl-C meant for the receiver must reach neither xl nor its helper.
            proc = subprocess.Popen([xl.xl_path(), "migrate-receive", "-r"], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=messages, start_new_session=True)
        except OSError as exc:
            messages.close()
            raise ActivationError(f"cannot run xl migrate-receive: {exc.strerror or exc}") from None
        assert proc.stdin is not None
        enlarge_pipe(proc.stdin.fileno(), pipe_bytes)
        control_r, control_w = os.pipe2(os.O_CLOEXEC)
        try:
            guard = subprocess.Popen(
                [sys.executable, "-m", "remus.xen.standby_guard", str(control_r), str(proc.stdin.fileno()),
                 str(proc.pid), incoming],
                pass_fds=(control_r, proc.stdin.fileno()), stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as exc:
            os.close(control_w)
            said = destroy_standby(proc.pid, incoming)
            proc.wait()
            messages.close()
            raise ActivationError(f"cannot start the standby's guard: {exc.strerror or exc}; {said}") from None
        finally:
            os.close(control_r)
        log.info("standby of %s: xl migrate-receive -r (pid %d), guard pid %d", name, proc.pid, guard.pid)
        return cls(name, config, proc, guard, control_w, messages)

    # -- the Standby protocol ---------------------------------------------------------------
    def committed(self, image: Image, seq: int, changed_pfns: AbstractSet[int]) -> None:
        """Checkpoint ``seq`` (now ``image``) is committed and acknowledged; hand it to xl.

        Never blocks on xl: merges with a checkpoint xl has not been given yet.
        When one batch of the primary's bytes committed several checkpoints, the
        image is already at the last one while the earlier ones are reported:
        their pages are kept aside and go with the checkpoint the image is at.
        """
        with self._lock:
            if self._done or self.broken or self._finishing:  # nothing may follow END
                return
            self._carry |= changed_pfns
            if image.seq != seq:  # a later checkpoint of the same batch follows: it carries these pages
                self.checkpoints_merged += 1
                return
            changed_pfns, self._carry = self._carry, set()
            pending = self._pending
            if pending is None and not self._started_stream:
                try:
                    header = check_restorable(image)
                except ActivationError as exc:
                    self._break(f"checkpoint {seq} cannot start a standby: {exc}")
                    return
                self._image = image
                self._first_at = time.monotonic()
                self._warm_limit_s = ACTIVATE_TIMEOUT_S + ACTIVATE_TIMEOUT_S_PER_GIB * len(image.pages) * PAGE_SIZE / (1 << 30)
                pending = _Pending(seq, None, image.state_records(), header,
                                   image.static_records(), merged=0)
            elif pending is None:
                pending = _Pending(seq, set(), [], merged=0)
            else:
                self.checkpoints_merged += 1
            if pending.pfns is not None:
                pending.pfns |= changed_pfns
            pending.state = image.state_records()
            pending.seq = seq
            pending.merged += 1
            self._pending = pending
            self._lock.notify_all()

    def activate(self) -> dict[str, Any]:
        """Fail over: xl completes the domain from the last committed checkpoint and runs it.

        Returns ``domid``, ``name``, ``restore_s`` (from this call to the domain
        running), ``standby`` True, ``standby_seq`` (the checkpoint xl was given last),
        and where the time went: ``backlog_pages`` (pages still to write when the call
        began), ``drain_s`` (writing them), ``end_of_stream_s`` (from the call until
        libxc's END was written, after which xl completes the domain) and ``xl_s`` (from
        there to xl's exit: the domain completed, its devices attached, renamed and
        unpaused).

        Raises:
            ActivationError: the standby is broken, xl could not be given every
                committed checkpoint in time, or xl failed; the standby is then
                destroyed (the message says what is left) and the image can still
                be restored the cold way.
        """
        started = time.monotonic()
        ended = self._proc.poll()
        if ended is not None and not self.broken:
            self._break(f"xl migrate-receive ended (exit status {ended}): {xl.summary(self._said())}")
        if self.broken:
            reason = self.broken
            said = self._destroy()
            raise ActivationError(f"the standby of {self.name} is broken ({reason}); {said}")
        with self._lock:
            self._finishing = True  # committed() takes nothing more; the feeder stops when done
            pending = self._pending
            backlog = (0 if pending is None else len(pending.pfns) if pending.pfns is not None
                       else len(self._image.pages) if self._image is not None else 0)
            # xl has every committed checkpoint and the feeder is idle (it can write nothing
            # more): END now, from here, rather than after waking the feeder and joining it.
            at_once = pending is None and not self._writing and self.checkpoints_written > 0
            if at_once:
                self._end_stream()  # xl completes the domain from here on
            self._lock.notify_all()
        if at_once:
            drained = ended_stream = time.monotonic()
            self._feeder.join(_JOIN_S)  # it only has to see _finishing and return
        else:
            timeout_s = ACTIVATE_TIMEOUT_S + ACTIVATE_TIMEOUT_S_PER_GIB * backlog * PAGE_SIZE / (1 << 30)
            self._feeder.join(timeout_s)
            drained = time.monotonic()
            if self._feeder.is_alive() or self.broken or self._pending is not None:
                why = self.broken or f"xl did not take the last checkpoints within {timeout_s:.0f} s"
                said = self._destroy()
                raise ActivationError(f"the standby of {self.name} could not be activated ({why}); {said}")
            self._end_stream()  # xl completes the domain from here on
            ended_stream = time.monotonic()
        self._tell_guard(ACTIVATE)
        self._close_stream()
        try:
            status: Optional[int] = self._proc.wait(ACTIVATE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            status = None
        xl_done = time.monotonic()
        self._reap_guard()
        said_by_xl = self._said()
        log.debug("xl migrate-receive of %s said:\n%s", self.name, said_by_xl)
        if status != 0:
            what = (f"did not finish within {ACTIVATE_TIMEOUT_S:.0f} s" if status is None
                    else f"failed (exit status {status}): {xl.summary(said_by_xl)}")
            said = self._destroy()
            raise ActivationError(f"xl migrate-receive of {self.name} {what}; {said}")
        # xl names the domain it fails over (tools/xl/xl_migrate.c); ask xl only if it did not.
        said_domid = _FAILOVER_SAID.search(said_by_xl)
        domid = int(said_domid.group(1)) if said_domid and "Failed to rename" not in said_by_xl else xl.domid(self.name)
        if domid is None:  # xl only logs a failed rename; the domain runs as NAME--incoming
            domid = xl.domid(self.incoming)
            if domid is None:
                raise ActivationError(f"xl migrate-receive of {self.name} succeeded, but no domain "
                                      f"{self.name} exists afterwards")
        with self._lock:
            self._done = True
        # Where the time went: writing the backlog, then the end of the stream (the guard lets
        # go), then xl completing, attaching devices, renaming and unpausing.
        return {"domid": domid, "name": self.name, "restore_s": round(time.monotonic() - started, 2),
                "standby": True, "standby_seq": self.written_seq, "backlog_pages": backlog,
                "drain_s": round(drained - started, 3), "end_of_stream_s": round(ended_stream - started, 3),
                "xl_s": round(xl_done - ended_stream, 3)}

    def discard(self) -> None:
        """Destroy the standby (kill xl's process group, ``xl destroy NAME--incoming``); start nothing.

        Never raises; what is left (if anything) is logged.
        """
        with self._lock:
            if self._done:
                return
        said = self._destroy()
        log.info("standby of %s discarded: %s", self.name, said)

    def warming(self) -> bool:
        """True from the first committed checkpoint until xl has read all of it.

        Until then a failover would wait for xl to take in the whole guest, so the
        receiver holds its ACKs (the primary, hearing heartbeats, waits).  A standby
        still cold after ``ACTIVATE_TIMEOUT_S`` plus as much per GiB breaks (a failover
        would then restore the cold way) and stops holding anything.
        """
        with self._lock:
            if self._warm or self._first_at is None or self._done or self.broken:
                return False
            waited = time.monotonic() - self._first_at
        if waited > self._warm_limit_s:
            self._break(f"xl did not take in the first checkpoint within {self._warm_limit_s:.0f} s")
            return False
        return True

    def statistics(self) -> dict[str, Any]:
        """Checkpoints handed to xl, merged on the way, bytes written; whether it broke."""
        return {"written_seq": self.written_seq, "checkpoints_written": self.checkpoints_written,
                "checkpoints_merged": self.checkpoints_merged, "bytes_written": self.bytes_written,
                "broken": self.broken}

    # -- the feeder thread ------------------------------------------------------------------
    def _feed(self) -> None:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        fd = self._proc.stdin.fileno()
        try:
            self._wait_for_banner(self._proc.stdout.fileno())
            self._write(fd, [checkpointed_opening(self._config)])
            while True:
                with self._lock:
                    while self._pending is None and not (self._finishing or self._abandon):
                        self._lock.wait()
                    if self._abandon or self._pending is None:
                        return
                    taken, self._pending = self._pending, None
                    self._started_stream = True
                    self._writing = True
                assert self._image is not None
                pages = _LockedPages(self._image)
                pfns: Iterable[int] = iter(pages) if taken.pfns is None else sorted(taken.pfns)
                self._write(fd, checkpoint_pieces(pages, pfns, taken.state, taken.static, taken.header))
                if not self._warm:
                    self._wait_until_read(fd)
                with self._lock:
                    self.written_seq = taken.seq
                    self.checkpoints_written += 1
                    self._warm = True
                    self._writing = False
        except BrokenPipeError:
            self._break(f"xl stopped reading the stream: {xl.summary(self._said())}")
        except ActivationError as exc:
            self._break(str(exc))
        except OSError as exc:
            self._break(f"writing to xl failed: {exc.strerror or exc}")

    def _wait_until_read(self, fd: int) -> None:
        """Return once xl has read everything written to its stdin (or the standby is being
        discarded, or xl is gone).  The pipe's byte count, polled: xl says nothing back."""
        while True:
            with self._lock:
                if self._abandon or self.broken:
                    return
            if self._proc.poll() is not None:
                return
            try:
                unread = struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
            except OSError:
                return
            if unread == 0:
                return
            time.sleep(_READ_POLL_S)

    def _wait_for_banner(self, out: int) -> None:
        deadline = time.monotonic() + BANNER_TIMEOUT_S
        said = b""
        while not said.endswith(b"\n"):
            left = deadline - time.monotonic()
            readable, _, _ = select.select([out], [], [], max(0.0, min(left, 0.5)))
            with self._lock:
                if self._abandon:
                    raise ActivationError("discarded before xl was ready")
            if not readable:
                if left <= 0:
                    raise ActivationError(f"xl migrate-receive did not say it was ready within "
                                          f"{BANNER_TIMEOUT_S:.0f} s")
                continue
            chunk = os.read(out, 256)
            if not chunk:
                raise ActivationError(f"xl migrate-receive ended before it was ready: {xl.summary(self._said())}")
            said += chunk
        if said != MIGRATE_RECEIVER_BANNER:
            raise ActivationError(f"xl migrate-receive said {said!r}, not its banner")

    def _write(self, fd: int, pieces: Iterable[bytes]) -> None:
        """Write ``pieces`` by ``writev``; the checkpoint's tail alone, in one write."""
        batch: list[bytes] = []
        for piece in pieces:
            if piece is CHECKPOINT_TAIL:
                write_all(fd, batch)
                batch = []
                if os.write(fd, piece) != len(piece):  # <= PIPE_BUF: never split by a pipe
                    raise OSError("a short write of CHECKPOINT + CHECKPOINT_END")
            else:
                batch.append(piece)
                if len(batch) == _IOV_MAX:
                    write_all(fd, batch)
                    batch = []
            self.bytes_written += len(piece)
        write_all(fd, batch)

    # -- helpers ----------------------------------------------------------------------------
    def _break(self, reason: str) -> None:
        with self._lock:
            if self.broken is None and not self._abandon:
                self.broken = reason
                log.warning("the standby of %s broke: %s (a failover would restore the cold way)",
                            self.name, reason)
            self._lock.notify_all()

    def _said(self) -> str:
        self._messages.flush()
        try:
            return os.pread(self._messages.fileno(), 1 << 20, 0).decode("utf-8", "replace")
        except OSError:
            return ""

    def _end_stream(self) -> None:
        """Write libxc's END after the last checkpoint xl was given: xl fails over at once.

        Only after a whole checkpoint (an END before the first one would complete a
        half-restored domain); without one, xl is left to the end of the stream, where it
        fails.  A failed write is left to xl's exit status to explain.
        """
        if self.checkpoints_written == 0:
            return
        assert self._proc.stdin is not None
        try:
            os.write(self._proc.stdin.fileno(), LIBXC_END)  # 8 octets: never split by the pipe
        except OSError:
            pass

    def _tell_guard(self, word: bytes) -> None:
        fd, self._control_fd = self._control_fd, None
        if fd is None:
            return
        try:
            os.write(fd, word)
        except OSError:
            pass  # the guard is gone already
        finally:
            os.close(fd)

    def _reap_guard(self) -> None:
        try:
            self._guard.wait(_JOIN_S)
        except subprocess.TimeoutExpired:
            log.error("the standby guard of %s (pid %d) did not exit", self.name, self._guard.pid)

    def _close_stream(self) -> None:
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.close()
        except OSError:
            pass

    def _destroy(self) -> str:
        """Kill xl, release the guard, destroy NAME--incoming; what is left, as a sentence."""
        with self._lock:
            self._abandon = True
            self._done = True
            self._pending = None
            self._lock.notify_all()
        said = destroy_standby(self._proc.pid, self.incoming)  # kills xl before anything closes
        self._proc.wait()
        self._tell_guard(QUIT)
        self._reap_guard()
        self._close_stream()
        if self._proc.stdout is not None:
            self._proc.stdout.close()
        self._feeder.join(_JOIN_S)
        self._messages.close()
        return said

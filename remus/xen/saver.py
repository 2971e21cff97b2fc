"""Meeting libxc's checkpointed save halfway: its loop and callbacks, the engine's steps.

``xc_domain_save(..., XC_STREAM_REMUS)`` owns a loop of its own and calls back
into the caller at fixed points; the engine (``remus.engine``) owns a loop too.
``CheckpointSaver`` runs the save in a background thread and makes the two
loops meet.  It never touches the guest itself: ``remus.xen.domain`` suspends
and resumes it between the calls below.

Theory of operation.  libxc's thread, once per checkpoint (the first one
begins with libxc's live precopy rounds)::

    suspend()      waits here until the engine suspended the guest   -> 1
    ...            libxc writes the dirty pages, the vCPU and shared-info
                   records and a CHECKPOINT record into the stream
    postcopy()     waits here until the engine resumed the guest     -> 1
    checkpoint()   waits here for the engine's next suspend (-> 1) or
                   for the end (-> 0)

The engine's thread, through ``XenDomain``::

    wait_for_suspend_request()   answers a pending checkpoint() with 1 (or
                                 starts the save), then waits for suspend()
    (suspend the guest); answer_suspend(True)
    wait_for_checkpoint()        waits for postcopy() AND for the reader to
                                 have parsed that epoch's CHECKPOINT record;
                                 returns the epoch's records
    (resume the guest); answer_postcopy(True)

A third thread reads the other end of the socketpair libxc writes into and
decodes the stream (``StreamDecoder(libxc=True)``), cutting it into epochs at
each CHECKPOINT record.

Failure and stop: every wait on the engine's side has a deadline and raises
``DomainError`` when libxc's thread died, the save returned, the stream was
malformed or the deadline passed - never hangs.  ``stop()`` makes every
pending and future callback answer 0 (the precopy policy answers ABORT), shuts
the stream socket so a libxc blocked in ``write`` fails, and joins both
threads.  libxc's own waits are bounded too (``answer_timeout_s``), except
``checkpoint()``, which waits for the engine's pacing (up to an interval) or
``stop()``.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from typing import Callable, Iterator, Optional

from remus.domain import Capture
from remus.errors import DomainError, RemusError
from remus.stream.codec import DEFAULT_MAX_RECORD_BYTES, EndOfStream, StreamDecoder, padded_length
from remus.stream.records import Checkpoint, DomainHeader, PageData, Record

log = logging.getLogger(__name__)

# XGS_POLICY_* (tools/include/xenguest.h, Xen 4.17): what the precopy policy answers.
XGS_POLICY_ABORT = -1
XGS_POLICY_CONTINUE_PRECOPY = 0
XGS_POLICY_STOP_AND_COPY = 1
# libxc's own default policy (xg_sr_save.c, simple_precopy_policy): stop after this many rounds,
# or once fewer pages than this are dirty.
SPP_MAX_ITERATIONS = 5
SPP_TARGET_DIRTY_COUNT = 50

#: ``run_save(fd, callbacks)`` runs the save into ``fd`` calling ``callbacks``' ``on_*``
#: methods and returns when it ends; it raises ``XenError`` when the save failed.
SaveFunction = Callable[[int, "CheckpointSaver"], None]

_SOCKET_BUFFER_BYTES = 8 << 20
_RHDR = struct.Struct("<II")
_SUSPEND = "suspend"
_POSTCOPY = "postcopy"
_CHECKPOINT = "checkpoint"


class CheckpointSaver:
    """One checkpointed save of one domain (see the module docstring)."""

    def __init__(
        self,
        run_save: SaveFunction,
        name: str,
        *,
        precopy_timeout_s: float = 300.0,
        step_timeout_s: float = 30.0,
        answer_timeout_s: float = 60.0,
        join_timeout_s: float = 30.0,
    ) -> None:
        self._run_save = run_save
        self.name = name
        self.precopy_timeout_s = precopy_timeout_s
        self.step_timeout_s = step_timeout_s
        self.answer_timeout_s = answer_timeout_s
        self.join_timeout_s = join_timeout_s
        self._cond = threading.Condition()
        self._waiting: Optional[str] = None  # the callback libxc waits in
        self._answers: dict[str, int] = {}  # by callback: what it returns when it gets there
        self._stopping = False
        self._started = False
        self._save_done = False
        self._save_error: Optional[BaseException] = None
        self._reader_done = False
        self._reader_error: Optional[BaseException] = None
        self._epochs: list[Capture] = []
        self._epoch: list[Record] = []
        self._epoch_pages = 0
        self._threads: list[threading.Thread] = []
        self._ours: Optional[socket.socket] = None
        self._theirs: Optional[socket.socket] = None

    # -- engine side ---------------------------------------------------------------------
    @property
    def started(self) -> bool:
        return self._started

    def wait_for_suspend_request(self) -> None:
        """Let libxc go on to its next suspend (starting the save the first time) and wait for it.

        Raises:
            DomainError: the save ended or failed, or libxc did not ask in time.
        """
        with self._cond:
            if not self._started:
                self._start()
                timeout_s = self.precopy_timeout_s
            else:
                # libxc waits in checkpoint(), or is on its way there from postcopy().
                self._answers[_CHECKPOINT] = 1
                self._cond.notify_all()
                timeout_s = self.step_timeout_s
            self._wait_locked(lambda: self._waiting == _SUSPEND, timeout_s, "ask for a suspend")

    def answer_suspend(self, ok: bool) -> None:
        """The guest is suspended (``ok``), or could not be: let libxc's ``suspend`` return."""
        with self._cond:
            self._answer_locked(_SUSPEND, 1 if ok else 0)

    def wait_for_checkpoint(self) -> Capture:
        """The records of the epoch libxc just closed with a CHECKPOINT record.

        Raises:
            DomainError: the save ended or failed, the stream is malformed, or
                the checkpoint did not arrive in time.
        """
        with self._cond:
            self._wait_locked(
                lambda: self._waiting == _POSTCOPY and bool(self._epochs),
                self.step_timeout_s,
                "write the checkpoint",
            )
            return self._epochs.pop(0)

    def answer_postcopy(self, ok: bool) -> None:
        """The guest runs again (``ok``): let libxc's ``postcopy`` return.

        Called while libxc is not waiting in postcopy (an error path), it makes
        the rest of the save fail instead: libxc must not take the checkpoint.
        """
        with self._cond:
            if self._waiting == _POSTCOPY:
                self._answer_locked(_POSTCOPY, 1 if ok else 0)
            elif self._started:
                self._stop_locked()

    def stop(self) -> None:
        """End the save: every callback answers 0; wait (bounded) for both threads to end.

        Safe to call more than once, and before ``start``.
        """
        with self._cond:
            self._stop_locked()
        sock = self._ours
        if sock is not None:
            try:  # a libxc blocked writing into the stream now gets EPIPE
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        deadline = time.monotonic() + self.join_timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                log.error("%s: %s did not end within %.0f s", self.name, thread.name, self.join_timeout_s)
        for attr in ("_ours", "_theirs"):
            s = getattr(self, attr)
            if s is not None and not any(t.is_alive() for t in self._threads):
                s.close()
                setattr(self, attr, None)

    # -- libxc side (called from its thread through remus.xen.lib) -----------------------
    def on_suspend(self) -> int:
        return self._rendezvous(_SUSPEND, self.answer_timeout_s)

    def on_postcopy(self) -> int:
        return self._rendezvous(_POSTCOPY, self.answer_timeout_s)

    def on_checkpoint(self) -> int:
        # No deadline: the engine answers at its next checkpoint (one interval away) or stops.
        return self._rendezvous(_CHECKPOINT, None)

    def on_precopy_policy(self, iteration: int, total_written: int, dirty_count: int) -> int:
        if self._stopping:
            return XGS_POLICY_ABORT
        if 0 <= dirty_count < SPP_TARGET_DIRTY_COUNT or iteration >= SPP_MAX_ITERATIONS:
            return XGS_POLICY_STOP_AND_COPY
        return XGS_POLICY_CONTINUE_PRECOPY

    # -- internals -----------------------------------------------------------------------
    def _start(self) -> None:
        self._ours, self._theirs = socket.socketpair()
        # Room for a whole PAGE_DATA record (4 MiB) in flight: fewer wake-ups of either thread.
        self._theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER_BYTES)
        self._ours.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKET_BUFFER_BYTES)
        self._started = True
        for target, label in ((self._save_main, "libxc save"), (self._reader_main, "stream reader")):
            thread = threading.Thread(target=target, name=f"{label} of {self.name}", daemon=True)
            self._threads.append(thread)
            thread.start()

    def _save_main(self) -> None:
        assert self._theirs is not None
        try:
            self._run_save(self._theirs.fileno(), self)
        except BaseException as exc:  # reported to whichever engine call waits next
            with self._cond:
                self._save_error = exc
        finally:
            with self._cond:
                self._save_done = True
                self._waiting = None
                self._cond.notify_all()
            if self._theirs is not None:
                try:  # EOF for the reader
                    self._theirs.shutdown(socket.SHUT_WR)
                except OSError:
                    pass

    def _reader_main(self) -> None:
        assert self._ours is not None
        decoder = StreamDecoder(libxc=True)
        try:
            for data in record_chunks(self._ours):
                decoder.receive_data(data)
                for event in decoder.events():
                    if isinstance(event, EndOfStream):
                        return
                    self._add(event)  # type: ignore[arg-type]
        except (RemusError, OSError) as exc:
            with self._cond:
                self._reader_error = exc
            try:  # the stream is unusable: make libxc's next write fail rather than block
                self._ours.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        finally:
            with self._cond:
                self._reader_done = True
                self._cond.notify_all()

    def _add(self, record: Record) -> None:
        self._epoch.append(record)
        if isinstance(record, PageData):
            self._epoch_pages += len(record.pfns)
        elif isinstance(record, Checkpoint):
            log.debug("%s: epoch of %d records, %d pages", self.name, len(self._epoch), self._epoch_pages)
            with self._cond:
                self._epochs.append(Capture(self._epoch, self._epoch_pages))
                self._cond.notify_all()
            self._epoch = []
            self._epoch_pages = 0

    def _rendezvous(self, name: str, timeout_s: Optional[float]) -> int:
        log.debug("%s: libxc calls %s()", self.name, name)
        with self._cond:
            if self._stopping:
                self._answers.clear()
                return 0
            self._waiting = name
            self._cond.notify_all()
            deadline = None if timeout_s is None else time.monotonic() + timeout_s
            while name not in self._answers and not self._stopping:
                remaining = 1.0 if deadline is None else deadline - time.monotonic()
                if remaining <= 0:
                    log.error("%s: remus did not answer libxc's %s callback within %.0f s; "
                              "ending the save", self.name, name, timeout_s)
                    self._stopping = True
                    break
                self._cond.wait(min(remaining, 1.0))
            answer = self._answers.pop(name, 0)  # an answer given before a stop still counts
            self._waiting = None
            self._cond.notify_all()
            return answer

    def _answer_locked(self, name: str, value: int) -> None:
        if self._waiting == name:
            self._answers[name] = value
            self._cond.notify_all()

    def _stop_locked(self) -> None:
        self._stopping = True
        self._cond.notify_all()

    def _wait_locked(self, ready: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            failure = self._failure()
            if failure is not None:
                raise DomainError(f"{self.name}: libxc's save {failure}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DomainError(f"{self.name}: libxc did not {what} within {timeout_s:.0f} s")
            self._cond.wait(min(remaining, 1.0))

    def _failure(self) -> Optional[str]:
        """Why the save can make no more progress, or None while it can."""
        if self._save_error is not None:
            return f"failed: {self._save_error}"
        if self._reader_error is not None:
            return f"stream could not be read: {self._reader_error}"
        if self._save_done:
            return "ended before remus stopped it"
        if self._stopping:
            return "was stopped"
        if self._reader_done:
            return "stream ended early"
        return None


def record_chunks(sock: socket.socket, max_body: int = DEFAULT_MAX_RECORD_BYTES) -> Iterator[bytes]:
    """libxc's stream on ``sock``, cut where the decoder needs it whole.

    Yields the 40 bytes of image and domain header, then one whole record
    (header, body and padding) at a time, then ``b""`` at EOF (after whatever
    partial record was left).  A record is read with as few system calls as
    the socket allows (``MSG_WAITALL``): in a PV dom0 each one is a trip
    through the hypervisor, and under emulation reading a live copy of guest
    memory in socket-buffer-sized pieces cost more than decoding it.  A header
    claiming more than ``max_body`` bytes is passed on alone, for the decoder
    to reject.
    """
    head = _recv_exact(sock, DomainHeader.SIZE)
    yield bytes(head)
    complete = len(head) == DomainHeader.SIZE
    while complete:
        head = _recv_exact(sock, _RHDR.size)
        if len(head) < _RHDR.size:
            if head:
                yield bytes(head)
            break
        _rtype, length = _RHDR.unpack(head)
        if length > max_body:
            yield bytes(head)
            break
        record = bytearray(_RHDR.size + padded_length(length))
        record[: _RHDR.size] = head
        got = _recv_into(sock, memoryview(record)[_RHDR.size :])
        complete = got == len(record) - _RHDR.size
        yield bytes(record) if complete else bytes(record[: _RHDR.size + got])
    yield b""


def _recv_exact(sock: socket.socket, size: int) -> bytearray:
    buf = bytearray(size)
    return buf[: _recv_into(sock, memoryview(buf))]


def _recv_into(sock: socket.socket, view: memoryview) -> int:
    """Fill ``view`` from ``sock``; how many bytes arrived before EOF."""
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:], len(view) - got, socket.MSG_WAITALL)
        if n == 0:
            break
        got += n
    return got

"""The checkpoint engine: one loop that every kind of domain and channel plugs into.

Theory of operation.  Each checkpoint runs these steps, in this order::

    domain.prepare_suspend()    the domain is ready to stop (Xen, first checkpoint: libxc's
                                live precopy, the guest running); the pause is timed from here
    domain.suspend()            the guest stops
    devices.postsuspend()       a new output epoch begins (plug)
    domain.capture()            dirty pages and state are copied
    devices.records(seq)        what devices add to the checkpoint (a disk's epoch)
    devices.preresume()
    domain.resume()             the guest runs again
    channel.send()              the checkpoint, framed (and compressed), goes out
    channel.wait_for_ack()      the backup holds it
    devices.commit()            the epoch the checkpoint closed is released
    release_memory()            after a large one (the first), and every 10 s: see remus.heap;
                                the compression cache is unmapped then too (contents kept)
    wait                        until the pacer says the next checkpoint is due

A stop request (``StopFlag``, set by SIGINT/SIGTERM in the front end) is
honoured only between checkpoints, so a checkpoint is never cut in half by
one; a second request (``StopFlag.hurry``) cuts the wait for an ack short
(``Interrupted``) and ends at once, in the same order as a first one.

Every ending goes through ``_end`` and then one ``finally`` (``_cleanup``)::

    check contact           silent longer than the backup's takeover timeout: HoldStill
    resume the domain       if a checkpoint was cut short while it was suspended
    channel.close()         heartbeats stopped, CLOSE written, the backup's answer awaited
    fence                   only when the backup did not confirm the CLOSE (``fence`` given)
    devices.release()       held output goes out (in _cleanup)

``HoldStill`` (out of contact too long, or the fence failed) makes the
cleanup skip both resume and release: ``domain.hold()`` keeps the guest
stopped, the output stays held and the channel is aborted, because the
backup may already run the domain.  The contact check also runs in every
checkpoint right after the suspend and right after the ack, so a primary
that was stopped or cut off never lets the guest run on or its output out.
Errors inside a checkpoint become ``CheckpointError`` naming the phase;
``BackupLost`` and ``HoldStill`` pass through as they are.  The domain
itself stays open: whoever opened it closes it.

The engine prints nothing: it reports each checkpoint to ``on_checkpoint``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, TypeVar

from remus import heap
from remus.channel import CLOSE_TIMEOUT_S, GIVE_UP_CLOSE_TIMEOUT_S, Channel
from remus.clock import Clock, GridPacer, IntervalPacer, MonotonicClock, StopFlag
from remus.devices import CheckpointDevice, DeviceSet
from remus.domain import Domain
from remus.errors import BackupLost, CheckpointError, HoldStill, Interrupted, RemusError
from remus.stats import CheckpointStats, Summary
from remus.stream.sender import CheckpointEncoder, session_header

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class EngineResult:
    """How a run ended when it ended without an exception."""

    stop_reason: str
    summary: Summary


class Engine:
    """Runs checkpoints of ``domain`` into ``channel`` until stopped (see the module docstring)."""

    def __init__(
        self,
        domain: Domain,
        channel: Channel,
        *,
        interval_ms: int,
        timer: bool = False,
        compression: bool = True,
        devices: Optional[list[CheckpointDevice]] = None,
        session: Optional[Mapping[str, Any]] = None,
        clock: Optional[Clock] = None,
        stop: Optional[StopFlag] = None,
        on_checkpoint: Optional[Callable[[CheckpointStats], None]] = None,
        fence: Optional[Callable[[str], None]] = None,
        release_memory: Callable[[], object] = heap.trim,
    ) -> None:
        """``fence(reason)`` is called when the backup did not confirm the end of the
        session, before anything is released; it raises ``HoldStill`` unless the backup
        is fenced (``remus --fence``).  Without it the output is released at once.
        ``release_memory()`` runs after a checkpoint large enough to leave much freed
        memory behind, once its buffers are dropped, and after a checkpoint every
        ``remus.heap.TRIM_EVERY_S`` (``remus.heap.TrimSchedule``)."""
        if interval_ms <= 0:
            raise ValueError("interval_ms must be positive")
        self.domain = domain
        self.channel = channel
        self.devices = DeviceSet(devices or [])
        self.clock = clock or MonotonicClock()
        self.stop = stop or StopFlag()
        self.encoder = CheckpointEncoder(compression)
        interval_s = interval_ms / 1000.0
        self.pacer = GridPacer(interval_s) if timer else IntervalPacer(interval_s)
        self.session = dict(session or {})
        self._on_checkpoint = on_checkpoint
        self._fence = fence
        self._release_memory = release_memory
        self._ended = False
        self.holding = False
        #: After the run: did the backup confirm the CLOSE (None: no CLOSE was sent)?
        self.close_confirmed: Optional[bool] = None
        #: Did the backup accept the session?
        self.opened = False
        self._summary = Summary()
        self._last_suspend: Optional[float] = None
        self.seq = 0

    def statistics(self) -> Summary:
        """A snapshot of the totals so far."""
        return Summary(**vars(self._summary))

    def run(self) -> EngineResult:
        """Checkpoint until the stop flag is set, then end in order (see the module docstring).

        Raises:
            HoldStill: the backup may run the domain; it is left stopped, its output held.
            CheckpointError: a step failed; the domain runs on, unprotected.
            BackupLost: the backup went away; the domain runs on, unprotected.
            RemusError: setting up the devices or the channel failed.
        """
        started = self.clock.now()
        try:
            try:
                self._protect()
            except Interrupted:
                log.info("stopping at once (second stop request)")
            self._end(f"primary stopped: {self.stop.reason or 'requested'}")
        except HoldStill:
            self.holding = True
            raise
        except BaseException as exc:
            try:
                self._end(self._ending_message(exc), error=True, lost=exc)
            except HoldStill as hold:
                self.holding = True
                raise hold from exc
            raise
        finally:
            self._summary.duration_s = self.clock.now() - started
            self._cleanup()
        return EngineResult(self.stop.reason or "requested", self.statistics())

    def _protect(self) -> None:
        self.devices.install()
        info = self.domain.info
        self.channel.open(session_header(dict(self.session, domain=info.name, kind=info.kind, **info.details)))
        self.opened = True
        next_start = self.clock.now()
        trims = heap.TrimSchedule(next_start)
        while self.clock.wait_until(next_start, self.stop):
            self.seq += 1
            next_start, raw_bytes = self._checkpoint(self.seq)
            if trims.due(raw_bytes, self.clock.now()):  # the checkpoint's buffers went with its frame
                self._release_memory()
                self.encoder.unmap_cache()

    @staticmethod
    def _ending_message(exc: BaseException) -> str:
        if isinstance(exc, RemusError):
            return f"primary gave up: {exc}"
        return f"primary stopped on an internal error: {type(exc).__name__}"

    # -- the end of a session ------------------------------------------------------------
    def _check_contact(self) -> None:
        """Raise ``HoldStill`` if the backup may already run the domain."""
        silence = self.channel.out_of_contact()
        if silence is not None:
            raise HoldStill(silence.reason, silence.since_unix)

    def _end(self, message: str, *, error: bool = False, lost: Optional[BaseException] = None) -> None:
        """Resume, CLOSE, and fence if needed: everything that must happen before a release."""
        if self._ended:
            return
        self._ended = True
        self._check_contact()
        self._resume_if_suspended()
        timeout_s = GIVE_UP_CLOSE_TIMEOUT_S if error else CLOSE_TIMEOUT_S
        confirmed = self.channel.close(message, error=error, timeout_s=timeout_s)
        self.close_confirmed = confirmed
        if confirmed or (isinstance(lost, BackupLost) and lost.orderly):
            return
        # The backup did not confirm: it may be cut off rather than gone, and take over later.
        self._check_contact()
        reason = str(lost) if lost is not None else "the backup did not confirm the CLOSE"
        if self._fence is not None:
            self._fence(reason)

    def _resume_if_suspended(self) -> None:
        try:
            if self.domain.suspended:
                self.domain.resume()
        except Exception as exc:  # keep going: the cleanup tries again, buffers must be released
            log.error("could not resume the domain: %s", exc)

    # -- one checkpoint ------------------------------------------------------------------
    def _step(self, phase: str, seq: int, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except (BackupLost, Interrupted, HoldStill):
            raise
        except RemusError as exc:
            raise CheckpointError(phase, seq, str(exc)) from exc
        except Exception as exc:
            raise CheckpointError(phase, seq, f"{type(exc).__name__}: {exc}") from exc

    def _checkpoint(self, seq: int) -> tuple[float, int]:
        """Run checkpoint ``seq``; return when the next one is due, and its raw bytes."""
        clock = self.clock
        self._step("suspend", seq, self.domain.prepare_suspend)
        wall_suspend = time.time()
        t_suspend = clock.now()
        self._step("suspend", seq, self.domain.suspend)
        self._step("postsuspend", seq, self.devices.postsuspend)
        self._check_contact()  # stopped or cut off before this suspend: the guest stays stopped
        wall_buffered = time.time()
        capture = self._step("capture", seq, self.domain.capture)
        extra = self._step("records", seq, lambda: self.devices.records(seq))
        self._step("preresume", seq, self.devices.preresume)
        self._step("resume", seq, self.domain.resume)
        t_resumed = clock.now()
        encoded = self._step(
            "send", seq, lambda: self.encoder.stream(seq, [*capture.final_records(), *extra], wall_suspend)
        )
        self._step("send", seq, lambda: self.channel.send(encoded))
        self._step("ack", seq, lambda: self.channel.wait_for_ack(seq))
        t_acked = clock.now()
        wall_acked = time.time()
        self._check_contact()  # an ack read after a long stall proves nothing about now
        self._step("commit", seq, self.devices.commit)
        next_start = self.pacer.next_start(t_suspend, clock.now())
        period = None if self._last_suspend is None else (t_suspend - self._last_suspend) * 1000.0
        self._last_suspend = t_suspend
        stats = CheckpointStats(
            seq=seq,
            pause_ms=(t_resumed - t_suspend) * 1000.0,
            dirty_pages=capture.dirty_pages,
            raw_bytes=encoded.raw_bytes,
            wire_bytes=encoded.wire_bytes,
            ack_ms=(t_acked - t_resumed) * 1000.0,
            period_ms=period,
            overruns=self.pacer.overruns,
            suspended_unix=wall_suspend,
            buffered_unix=wall_buffered,
            acked_unix=wall_acked,
        )
        self._summary.add(stats)
        if self._on_checkpoint is not None:
            self._on_checkpoint(stats)
        return next_start, stats.raw_bytes

    # -- every exit path -------------------------------------------------------------
    def _cleanup(self) -> None:
        if self.holding:
            try:
                self.domain.hold()
            except Exception as exc:
                log.error("could not keep the domain stopped: %s", exc)
            finally:
                self._abort_channel()
            return  # nothing resumed, nothing released: the backup may run the domain
        try:
            self._resume_if_suspended()
        finally:
            self.devices.release()
            self._abort_channel()

    def _abort_channel(self) -> None:
        try:
            self.channel.abort()
        except Exception as exc:
            log.error("closing the replication channel failed: %s", exc)

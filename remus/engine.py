"""The checkpoint engine: one loop that every kind of domain and channel plugs into.

Theory of operation.  Each checkpoint runs these steps, in this order::

    domain.suspend()            the guest stops
    devices.postsuspend()       a new output epoch begins (plug)
    domain.capture()            dirty pages and state are copied
    devices.records(seq)        what devices add to the checkpoint (a disk's epoch)
    devices.preresume()
    domain.resume()             the guest runs again
    channel.send()              the checkpoint, framed (and compressed), goes out
    channel.wait_for_ack()      the backup holds it
    devices.commit()            the epoch the checkpoint closed is released
    wait                        until the pacer says the next checkpoint is due

A stop request (``StopFlag``, set by SIGINT/SIGTERM in the front end) is
honoured only between checkpoints, so a checkpoint is never cut in half by
one.  Every exit path (stop, error, lost backup, an exception from any
callback, even ``KeyboardInterrupt``) goes through one ``finally`` that
resumes a suspended domain, releases every output buffer and drops or closes
the channel.  The domain itself stays open: whoever opened it closes it.  Errors inside a checkpoint become
``CheckpointError`` naming the phase; ``BackupLost`` passes through as is.

The engine prints nothing: it reports each checkpoint to ``on_checkpoint``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, TypeVar

from remus.channel import Channel
from remus.clock import Clock, GridPacer, IntervalPacer, MonotonicClock, StopFlag
from remus.devices import CheckpointDevice, DeviceSet
from remus.domain import Domain
from remus.errors import BackupLost, CheckpointError, RemusError
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
    ) -> None:
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
        self._summary = Summary()
        self._last_suspend: Optional[float] = None
        self.seq = 0

    def statistics(self) -> Summary:
        """A snapshot of the totals so far."""
        return Summary(**vars(self._summary))

    def run(self) -> EngineResult:
        """Checkpoint until the stop flag is set.

        Raises:
            CheckpointError: a step failed; the domain runs on, unprotected.
            BackupLost: the backup went away; the domain runs on, unprotected.
            RemusError: setting up the devices or the channel failed.
        """
        started = self.clock.now()
        closed_in_order = False
        try:
            self.devices.install()
            info = self.domain.info
            self.channel.open(
                session_header(dict(self.session, domain=info.name, kind=info.kind, **info.details))
            )
            next_start = self.clock.now()
            while self.clock.wait_until(next_start, self.stop):
                self.seq += 1
                next_start = self._checkpoint(self.seq)
            self.channel.close(f"primary stopped: {self.stop.reason or 'requested'}")
            closed_in_order = True
        finally:
            self._summary.duration_s = self.clock.now() - started
            self._cleanup(closed_in_order)
        return EngineResult(self.stop.reason or "requested", self.statistics())

    # -- one checkpoint ------------------------------------------------------------------
    def _step(self, phase: str, seq: int, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except BackupLost:
            raise
        except RemusError as exc:
            raise CheckpointError(phase, seq, str(exc)) from exc
        except Exception as exc:
            raise CheckpointError(phase, seq, f"{type(exc).__name__}: {exc}") from exc

    def _checkpoint(self, seq: int) -> float:
        """Run checkpoint ``seq``; return when the next one is due."""
        clock = self.clock
        wall_suspend = time.time()
        t_suspend = clock.now()
        self._step("suspend", seq, self.domain.suspend)
        self._step("postsuspend", seq, self.devices.postsuspend)
        wall_buffered = time.time()
        capture = self._step("capture", seq, self.domain.capture)
        extra = self._step("records", seq, lambda: self.devices.records(seq))
        self._step("preresume", seq, self.devices.preresume)
        self._step("resume", seq, self.domain.resume)
        t_resumed = clock.now()
        encoded = self._step("send", seq, lambda: self.encoder.encode(seq, [*capture.final_records(), *extra]))
        self._step("send", seq, lambda: self.channel.send(encoded))
        self._step("ack", seq, lambda: self.channel.wait_for_ack(seq))
        t_acked = clock.now()
        wall_acked = time.time()
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
        return next_start

    # -- every exit path -------------------------------------------------------------
    def _cleanup(self, closed_in_order: bool) -> None:
        try:
            if self.domain.suspended:
                self.domain.resume()
        except Exception as exc:  # keep going: buffers must still be released
            log.error("could not resume the domain: %s", exc)
        finally:
            self.devices.release()
            if not closed_in_order:
                try:
                    self.channel.abort()
                except Exception as exc:
                    log.error("closing the replication channel failed: %s", exc)

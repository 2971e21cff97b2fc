"""Checkpoint statistics: one immutable record per checkpoint, and their running summary.

Pure data: nothing here prints or writes files (``remus.report`` does).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional


@dataclass(frozen=True)
class CheckpointStats:
    """What one checkpoint cost.

    ``pause_ms``: suspend to resume (the guest stood still); ``ack_ms``: from
    the start of sending to the backup's ack; ``period_ms``: since the
    previous checkpoint's suspend (None for the first); ``raw_bytes`` /
    ``wire_bytes``: the checkpoint framed without / with compression;
    ``overruns``: ``--timer`` grid points missed so far.  ``suspended_unix``,
    ``buffered_unix`` and ``acked_unix`` are wall-clock times (``time.time()``)
    when the suspend began, when the devices' postsuspend (a new output
    epoch) was done, and when the ack arrived, for matching against packet
    captures: output seen before ``buffered_unix`` belongs to this checkpoint.
    """

    seq: int
    pause_ms: float
    dirty_pages: int
    raw_bytes: int
    wire_bytes: int
    ack_ms: float
    period_ms: Optional[float]
    overruns: int
    suspended_unix: float = 0.0
    buffered_unix: float = 0.0
    acked_unix: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Summary:
    """Totals over a run (``statistics()`` of the engine returns a copy)."""

    checkpoints: int = 0
    pause_ms_total: float = 0.0
    pause_ms_max: float = 0.0
    ack_ms_total: float = 0.0
    period_ms_total: float = 0.0
    periods: int = 0
    dirty_pages: int = 0
    raw_bytes: int = 0
    wire_bytes: int = 0
    overruns: int = 0
    duration_s: float = 0.0

    def add(self, s: CheckpointStats) -> None:
        self.checkpoints += 1
        self.pause_ms_total += s.pause_ms
        self.pause_ms_max = max(self.pause_ms_max, s.pause_ms)
        self.ack_ms_total += s.ack_ms
        if s.period_ms is not None:
            self.period_ms_total += s.period_ms
            self.periods += 1
        self.dirty_pages += s.dirty_pages
        self.raw_bytes += s.raw_bytes
        self.wire_bytes += s.wire_bytes
        self.overruns = s.overruns

    @property
    def mean_pause_ms(self) -> float:
        return self.pause_ms_total / self.checkpoints if self.checkpoints else 0.0

    @property
    def mean_ack_ms(self) -> float:
        return self.ack_ms_total / self.checkpoints if self.checkpoints else 0.0

    @property
    def mean_period_ms(self) -> float:
        return self.period_ms_total / self.periods if self.periods else 0.0

    @property
    def compression_ratio(self) -> float:
        return self.raw_bytes / self.wire_bytes if self.wire_bytes else 1.0

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            mean_pause_ms=self.mean_pause_ms,
            mean_ack_ms=self.mean_ack_ms,
            mean_period_ms=self.mean_period_ms,
            compression_ratio=self.compression_ratio,
        )
        return data

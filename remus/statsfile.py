"""Reading a ``--stats-json`` file back: its checkpoints, and what they add up to.

``remus --stats-json=FILE`` appends one JSON object per checkpoint
(``{"event": "checkpoint", ...}``, the fields of ``remus.stats.CheckpointStats``)
and one ``{"event": "summary", ...}`` when it exits; several runs may share a
file.  ``read_checkpoints`` returns the checkpoint objects (other events and
unknown fields are skipped, so newer files still read); ``summarise`` reduces
them to a ``FileSummary``; ``summary_text`` is what ``remus-stats`` prints.

Pure computation on data already read: nothing here draws or prints.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import IO, Any, Optional, Sequence

from remus.errors import StatsFileError
from remus.report import human_bytes
from remus.stats import CheckpointStats

__all__ = ["Checkpoint", "FileSummary", "StatsFileError", "Percentiles", "read_checkpoints",
           "summarise", "summary_text"]


#: A checkpoint line as the viewer reads it: the engine's own record of it.
Checkpoint = CheckpointStats


@dataclass(frozen=True)
class Percentiles:
    """p50, p90, p99 and max of one measure (nearest-rank percentiles)."""

    p50: float
    p90: float
    p99: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Optional["Percentiles"]:
        if not values:
            return None
        ordered = sorted(values)

        def rank(p: float) -> float:
            return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]

        return cls(rank(50), rank(90), rank(99), ordered[-1])


@dataclass(frozen=True)
class FileSummary:
    """What a file's checkpoints add up to."""

    checkpoints: int
    runs: int
    duration_s: float
    rate_per_s: float
    pause_ms: Optional[Percentiles]
    ack_ms: Optional[Percentiles]
    period_ms: Optional[Percentiles]
    dirty_pages: int
    raw_bytes: int
    wire_bytes: int
    overruns: int


def read_checkpoints(stream: IO[str], name: str = "-") -> list[Checkpoint]:
    """The checkpoint lines of ``stream``, in file order.

    A last line cut short (the file is still being written) is skipped.

    Raises:
        StatsFileError: a line before the last is not JSON or lacks a field.
    """
    lines = stream.read().splitlines()
    out: list[Checkpoint] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            if number == len(lines):
                break
            raise StatsFileError(f"{name}:{number}: not a JSON line (is this a --stats-json file?)") from None
        if not isinstance(obj, dict) or obj.get("event") != "checkpoint":
            continue
        out.append(_checkpoint(obj, name, number))
    return out


def _checkpoint(obj: dict[str, Any], name: str, number: int) -> Checkpoint:
    try:
        period = obj.get("period_ms")
        return Checkpoint(
            seq=int(obj["seq"]),
            pause_ms=float(obj["pause_ms"]),
            dirty_pages=int(obj["dirty_pages"]),
            raw_bytes=int(obj["raw_bytes"]),
            wire_bytes=int(obj["wire_bytes"]),
            ack_ms=float(obj["ack_ms"]),
            period_ms=None if period is None else float(period),
            overruns=int(obj.get("overruns", 0)),
            suspended_unix=float(obj.get("suspended_unix", 0.0)),
            buffered_unix=float(obj.get("buffered_unix", 0.0)),
            acked_unix=float(obj.get("acked_unix", 0.0)),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise StatsFileError(f"{name}:{number}: a checkpoint line without a valid {exc} field") from None


def runs_of(checkpoints: Sequence[Checkpoint]) -> list[list[Checkpoint]]:
    """Split a file's checkpoints into runs (a run starts again at checkpoint 1)."""
    runs: list[list[Checkpoint]] = []
    for c in checkpoints:
        if not runs or c.seq <= runs[-1][-1].seq:
            runs.append([])
        runs[-1].append(c)
    return runs


def summarise(checkpoints: Sequence[Checkpoint]) -> FileSummary:
    """Totals and percentiles over every checkpoint.

    The duration is the sum over runs of first suspend to last suspend plus
    the last period; the rate is checkpoints per second of that.  Overruns
    are counted per run (each line carries its run's running total).
    """
    runs = runs_of(checkpoints)
    duration = 0.0
    for run in runs:
        periods = [c.period_ms for c in run if c.period_ms is not None]
        if run[-1].suspended_unix and run[0].suspended_unix:
            duration += run[-1].suspended_unix - run[0].suspended_unix
        else:
            duration += sum(periods) / 1000.0
        if periods:
            duration += periods[-1] / 1000.0
    return FileSummary(
        checkpoints=len(checkpoints),
        runs=len(runs),
        duration_s=duration,
        rate_per_s=len(checkpoints) / duration if duration > 0 else 0.0,
        pause_ms=Percentiles.of([c.pause_ms for c in checkpoints]),
        ack_ms=Percentiles.of([c.ack_ms for c in checkpoints]),
        period_ms=Percentiles.of([c.period_ms for c in checkpoints if c.period_ms is not None]),
        dirty_pages=sum(c.dirty_pages for c in checkpoints),
        raw_bytes=sum(c.raw_bytes for c in checkpoints),
        wire_bytes=sum(c.wire_bytes for c in checkpoints),
        overruns=sum(run[-1].overruns for run in runs),
    )


def summary_text(name: str, s: FileSummary) -> str:
    """The lines ``remus-stats`` prints for a file."""
    if not s.checkpoints:
        return f"{name}: no checkpoints\n"
    runs = f" in {s.runs} runs" if s.runs > 1 else ""
    lines = [
        f"{name}: {s.checkpoints} checkpoints{runs} over {s.duration_s:.1f} s ({s.rate_per_s:.1f}/s)",
        f"{'':8}{'p50':>10}{'p90':>10}{'p99':>10}{'max':>10}",
    ]
    for label, p in (("pause", s.pause_ms), ("ack", s.ack_ms), ("period", s.period_ms)):
        if p is not None:
            lines.append(f"{label:8}" + "".join(f"{v:>7.1f} ms" for v in (p.p50, p.p90, p.p99, p.max)))
    ratio = s.raw_bytes / s.wire_bytes if s.wire_bytes else 1.0
    lines.append(f"dirty pages {s.dirty_pages} ({s.dirty_pages / s.checkpoints:.0f} per checkpoint)")
    lines.append(f"bytes {human_bytes(s.raw_bytes)} before compression, {human_bytes(s.wire_bytes)} "
                 f"on the wire (x{ratio:.1f})")
    lines.append(f"timer overruns {s.overruns}")
    return "\n".join(lines) + "\n"

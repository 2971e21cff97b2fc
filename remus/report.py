"""Showing checkpoint statistics: a live status line, JSON lines, and the summary.

``Reporter`` is handed each ``CheckpointStats`` by the engine.  On a terminal
it redraws one status line on stderr (at most ten times a second); when
stderr is not a terminal it writes nothing per checkpoint, because scripts
written for the old remus read nothing from it.  With a JSON path it appends
one object per checkpoint (``{"event": "checkpoint", ...}``) and, at the end,
one summary object (``{"event": "summary", ...}``).  ``summary_text`` is the
few lines printed when remus exits.
"""

from __future__ import annotations

import json
import time
from typing import Optional, TextIO

from remus.stats import CheckpointStats, Summary

_REDRAW_S = 0.1


def human_bytes(n: float) -> str:
    """``1536`` -> ``'1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def status_line(name: str, s: CheckpointStats) -> str:
    """One-line view of a checkpoint."""
    period = "-" if s.period_ms is None else f"{s.period_ms:.0f} ms"
    line = (
        f"{name}  #{s.seq}  pause {s.pause_ms:.1f} ms  dirty {s.dirty_pages} pg  "
        f"{human_bytes(s.raw_bytes)} -> {human_bytes(s.wire_bytes)}  ack {s.ack_ms:.1f} ms  period {period}"
    )
    if s.overruns:
        line += f"  overruns {s.overruns}"
    return line


def summary_text(name: str, summary: Summary) -> str:
    """What remus prints when it exits."""
    if not summary.checkpoints:
        return f"remus: {name}: no checkpoint completed ({summary.duration_s:.1f} s)\n"
    text = (
        f"remus: {name}: {summary.checkpoints} checkpoints in {summary.duration_s:.1f} s, "
        f"mean period {summary.mean_period_ms:.1f} ms\n"
        f"remus:   pause mean {summary.mean_pause_ms:.1f} ms, max {summary.pause_ms_max:.1f} ms; "
        f"ack mean {summary.mean_ack_ms:.1f} ms; {summary.dirty_pages} dirty pages\n"
        f"remus:   {human_bytes(summary.raw_bytes)} of checkpoints sent as "
        f"{human_bytes(summary.wire_bytes)} (x{summary.compression_ratio:.1f})"
    )
    if summary.overruns:
        text += f"; {summary.overruns} timer overruns"
    return text + "\n"


class Reporter:
    """Receives each checkpoint's statistics (see the module docstring)."""

    def __init__(self, name: str, stream: TextIO, json_path: Optional[str] = None,
                 live: Optional[bool] = None) -> None:
        self.name = name
        self.stream = stream
        self.live = stream.isatty() if live is None else live
        self._json: Optional[TextIO] = open(json_path, "a", encoding="utf-8") if json_path else None
        self._last_draw = 0.0
        self._drawn = False

    def __call__(self, stats: CheckpointStats) -> None:
        if self._json is not None:
            self._json.write(json.dumps(dict(event="checkpoint", **stats.to_json())) + "\n")
            self._json.flush()
        if self.live:
            now = time.monotonic()
            if now - self._last_draw >= _REDRAW_S:
                self._last_draw = now
                self.stream.write("\r\x1b[K" + status_line(self.name, stats))
                self.stream.flush()
                self._drawn = True

    def finish(self, summary: Summary) -> None:
        """End the live line, print the summary, and close the JSON file."""
        if self._drawn:
            self.stream.write("\n")
        self.stream.write(summary_text(self.name, summary))
        self.stream.flush()
        if self._json is not None:
            self._json.write(json.dumps(dict(event="summary", **summary.to_json())) + "\n")
            self._json.close()
            self._json = None

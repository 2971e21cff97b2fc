"""Showing what remus does: live progress and status on a terminal, timestamped events otherwise.

``Reporter`` is handed each ``CheckpointStats`` by the engine, and the first
checkpoint's progress by ``ProgressChannel`` (a pass-through around the
replication channel).  Two ways to show them, chosen by whether stderr is a
terminal:

* **live** (a terminal): during the first checkpoint (the whole guest, which
  takes minutes for a large one) one line shows the pages sent of the total,
  the rate and the time left; then one status line is redrawn per checkpoint,
  at most ten times a second;
* **events** (systemd, nohup, a log file): one timestamped line per event:
  ``start``, ``first checkpoint`` done, a ``summary`` every
  ``summary_every_s`` (default five minutes), and ``stop`` or ``lost`` with
  the reason, so journald and log files tell what happened and when.

With a JSON path it appends one object per checkpoint (``{"event":
"checkpoint", ...}``) and, at the end, one summary object (``{"event":
"summary", ...}``); a path that cannot be opened is a ``StatsFileError`` before
anything runs.  ``summary_text`` is the few lines printed when remus exits.

Never decides anything and never touches the domain or the channel's bytes.
"""

from __future__ import annotations

import json
import time
from typing import Callable, Optional, TextIO

from remus.channel import CLOSE_TIMEOUT_S, Channel, Silence
from remus.errors import StatsFileError
from remus.stats import CheckpointStats, Summary
from remus.stream.records import PAGE_SIZE
from remus.stream.sender import EncodedCheckpoint, FramedCheckpoint, StreamedCheckpoint

__all__ = ["ProgressChannel", "Reporter", "human_bytes", "human_duration", "status_line", "summary_text"]

_REDRAW_S = 0.1
#: How often, when stderr is not a terminal, a summary line is written.
DEFAULT_SUMMARY_EVERY_S = 300.0


def human_bytes(n: float) -> str:
    """``1536`` -> ``'1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def human_duration(seconds: float) -> str:
    """``75`` -> ``'1m15s'``, ``3700`` -> ``'1h01m'``, ``4.2`` -> ``'4s'``."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


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


def progress_line(name: str, done_pages: int, total_pages: int, elapsed_s: float) -> str:
    """The first checkpoint so far: pages sent of the total, rate, time left."""
    percent = 100.0 * done_pages / total_pages if total_pages else 100.0
    rate = done_pages / elapsed_s if elapsed_s > 0 else 0.0
    left = f"{human_duration((total_pages - done_pages) / rate)} left" if rate > 0 else "time left unknown"
    return (f"{name}  first checkpoint: {done_pages} of {total_pages} pages ({percent:.0f}%), "
            f"{rate:.0f} pages/s ({human_bytes(rate * PAGE_SIZE)}/s), {left}")


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


def _window_text(window: Summary, seconds: float) -> str:
    rate = window.checkpoints / seconds if seconds > 0 else 0.0
    return (f"{window.checkpoints} checkpoints in the last {human_duration(seconds)} ({rate:.1f}/s), "
            f"pause mean {window.mean_pause_ms:.1f} ms max {window.pause_ms_max:.1f} ms, "
            f"ack mean {window.mean_ack_ms:.1f} ms, {human_bytes(window.wire_bytes)} sent, "
            f"{window.overruns} overruns")


class Reporter:
    """Receives each checkpoint's statistics (see the module docstring).

    Raises ``StatsFileError`` from the constructor when ``json_path`` cannot
    be opened for appending.  ``clock`` (monotonic seconds) and ``wall``
    (Unix seconds) are injectable for tests.
    """

    def __init__(self, name: str, stream: TextIO, json_path: Optional[str] = None,
                 live: Optional[bool] = None, *, summary_every_s: float = DEFAULT_SUMMARY_EVERY_S,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time) -> None:
        self.name = name
        self.stream = stream
        self.live = stream.isatty() if live is None else live
        self._clock = clock
        self._wall = wall
        self._json: Optional[TextIO] = None
        if json_path:
            try:
                self._json = open(json_path, "a", encoding="utf-8")
            except OSError as exc:
                raise StatsFileError(
                    f"cannot write statistics to {json_path}: {exc.strerror or exc} "
                    "(--stats-json needs a file remus can create or append to)"
                ) from None
        self._last_draw = float("-inf")
        self._drawn = False
        self._started = clock()
        self._progress_started: Optional[float] = None
        self._summary_every_s = summary_every_s
        self._window = Summary()
        self._window_started = self._started
        self._first_done = False
        self.event("start", f"protecting {name}")

    # -- events (stderr not a terminal) ----------------------------------------------
    def event(self, kind: str, text: str) -> None:
        """One timestamped line ``2026-11-28T14:03:05+0000 remus: start: ...`` (events mode only)."""
        if self.live:
            return
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self._wall()))
        self.stream.write(f"{stamp} remus: {kind}: {text}\n")
        self.stream.flush()

    # -- the first checkpoint --------------------------------------------------------
    def progress(self, done_pages: int, total_pages: int) -> None:
        """The first checkpoint has sent ``done_pages`` of ``total_pages`` (live mode draws it)."""
        now = self._clock()
        if self._progress_started is None:
            self._progress_started = now
            self.event("first checkpoint", f"sending {total_pages} pages ({human_bytes(total_pages * PAGE_SIZE)})")
        if self.live and (now - self._last_draw >= _REDRAW_S or done_pages >= total_pages):
            self._last_draw = now
            self._draw(progress_line(self.name, done_pages, total_pages, now - self._progress_started))

    # -- every checkpoint ------------------------------------------------------------
    def __call__(self, stats: CheckpointStats) -> None:
        if self._json is not None:
            self._json.write(json.dumps(dict(event="checkpoint", **stats.to_json())) + "\n")
            self._json.flush()
        now = self._clock()
        if not self._first_done:
            self._first_done = True
            self.event("first checkpoint done",
                       f"{stats.dirty_pages} pages, {human_bytes(stats.wire_bytes)} sent, "
                       f"{human_duration(now - self._started)} after start; {self.name} is protected")
            self._window_started = now
        else:
            self._window.add(stats)
        if now - self._window_started >= self._summary_every_s:
            self.event("summary", _window_text(self._window, now - self._window_started))
            self._window = Summary()
            self._window_started = now
        if self.live and now - self._last_draw >= _REDRAW_S:
            self._last_draw = now
            self._draw(status_line(self.name, stats))

    def _draw(self, line: str) -> None:
        self.stream.write("\r\x1b[K" + line)
        self.stream.flush()
        self._drawn = True

    def finish(self, summary: Summary, outcome: Optional[str] = None, *, lost: bool = False) -> None:
        """End the live line, log the stop (or loss), print the summary, close the JSON file.

        ``outcome`` is why the run ended (``"SIGINT"``, the error); ``lost``
        says protection ended because of a failure rather than on request.
        """
        if self._drawn:
            self.stream.write("\n")
            self._drawn = False
        self.event("lost" if lost else "stop", outcome or "requested")
        self.stream.write(summary_text(self.name, summary))
        self.stream.flush()
        if self._json is not None:
            self._json.write(json.dumps(dict(event="summary", **summary.to_json())) + "\n")
            self._json.close()
            self._json = None

    def watch(self, channel: Channel) -> "ProgressChannel":
        """``channel``, reporting the first checkpoint's progress to this reporter."""
        return ProgressChannel(channel, self.progress)


class ProgressChannel:
    """A ``Channel`` that passes everything through and reports the first checkpoint's progress.

    The first checkpoint is handed to the inner channel one wire chunk at a
    time (channels write a checkpoint's chunks in order, so this sends the
    same bytes) and ``on_progress(done_pages, total_pages)`` is called after
    each; pages are counted from the uncompressed size.  Later checkpoints
    pass through untouched.
    """

    def __init__(self, inner: Channel, on_progress: Callable[[int, int], None]) -> None:
        self.inner = inner
        self._on_progress = on_progress
        self._first = True

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)  # anything else a channel offers, unchanged

    def open(self, opening: bytes) -> None:
        self.inner.open(opening)

    def send(self, checkpoint: FramedCheckpoint) -> None:
        if not self._first:
            self.inner.send(checkpoint)
            return
        self._first = False
        total = max(1, checkpoint.raw_bytes // PAGE_SIZE)
        sent = 0
        self._on_progress(0, total)
        for chunk in checkpoint.chunks:
            self.inner.send(EncodedCheckpoint(checkpoint.seq, (chunk,), 0, len(chunk)))
            sent += len(chunk)
            if isinstance(checkpoint, StreamedCheckpoint):  # framed as it goes: how much is framed
                done = total * checkpoint.raw_done // max(1, checkpoint.raw_bytes)
            else:
                done = total if sent >= checkpoint.wire_bytes else total * sent // max(1, checkpoint.wire_bytes)
            self._on_progress(done, total)

    def wait_for_ack(self, seq: int) -> None:
        self.inner.wait_for_ack(seq)

    def close(self, message: str, *, error: bool = False, timeout_s: float = CLOSE_TIMEOUT_S) -> bool:
        return self.inner.close(message, error=error, timeout_s=timeout_s)

    def out_of_contact(self) -> Optional[Silence]:
        return self.inner.out_of_contact()

    def abort(self) -> None:
        self.inner.abort()

"""What remus shows: first-checkpoint progress and status on a terminal, timestamped events
elsewhere, and the statistics file."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest

from remus.channel import BlackholeChannel
from remus.errors import StatsFileError
from remus.report import ProgressChannel, Reporter, human_duration, progress_line
from remus.stats import CheckpointStats, Summary
from remus.stream.sender import EncodedCheckpoint


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def stats(seq: int) -> CheckpointStats:
    return CheckpointStats(seq=seq, pause_ms=2.0, dirty_pages=100, raw_bytes=409600, wire_bytes=4096,
                           ack_ms=3.0, period_ms=None if seq == 1 else 50.0, overruns=0)


def test_human_duration() -> None:
    assert [human_duration(s) for s in (4.2, 75, 3700)] == ["4s", "1m15s", "1h01m"]


def test_progress_line_has_pages_rate_and_time_left() -> None:
    line = progress_line("xen:web", 25_000, 100_000, 10.0)
    assert line == ("xen:web  first checkpoint: 25000 of 100000 pages (25%), 2500 pages/s (9.8 MiB/s), "
                    "30s left")
    assert progress_line("x", 0, 10, 0.0).endswith("time left unknown")


def test_off_a_terminal_events_are_timestamped_lines() -> None:
    out, clock = io.StringIO(), Clock()
    rep = Reporter("sim:a", out, live=False, summary_every_s=60, clock=clock, wall=lambda: 0.0)
    rep.progress(0, 1000)
    rep.progress(500, 1000)  # no line per progress step
    clock.t += 12
    rep(stats(1))
    for seq in range(2, 40):
        clock.t += 1
        rep(stats(seq))  # 38 s later: no summary yet
    clock.t += 30
    rep(stats(40))  # 68 s after the first checkpoint: a summary of the window
    rep.finish(Summary(), "backup lost: heartbeat timeout", lost=True)
    lines = out.getvalue().splitlines()
    stamp = r"1970-01-01T\d\d:\d\d:00[+-]\d{4} remus: "
    assert re.fullmatch(stamp + "start: protecting sim:a", lines[0])
    assert re.fullmatch(stamp + r"first checkpoint: sending 1000 pages \(3.9 MiB\)", lines[1])
    assert re.fullmatch(stamp + r"first checkpoint done: 100 pages, 4.0 KiB sent, 12s after start; "
                        "sim:a is protected", lines[2])
    assert re.fullmatch(stamp + r"summary: 39 checkpoints in the last 1m08s \(0.6/s\), pause mean 2.0 ms "
                        r"max 2.0 ms, ack mean 3.0 ms, 156.0 KiB sent, 0 overruns", lines[3])
    assert re.fullmatch(stamp + "lost: backup lost: heartbeat timeout", lines[4])
    assert lines[5] == "remus: sim:a: no checkpoint completed (0.0 s)"
    assert "\r" not in out.getvalue()


def test_on_a_terminal_progress_then_status_then_summary() -> None:
    out, clock = io.StringIO(), Clock()
    rep = Reporter("sim:a", out, live=True, clock=clock)
    rep.progress(0, 1000)
    clock.t += 0.05
    rep.progress(100, 1000)  # too soon after the last drawing
    clock.t += 0.075
    rep.progress(200, 1000)
    rep.progress(1000, 1000)  # the last step is always drawn
    clock.t += 1
    rep(stats(1))
    rep.finish(Summary(), "SIGINT")
    text = out.getvalue()
    draws = text.split("\r\x1b[K")[1:]
    assert draws[0].startswith("sim:a  first checkpoint: 0 of 1000 pages (0%)")
    assert draws[1].startswith("sim:a  first checkpoint: 200 of 1000 pages (20%), 1600 pages/s")
    assert draws[2].startswith("sim:a  first checkpoint: 1000 of 1000 pages (100%)")
    assert draws[3].startswith("sim:a  #1  pause 2.0 ms")
    assert draws[3].endswith("\nremus: sim:a: no checkpoint completed (0.0 s)\n")
    assert "remus: start" not in text


def test_an_unwritable_statistics_file_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(StatsFileError, match=r"cannot write statistics to /proc/x/y: No such file or "
                       r"directory \(--stats-json needs a file remus can create or append to\)"):
        Reporter("sim:a", io.StringIO(), "/proc/x/y", live=True)
    path = tmp_path / "s.jsonl"
    rep = Reporter("sim:a", io.StringIO(), str(path), live=True)
    rep(stats(1))
    rep.finish(Summary(checkpoints=1))
    events = [json.loads(line)["event"] for line in path.read_text().splitlines()]
    assert events == ["checkpoint", "summary"]


def test_the_progress_channel_sends_the_same_bytes(tmp_path: Path) -> None:
    seen: list[tuple[int, int]] = []
    sink = tmp_path / "sink"
    sink.touch()
    inner = BlackholeChannel(str(sink))
    channel = ProgressChannel(inner, lambda done, total: seen.append((done, total)))
    channel.open(b"hdr")
    chunks = [b"a" * 100, b"b" * 300, b"c" * 600]
    first = EncodedCheckpoint(1, chunks, raw_bytes=4096 * 40, wire_bytes=1000)
    channel.send(first)
    channel.wait_for_ack(1)
    channel.send(EncodedCheckpoint(2, [b"d"], raw_bytes=8, wire_bytes=1))
    assert seen == [(0, 40), (4, 40), (16, 40), (40, 40)]  # the second checkpoint is not reported
    assert inner.bytes_written == 3 + 1000 + 1
    assert channel.bytes_written == inner.bytes_written  # everything else passes through
    assert channel.close("done") is True and channel.out_of_contact() is None

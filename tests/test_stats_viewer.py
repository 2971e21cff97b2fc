"""remus-stats: the summary of a generated --stats-json file, the plot files, and the command's edges."""

from __future__ import annotations

import io
import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from remus.errors import StatsFileError
from remus.stats_cli import main
from remus.statsfile import Percentiles, read_checkpoints, summarise, summary_text
from tests.helpers import repo_env


def checkpoint(seq: int, **fields: Any) -> dict[str, Any]:
    line = dict(event="checkpoint", seq=seq, pause_ms=1.0, dirty_pages=10, raw_bytes=40960, wire_bytes=4096,
                ack_ms=2.0, period_ms=None if seq == 1 else 50.0, overruns=0,
                suspended_unix=1_000.0 + 0.05 * (seq - 1), buffered_unix=0.0, acked_unix=0.0)
    line.update(fields)
    return line


def write(path: Path, lines: list[dict[str, Any]], tail: str = "") -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines) + tail)
    return path


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    random.Random(7).shuffle(values)
    assert Percentiles.of(values) == Percentiles(50.0, 90.0, 99.0, 100.0)
    assert Percentiles.of([3.0]) == Percentiles(3.0, 3.0, 3.0, 3.0)
    assert Percentiles.of([]) is None


def test_summary_of_a_generated_file(tmp_path: Path) -> None:
    # 100 checkpoints 50 ms apart: pause = seq/10 ms, ack = seq ms; a second run of 10; a summary
    # line and an unknown event in between; the last line cut short (still being written).
    run1 = [checkpoint(s, pause_ms=s / 10, ack_ms=float(s), overruns=s // 40) for s in range(1, 101)]
    run2 = [checkpoint(s, suspended_unix=2_000.0 + 0.05 * (s - 1), raw_bytes=8192, wire_bytes=8192)
            for s in range(1, 11)]
    path = write(tmp_path / "stats.jsonl", run1 + [{"event": "summary", "checkpoints": 100},
                                                   {"event": "future-thing"}] + run2, tail='{"event": "chec')
    with path.open() as f:
        checkpoints = read_checkpoints(f, str(path))
    s = summarise(checkpoints)
    assert (s.checkpoints, s.runs) == (110, 2)
    assert s.duration_s == pytest.approx(99 * 0.05 + 0.05 + 9 * 0.05 + 0.05)  # 5.5 s
    assert s.rate_per_s == pytest.approx(110 / 5.5)
    assert s.pause_ms is not None and s.pause_ms.p50 == pytest.approx(4.5) and s.pause_ms.max == pytest.approx(10)
    assert s.ack_ms is not None and (s.ack_ms.p90, s.ack_ms.p99) == (89.0, 99.0)
    assert s.period_ms == Percentiles(50.0, 50.0, 50.0, 50.0)
    assert (s.raw_bytes, s.wire_bytes) == (100 * 40960 + 10 * 8192, 100 * 4096 + 10 * 8192)
    assert s.dirty_pages == 1100 and s.overruns == 2
    text = summary_text("stats.jsonl", s)
    assert text.splitlines()[0] == "stats.jsonl: 110 checkpoints in 2 runs over 5.5 s (20.0/s)"
    assert "pause       4.5 ms" in text and "x8.5)" in text and "timer overruns 2" in text


def test_a_broken_line_is_named(tmp_path: Path) -> None:
    path = write(tmp_path / "s", [checkpoint(1)], tail="not json\n" + json.dumps(checkpoint(2)) + "\n")
    with pytest.raises(StatsFileError, match=r":2: not a JSON line"):
        read_checkpoints(path.open(), str(path))
    with pytest.raises(StatsFileError, match=r"s:1: a checkpoint line without a valid 'pause_ms' field"):
        read_checkpoints(io.StringIO('{"event": "checkpoint", "seq": 1}\n'), str(path))


def test_the_command_prints_the_summary_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path / "s.jsonl", [checkpoint(s) for s in range(1, 21)])
    assert main([str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{path}: 20 checkpoints over 1.0 s (20.0/s)\n")
    assert main(["--json", str(path)]) == 0
    assert json.loads(capsys.readouterr().out)["checkpoints"] == 20


@pytest.mark.parametrize("argv, status, message", [
    (["--bogus", "f"], 2, "remus-stats: error: no such option: --bogus (see remus-stats --help)"),
    ([], 2, "remus-stats: error: wrong arguments; usage: remus-stats [options] FILE"),
    (["--plot=x.pdf", "f"], 2, "remus-stats: error: option --plot: x.pdf must end in .png or .svg"),
    (["/nonexistent/x.jsonl"], 1, "remus-stats: No such file or directory: /nonexistent/x.jsonl"),
])
def test_the_command_edges(argv: list[str], status: int, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == status
    assert capsys.readouterr().err.startswith(message)


def test_without_matplotlib_the_plot_says_how_to_get_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path / "s.jsonl", [checkpoint(s) for s in range(1, 5)])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert main(["--plot", str(tmp_path / "p.png"), str(path)]) == 1
    err = capsys.readouterr().err
    assert "plotting needs matplotlib: pip install 'remus[plot]' (or apt-get install python3-matplotlib)" in err
    assert not (tmp_path / "p.png").exists()


@pytest.mark.parametrize("suffix", [pytest.param(".png", marks=pytest.mark.slow), ".svg"])
def test_the_plot_is_a_valid_image(tmp_path: Path, suffix: str) -> None:
    pytest.importorskip("matplotlib", reason="the [plot] extra (matplotlib) is not installed")
    path = write(tmp_path / "s.jsonl", [checkpoint(s, dirty_pages=s % 7) for s in range(1, 50)])
    out = tmp_path / f"plot{suffix}"
    done = subprocess.run([sys.executable, "-m", "remus.stats_cli", "--plot", str(out), str(path)],
                          env=repo_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    data = out.read_bytes()
    if suffix == ".png":
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and data[-8:-4] == b"IEND"
    else:
        import xml.etree.ElementTree as ET

        root = ET.fromstring(data)
        assert root.tag == "{http://www.w3.org/2000/svg}svg"
        assert len(root.findall(".//{http://www.w3.org/2000/svg}path")) > 4

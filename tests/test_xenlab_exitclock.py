"""The lab's line watcher (``exitclock.py line``), on logs written here: it stamps the first
matching line beyond each log's skipped lines, in a log that may not exist yet."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

LAB = Path(__file__).resolve().parent / "xenlab"
EXITCLOCK = LAB / "exitclock.py"
sys.path.insert(0, str(LAB))
import exitclock  # noqa: E402  (a lab script, not a package)

#: The stamps are written to the millisecond.
STAMP_S = 0.001


def test_a_tail_gives_only_whole_lines_beyond_the_skipped_ones(tmp_path: Path) -> None:
    log = tmp_path / "guest.log"
    tail = exitclock._Tail(str(log), 2)
    assert tail.new_lines() == []  # no log yet
    log.write_text("one\ntwo\nthr")
    assert tail.new_lines() == []  # two skipped, the third not whole
    with log.open("a") as out:
        out.write("ee\nfour\n")
    assert tail.new_lines() == ["three", "four"]
    assert tail.new_lines() == []


def wait_for(path: Path, limit_s: float = 30.0) -> None:
    deadline = time.monotonic() + limit_s
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


def test_the_first_new_matching_line_is_stamped_not_the_skipped_ones(tmp_path: Path) -> None:
    old = tmp_path / "guest-domu.log"
    new = tmp_path / "guest-domu--incoming.log"  # created only after the watcher started
    old.write_text("domU counter 1\ndomU counter 2\ndomU counter 3\n")
    out = tmp_path / "next-line"
    watcher = subprocess.Popen([sys.executable, str(EXITCLOCK), "line", str(out), "domU counter [0-9]",
                                f"{old}:3", f"{new}:0"])
    try:
        wait_for(Path(f"{out}.ready"))
        written = time.clock_gettime(time.CLOCK_BOOTTIME)
        with old.open("a") as log:
            log.write("not a counter\ndomU coun")  # no match yet: the line is not whole
            log.flush()
            with new.open("w") as log_new:
                log_new.write("a banner\n")
            log.write("ter 4\n")
        assert watcher.wait(60) == 0
        stamped = float(out.read_text())
        assert stamped >= written - STAMP_S  # not one of the three lines it was told to skip
    finally:
        watcher.kill()
        watcher.wait()


def test_a_line_in_a_log_that_appears_later_is_seen(tmp_path: Path) -> None:
    later = tmp_path / "sub" / "guest.log"
    later.parent.mkdir()
    out = tmp_path / "next-line"
    watcher = subprocess.Popen([sys.executable, str(EXITCLOCK), "line", str(out), "counter [0-9]", f"{later}:0"])
    try:
        wait_for(Path(f"{out}.ready"))
        written = time.clock_gettime(time.CLOCK_BOOTTIME)
        later.write_text("counter 12\n")
        assert watcher.wait(60) == 0
        assert float(out.read_text()) >= written - STAMP_S
    finally:
        watcher.kill()
        watcher.wait()

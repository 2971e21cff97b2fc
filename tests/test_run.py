"""``remus`` as a user runs it: --blackhole on a simulated guest, live statistics on a
terminal only, Ctrl-C / SIGTERM, the summary, and the guest never left behind."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import alive, child_pids, repo_env, wait_until

ENV = repo_env()
GUEST = b"remus.sim.guest"


def checkpoints_in(path: Path) -> int:
    return path.read_text().count('"event": "checkpoint"') if path.exists() else 0


def test_blackhole_on_a_terminal_shows_live_statistics_and_ctrl_c_exits_0(tmp_path: Path) -> None:
    stats = tmp_path / "stats.json"
    pid, fd = pty.fork()
    if pid == 0:  # the child: remus on a terminal
        os.execvpe(sys.executable, [sys.executable, "-m", "remus.cli", "--blackhole", "-i", "50",
                                    "--stats-json", str(stats), "sim:demo"], ENV)
    output = b""
    guests: set[int] = set()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (guests and checkpoints_in(stats) >= 10 and b"#" in output):
        guests |= child_pids(pid, GUEST)  # only the guest this remus started
        if select.select([fd], [], [], 0.05)[0]:
            try:
                output += os.read(fd, 65536)
            except OSError:
                break
    assert guests, "remus should have started one simulated guest"
    os.kill(pid, signal.SIGINT)
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            break
        if not chunk:
            break
        output += chunk
    _, status = os.waitpid(pid, 0)
    text = output.decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0, text
    assert re.search(r"\r\x1b\[Ksim:demo  #\d+  pause [\d.]+ ms  dirty \d+ pg", text), text
    assert re.search(r"remus: sim:demo: \d+ checkpoints in [\d.]+ s", text), text
    assert "Traceback" not in text
    lines = [json.loads(line) for line in stats.read_text().splitlines()]
    assert lines[-1]["event"] == "summary" and lines[-1]["checkpoints"] == len(lines) - 1 >= 10
    wait_until(lambda: not any(alive(g) for g in guests), what="the simulated guest to exit with remus")


STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} remus: "


def test_not_on_a_terminal_writes_timestamped_events_and_sigterm_exits_0(tmp_path: Path) -> None:
    stats = tmp_path / "stats.json"
    proc = subprocess.Popen([sys.executable, "-m", "remus.cli", "--blackhole", "-i", "20", "--stats-json",
                             str(stats), "sim:quiet"],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: checkpoints_in(stats) >= 5, what="five checkpoints")
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    assert stdout == "*** signalled ***\n"  # as the xm-era remus printed
    lines = stderr.splitlines()
    assert re.fullmatch(STAMP + "start: protecting sim:quiet", lines[0]), stderr
    assert re.fullmatch(STAMP + r"first checkpoint done: \d+ pages, .* sim:quiet is protected", lines[2]), stderr
    assert re.fullmatch(STAMP + "stop: SIGTERM", lines[-4]), stderr
    assert lines[-3].startswith("remus: sim:quiet: ") and len(lines) == 7, stderr
    assert "\r" not in stderr


def test_unknown_xen_domain_on_a_machine_without_xen_is_one_clear_line() -> None:
    done = subprocess.run([sys.executable, "-m", "remus.cli", "--blackhole", "somedomain"], env=ENV,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert done.stdout == ""
    assert len(done.stderr.splitlines()) == 1 and "somedomain" in done.stderr, done.stderr


def test_only_a_run_with_a_backup_asks_for_what_the_backup_needs(monkeypatch: pytest.MonkeyPatch) -> None:
    # With --blackhole no backup will restore the domain: a Xen domain's libxl configuration
    # (xl list -l) is not read, so neither xl nor that configuration is needed.
    import remus.xen
    from remus.cli import parse
    from remus.errors import DomainNotFound
    from remus.run import run

    asked: list[bool] = []

    def fake_open(spec: str, *, for_backup: bool = True) -> None:
        asked.append(for_backup)
        raise DomainNotFound(f"domain {spec!r} does not exist")

    monkeypatch.setattr(remus.xen, "open_xen_domain", fake_open)
    assert run(parse(["--blackhole", "guest"])) == 1
    assert run(parse(["guest", "backuphost"])) == 1
    assert asked == [False, True]

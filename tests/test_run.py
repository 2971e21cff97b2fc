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

from tests.test_transport import ROOT

ENV = dict(os.environ, PYTHONPATH=str(ROOT))


def guest_pids() -> set[int]:
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"remus.sim.guest" in cmdline:
                pids.add(int(entry.name))
    return pids


def test_blackhole_on_a_terminal_shows_live_statistics_and_ctrl_c_exits_0(tmp_path: Path) -> None:
    before = guest_pids()
    stats = tmp_path / "stats.json"
    pid, fd = pty.fork()
    if pid == 0:  # the child: remus on a terminal
        os.execvpe(sys.executable, [sys.executable, "-m", "remus.cli", "--blackhole", "-i", "50",
                                    "--stats-json", str(stats), "sim:demo"], ENV)
    output = b""
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        if select.select([fd], [], [], 0.1)[0]:
            try:
                output += os.read(fd, 65536)
            except OSError:
                break
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
    lines = [json.loads(line) for line in stats.read_text().splitlines()]
    assert lines[-1]["event"] == "summary" and lines[-1]["checkpoints"] == len(lines) - 1 >= 10
    assert guest_pids() <= before, "the simulated guest must not outlive remus"


def test_not_on_a_terminal_prints_only_the_summary_and_sigterm_exits_0(tmp_path: Path) -> None:
    stats = tmp_path / "stats.json"
    proc = subprocess.Popen([sys.executable, "-m", "remus.cli", "--blackhole", "-i", "20", "--stats-json",
                             str(stats), "sim:quiet"],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (not stats.exists() or stats.read_text().count("\n") < 5):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=20)
    assert proc.returncode == 0
    assert stdout == "*** signalled ***\n"  # as the xm-era remus printed
    assert stderr.startswith("remus: sim:quiet: ") and len(stderr.splitlines()) == 4, stderr
    # The last line says what became of the domain: a simulated guest never outlives remus.
    assert stderr.splitlines()[-1] == ("remus: stopped (SIGTERM); the simulated guest quiet ends with remus, "
                                       "its output released")
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

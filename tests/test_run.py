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

from tests.helpers import wait_until, write_key_file
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


def children_of(pid: int) -> set[int]:
    """The simulated guests ``pid`` started (and that still run)."""
    found = set()
    for guest in guest_pids():
        try:
            if f"PPid:\t{pid}\n" in Path(f"/proc/{guest}/status").read_text():
                found.add(guest)
        except OSError:
            continue
    return found


def test_blackhole_on_a_terminal_shows_live_statistics_and_ctrl_c_exits_0(tmp_path: Path) -> None:
    stats = tmp_path / "stats.json"
    pid, fd = pty.fork()
    if pid == 0:  # the child: remus on a terminal
        os.execvpe(sys.executable, [sys.executable, "-m", "remus.cli", "--blackhole", "-i", "50",
                                    "--stats-json", str(stats), "sim:demo"], ENV)
    output = b""
    deadline = time.monotonic() + 60
    ours: set[int] = set()
    while time.monotonic() < deadline and (not stats.exists() or stats.read_text().count("\n") < 12):
        ours |= children_of(pid)
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
    assert ours, "the simulated guest was never seen"
    assert not ours & guest_pids(), "the simulated guest must not outlive remus"


STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} remus: "


def test_not_on_a_terminal_writes_timestamped_events_and_sigterm_exits_0(tmp_path: Path) -> None:
    stats = tmp_path / "stats.json"
    proc = subprocess.Popen([sys.executable, "-m", "remus.cli", "--blackhole", "-i", "20", "--stats-json",
                             str(stats), "sim:quiet"],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: stats.exists() and stats.read_text().count("\n") >= 5, what="five checkpoints")
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    assert stdout == "*** signalled ***\n"  # as the xm-era remus printed
    # Off a terminal (systemd, nohup, a log file): one timestamped line per event, then the summary.
    lines = stderr.splitlines()
    assert re.fullmatch(STAMP + "start: protecting sim:quiet", lines[0]), stderr
    assert re.fullmatch(STAMP + r"first checkpoint: sending \d+ pages \(.*\)", lines[1]), stderr
    assert re.fullmatch(STAMP + r"first checkpoint done: \d+ pages, .* sim:quiet is protected", lines[2]), stderr
    assert re.fullmatch(STAMP + "stop: SIGTERM", lines[3]), stderr
    assert lines[4].startswith("remus: sim:quiet: ") and len(lines) == 8, stderr
    # The last line says what became of the domain: a simulated guest never outlives remus.
    assert lines[-1] == "remus: stopped (SIGTERM); the simulated guest quiet ends with remus, its output released"
    assert "\r" not in stderr


def test_unknown_xen_domain_on_a_machine_without_xen_is_one_clear_line() -> None:
    done = subprocess.run([sys.executable, "-m", "remus.cli", "--blackhole", "somedomain"], env=ENV,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert done.stdout == ""
    assert len(done.stderr.splitlines()) == 1 and "somedomain" in done.stderr, done.stderr


def test_only_a_run_with_a_backup_asks_for_what_the_backup_needs(monkeypatch: pytest.MonkeyPatch,
                                                                tmp_path: Path) -> None:
    # With --blackhole no backup will restore the domain: a Xen domain's libxl configuration
    # (xl list -l) is not read, so neither xl nor that configuration is needed.
    import remus.xen
    from remus.cli import parse
    from remus.errors import DomainNotFound
    from remus.run import run

    asked: list[bool] = []

    def fake_open(spec: str, *, for_backup: bool = True, disk_replication: bool = True) -> None:
        asked.append(for_backup)
        raise DomainNotFound(f"domain {spec!r} does not exist")

    monkeypatch.setattr(remus.xen, "open_xen_domain", fake_open)
    assert run(parse(["--blackhole", "guest"])) == 1
    assert run(parse(["guest", "backuphost", "--key-file", write_key_file(tmp_path)])) == 1
    assert asked == [False, True]


# --------------------------------------------------------------------------- stops during startup (issue 9)


def start_receiver(tmp_path: Path) -> tuple[subprocess.Popen[bytes], int, Path]:
    from tests.helpers import free_loopback_port

    port = free_loopback_port()
    events = tmp_path / "events"
    receiver = subprocess.Popen([sys.executable, str(ROOT / "bin" / "remus-receiver"), "--listen", "127.0.0.1",
                                 "--port", str(port), "--events-json", str(events), "--once",
                                 "--key-file", write_key_file(tmp_path), "--control", str(tmp_path / "sock")],
                                env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while "listening" not in (events.read_text() if events.exists() else ""):
        assert time.monotonic() < deadline and receiver.poll() is None
        time.sleep(0.02)
    return receiver, port, events


@pytest.mark.parametrize("signals", [["SIGINT"], ["SIGINT", "SIGINT"], ["SIGTERM"]], ids=["one", "two", "term"])
def test_a_stop_during_the_first_checkpoint_is_an_orderly_close(tmp_path: Path, signals: list[str]) -> None:
    receiver, port, events = start_receiver(tmp_path)
    out = tmp_path / "out"
    try:
        # A first checkpoint of 48 MiB, uncompressed: the stop lands while it is on its way.
        primary = subprocess.Popen([sys.executable, "-m", "remus.cli", "--no-compression", "--key-file",
                                    str(tmp_path / "authkey"),
                                    f"sim:big,memory=48M,packet_rate=200,output={out}", "127.0.0.1", "-p",
                                    str(port)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while '"session"' not in events.read_text():
            assert time.monotonic() < deadline and primary.poll() is None
            time.sleep(0.01)
        for name in signals:
            primary.send_signal(getattr(signal, name))
            time.sleep(0.05)  # two separate keypresses
        _stdout, stderr = primary.communicate(timeout=60)
        assert receiver.wait(timeout=30) == 0
    finally:
        for proc in (receiver,):
            if proc.poll() is None:
                proc.kill()
    assert primary.returncode == 0, stderr
    kinds = [json.loads(line)["event"] for line in events.read_text().splitlines()]
    assert "closed" in kinds and "activated" not in kinds, kinds
    # The stop may land before the backup's ACK 0 reached the primary: CLOSE follows the session at once.
    last = stderr.splitlines()[-1]
    assert last.startswith(f"remus: stopped ({signals[0]}); "), last
    assert ("the backup confirmed the end of the session; " in last
            or "the backup had not accepted the session yet; " in last), last
    assert last.endswith("the simulated guest big ends with remus, its output released"), last


def syn_sent_to(port: int) -> int:
    """How many IPv4 sockets on this host are in SYN_SENT towards 127.0.0.1:``port``."""
    rows = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return sum(1 for row in rows if row.split()[2] == f"0100007F:{port:04X}" and row.split()[3] == "02")


def test_a_stop_while_connecting_ends_at_once(tmp_path: Path) -> None:
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = [socket.socket() for _ in range(3)]
    for s in fillers:  # a full accept queue: further SYNs are dropped, connect() hangs
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
    try:
        before = syn_sent_to(port)
        primary = subprocess.Popen([sys.executable, "-m", "remus.cli", "--key-file", write_key_file(tmp_path),
                                    "sim:c,memory=2M", "127.0.0.1", "-p",
                                    str(port)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # Wait until remus itself is connecting (one more SYN_SENT socket to the port than the
        # fillers left): a signal any earlier would stop it before protection began.
        connecting = time.monotonic() + 30
        while syn_sent_to(port) <= before:
            assert time.monotonic() < connecting and primary.poll() is None
            time.sleep(0.02)
        primary.send_signal(signal.SIGINT)
        started = time.monotonic()
        _stdout, stderr = primary.communicate(timeout=30)
        assert time.monotonic() - started < 5  # not the 10 s connect timeout
    finally:
        for s in [*fillers, listener]:
            s.close()
    assert primary.returncode == 0, stderr
    assert stderr.splitlines()[-1] == ("remus: stopped (SIGINT); the backup had not accepted the session yet; "
                                       "the simulated guest c ends with remus, its output released"), stderr


def test_a_stop_while_opening_the_domain_protects_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    import remus.run
    from remus.cli import parse
    from remus.sim.domain import SimulatedDomain
    from remus.sim.spec import parse_sim_spec

    opened: list[SimulatedDomain] = []

    def open_slowly(spec: str, *, for_backup: bool = True, disk_replication: bool = True) -> SimulatedDomain:
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the domain is being opened
        opened.append(SimulatedDomain(parse_sim_spec(spec)))
        return opened[0]

    monkeypatch.setattr(remus.run, "open_domain", open_slowly)
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        assert remus.run.run(parse(["sim:o,memory=2M", "127.0.0.1", "-p", "1", "--key-file",
                                    write_key_file(tmp_path)])) == 0
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    assert capsys.readouterr().err == ("remus: stopped (SIGINT) before protection began; "
                                       "the simulated guest o ends with remus\n")
    assert opened[0].pid is None  # closed: the guest is gone

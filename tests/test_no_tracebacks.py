"""No command ever shows a traceback: every entry point driven through bad inputs and signals.

Each case runs a command of this tree as a user would (its ``bin/`` script, or ``python -m
remus``), checks its exit status (2: usage error, 1: failure, 0: help, version or a requested
stop) and its message, and fails on any "Traceback" on stdout or stderr.  Signals are sent when a
condition is met (a line on stderr or stdout, a size of the process), never after a fixed sleep.

Cases that fail today because of code owned by another issue are ``xfail(strict=True)`` with the
issue named in the reason, so that they show up as XPASS (a failure) once fixed: then drop the mark.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import pytest

from remus import __version__
from tests.helpers import ROOT, repo_env, wait_until, write_key_file

#: How each command is started: its script in bin/ (what the package installs), or a module.
COMMANDS: dict[str, list[str]] = {
    "remus": [sys.executable, str(ROOT / "bin" / "remus")],
    "python -m remus": [sys.executable, "-m", "remus"],
    "remus-receiver": [sys.executable, str(ROOT / "bin" / "remus-receiver")],
    "remus-demo": [sys.executable, str(ROOT / "bin" / "remus-demo")],
    "remus-netbuf-cleanup": [sys.executable, str(ROOT / "bin" / "remus-netbuf-cleanup")],
    "remus-stats": [sys.executable, str(ROOT / "bin" / "remus-stats")],
    "remus-keygen": [sys.executable, str(ROOT / "bin" / "remus-keygen")],
}



def prog_name(command: str) -> str:
    return "remus" if command == "python -m remus" else command


def argv_of(command: str) -> list[str]:
    argv = COMMANDS[command]
    if argv[1].endswith("remus-keygen") and not Path(argv[1]).exists():
        pytest.skip("this tree has no remus-keygen yet")
    return argv


class Run:
    """A command started with its output read by two threads, so that a test can wait on a line."""

    def __init__(self, command: str, args: Sequence[str], stdin: Optional[int] = subprocess.DEVNULL) -> None:
        # A session of its own: a Ctrl-C from "the terminal" (killpg) reaches this command's
        # processes and never the test's.
        self.proc = subprocess.Popen([*argv_of(command), *args], env=repo_env(), stdin=stdin, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        self.out: list[str] = []
        self.err: list[str] = []
        self._readers = [threading.Thread(target=self._read, args=(s, lines), daemon=True)
                         for s, lines in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(stream: object, lines: list[str]) -> None:
        for line in stream:  # type: ignore[attr-defined]
            lines.append(line)

    def wait_line(self, pattern: str, where: str = "err", timeout_s: float = 60.0) -> None:
        lines = self.err if where == "err" else self.out
        wait_until(lambda: any(re.search(pattern, line) for line in lines) or self.proc.poll() is not None,
                   timeout_s, f"{pattern!r} on std{where}")
        assert any(re.search(pattern, line) for line in lines), self.text()

    def finish(self, timeout_s: float = 60.0) -> int:
        try:
            status = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"did not exit within {timeout_s:.0f} s:\n{self.text()}") from None
        for reader in self._readers:
            reader.join(timeout=10)
        return status

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def text(self) -> str:
        return "".join(self.out) + "".join(self.err)


def check_no_traceback(run: Run) -> None:
    assert "Traceback" not in run.text(), run.text()


# --------------------------------------------------------------------------- bad inputs


@dataclass
class Case:
    command: str
    args: list[str]
    status: int
    stderr: str = ""  # a regex the whole of stderr must match (empty: no check)
    stdout: str = ""
    xfail: str = ""
    slow: bool = False
    extra: dict[str, str] = field(default_factory=dict)


def usage_line(command: str, message: str) -> str:
    prog = prog_name(command)
    return re.escape(f"{prog}: error: {message} (see {prog} --help)") + r"\n"


def front_end_cases() -> list[Case]:
    cases = []
    for command in COMMANDS:
        prog = prog_name(command)
        cases += [
            Case(command, ["--bogus"], 2, usage_line(command, "no such option: --bogus")),
            Case(command, ["--version"], 0, "", re.escape(f"{prog} {__version__}") + r"\n"),
            Case(command, ["--help"], 0, "", r"Usage:\s+" + re.escape(prog) + r" [\s\S]*--help[\s\S]*"),
        ]
    return cases


BAD_INPUTS = front_end_cases() + [
    # bad values, each naming its option
    Case("remus", ["-i", "abc", "sim:x"], 2, usage_line("remus", "option -i: invalid integer value: 'abc'")),
    Case("remus", ["--ack-timeout=abc", "sim:x"], 2,
         usage_line("remus", "option --ack-timeout: invalid integer value: 'abc'")),
    Case("python -m remus", ["-p", "99999", "sim:x"], 2, r"remus: error: option -p/--port: .*\n"),
    Case("remus-receiver", ["--port=abc"], 2,
         usage_line("remus-receiver", "option --port: not a whole number: 'abc'")),
    Case("remus-demo", ["--seconds=abc"], 2, usage_line("remus-demo", "option --seconds: not a number: 'abc'")),
    Case("remus-demo", ["--memory=100T"], 2,
         usage_line("remus-demo", "option --memory: 100T is not between 1M and 16G")),
    Case("remus-demo", ["-i", "-5"], 2, usage_line("remus-demo", "option --interval: -5 is not between 1 and 3600000")),
    Case("remus-netbuf-cleanup", ["-x"], 2, usage_line("remus-netbuf-cleanup", "no such option: -x")),
    Case("remus-stats", [], 2, r"remus-stats: error: wrong arguments; usage: remus-stats \[options\] FILE .*\n"),
    Case("remus-stats", ["--plot=x.pdf", "f"], 2,
         usage_line("remus-stats", "option --plot: x.pdf must end in .png or .svg")),
    # unwritable or missing paths: one line, exit 1
    Case("remus", ["--stats-json", "/proc/x/y", "--blackhole", "sim:x,memory=4M"], 1,
         r"remus: cannot write statistics to /proc/x/y: No such file or directory .*\n"),
    Case("remus", ["--blackhole", "sim:x,memory=4M,output=/proc/x/y"], 1, r"remus: .*/proc/x/y.*\n"),
    Case("remus-receiver", ["--events-json", "/proc/x/y", "--listen", "127.0.0.1", "--port", "1",
                            "--key-file", str(ROOT / "tests" / "no-such-key")], 1,
         r"remus-receiver: .*/proc/x/y.*\n"),
    Case("remus-demo", ["--keep=/proc/x/y"], 1, r"remus-demo: No such file or directory: /proc/x(/y)?\n"),
    Case("remus-stats", ["/proc/x/y"], 1, r"remus-stats: No such file or directory: /proc/x/y\n"),
    # oversized guests: the size as typed, exit 2
    Case("remus", ["--blackhole", "sim:x,memory=100G"], 2, r"remus: error: .*memory=100G.*16G.*\n"),
]


def case_id(case: Case) -> str:
    return f"{case.command}:{' '.join(case.args) or '(none)'}"


def marks(case: Case) -> list[pytest.MarkDecorator]:
    out = [pytest.mark.xfail(strict=True, reason=case.xfail)] if case.xfail else []
    return out + ([pytest.mark.slow] if case.slow else [])


@pytest.mark.parametrize("case", [pytest.param(c, id=case_id(c), marks=marks(c)) for c in BAD_INPUTS])
def test_bad_input_is_one_line_and_the_right_status(case: Case) -> None:
    run = Run(case.command, case.args)
    try:
        status = run.finish()
    finally:
        run.kill()
    check_no_traceback(run)
    assert status == case.status, run.text()
    if case.stderr:
        assert re.fullmatch(case.stderr, "".join(run.err)), "".join(run.err)
    if case.stdout:
        assert re.fullmatch(case.stdout, "".join(run.out)), "".join(run.out)


@pytest.mark.slow
def test_a_stats_plot_to_an_unwritable_path_is_one_line(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="the [plot] extra (matplotlib) is not installed")
    stats = tmp_path / "s.jsonl"
    stats.write_text('{"event": "checkpoint", "seq": 1, "pause_ms": 1, "dirty_pages": 1, "raw_bytes": 1, '
                     '"wire_bytes": 1, "ack_ms": 1, "period_ms": null, "overruns": 0}\n')
    run = Run("remus-stats", ["--plot", "/proc/x/y.png", str(stats)])
    status = run.finish()
    check_no_traceback(run)
    assert status == 1 and re.fullmatch(r"remus-stats: No such file or directory: .*/proc/x/y.png\n",
                                        "".join(run.err)), run.text()


# --------------------------------------------------------------------------- signals


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class SignalCase:
    """Send each signal of ``steps`` once its moment has come.

    A signal is ``INT`` or ``TERM`` (to the command) or ``PG-INT`` (to its process group, as a
    terminal's Ctrl-C).  A moment is ``err:REGEX`` or ``out:REGEX`` (a line on stderr or stdout), ``rss:MIB`` (the
    process has grown to MIB MiB), ``now``, or several of those joined by ``|`` (whichever comes
    first).  A second signal is sent at a later moment than the first, so that the first has been
    handled (two signals sent at once reach Python as one).
    """

    command: str
    args: list[str]
    steps: list[tuple[str, str]]
    status: int = 0
    xfail: str = ""
    slow: bool = False


SIM = "sim:t,memory=8M,dirty_rate=2000"
BLACKHOLE = ["--blackhole", "-i", "20", SIM]
FIRST_CHECKPOINT = "err:remus: first checkpoint: sending"
PROTECTED = "err:remus: first checkpoint done"
STOPPING = "err:remus: stop: "
LISTENING = "err:listening on"
RECEIVER = ["--listen", "127.0.0.1", "--port", "{port}", "--key-file", "{key}", "--control", "{dir}/receiver.sock"]

SIGNAL_CASES = [
    # the quick run keeps one case per command and kind of moment; the rest are marked slow
    SignalCase("remus", BLACKHOLE, [(FIRST_CHECKPOINT, "INT")]),
    SignalCase("remus", BLACKHOLE, [(FIRST_CHECKPOINT, "TERM")], slow=True),
    SignalCase("remus", BLACKHOLE, [(FIRST_CHECKPOINT, "INT"), ("now", "INT")], slow=True),
    SignalCase("remus", BLACKHOLE, [(PROTECTED, "INT")], slow=True),
    SignalCase("remus", BLACKHOLE, [(PROTECTED, "TERM")]),
    SignalCase("remus", BLACKHOLE, [(PROTECTED, "INT"), (STOPPING, "INT")]),
    SignalCase("remus", BLACKHOLE, [(PROTECTED, "TERM"), (STOPPING, "TERM")], slow=True),
    SignalCase("python -m remus", BLACKHOLE, [(PROTECTED, "INT")], slow=True),
    # while a big guest's memory is being made (before any checkpoint): the process grows
    SignalCase("remus", ["--blackhole", "sim:t,memory=256M"],
               [("rss:64", "INT"), ("rss:300|err:remus: start:", "INT")], slow=True),
    # a guest of 512M, stopped once protected
    SignalCase("remus", ["--blackhole", "sim:t,memory=512M,dirty_rate=100"], [(PROTECTED, "INT")], slow=True),
    SignalCase("remus-receiver", RECEIVER, [(LISTENING, "INT")]),
    SignalCase("remus-receiver", RECEIVER, [(LISTENING, "TERM")], slow=True),
    SignalCase("remus-receiver", RECEIVER, [(LISTENING, "INT"), ("now", "INT")], slow=True),
    SignalCase("remus-demo", ["--memory=8M"], [(r"out:\[demo\] primary:", "INT")], slow=True),
    SignalCase("remus-demo", ["--memory=8M"], [(r"out:\[demo\] checkpoint", "TERM")], slow=True),
    SignalCase("remus-demo", ["--memory=8M"],
               [(r"out:\[demo\] checkpoint", "INT"), (r"out:\[demo\] stopping", "INT")]),
    # Ctrl-C on a terminal: SIGINT to the whole process group (the command and its children)
    SignalCase("remus", BLACKHOLE, [(PROTECTED, "PG-INT")]),
    SignalCase("remus-demo", ["--memory=8M"], [(r"out:\[demo\] checkpoint", "PG-INT")]),
]


def rss_mib(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    m = re.search(r"VmRSS:\s+(\d+) kB", status)
    return int(m.group(1)) // 1024 if m else 0


def moment_came(run: Run, moment: str) -> bool:
    for alternative in moment.split("|"):
        kind, _, what = alternative.partition(":")
        if kind == "now":
            return True
        if kind == "rss" and rss_mib(run.proc.pid) >= int(what):
            return True
        lines = run.err if kind == "err" else run.out if kind == "out" else []
        if any(re.search(what, line) for line in lines):
            return True
    return False


def signal_id(case: SignalCase) -> str:
    return f"{case.command}:" + ",".join(f"{sig}@{moment}" for moment, sig in case.steps)


@pytest.mark.parametrize("case", [
    pytest.param(c, id=signal_id(c), marks=marks(Case(c.command, c.args, c.status, xfail=c.xfail, slow=c.slow)))
    for c in SIGNAL_CASES
])
def test_signals_at_any_moment_are_a_clean_stop(case: SignalCase, tmp_path: Path) -> None:
    fill = {"{port}": str(free_port()), "{key}": write_key_file(tmp_path), "{dir}": str(tmp_path)}
    args = [re.sub(r"\{\w+\}", lambda m: fill[m.group(0)], a) for a in case.args]
    run = Run(case.command, args)
    try:
        for moment, name in case.steps:
            wait_until(lambda: moment_came(run, moment) or run.proc.poll() is not None, 120, moment, poll_s=0.002)
            if run.proc.poll() is not None:
                break
            if name.startswith("PG-"):
                os.killpg(run.proc.pid, getattr(signal, f"SIG{name[3:]}"))
            else:
                run.proc.send_signal(getattr(signal, f"SIG{name}"))
        status = run.finish()
    finally:
        run.kill()
    check_no_traceback(run)
    assert status == case.status, run.text()

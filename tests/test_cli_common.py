"""The one front end of remus-demo, remus-netbuf-cleanup and remus-stats: help, version, named
errors and exit statuses, whichever docopt is installed (CI runs this module on Debian's docopt 0.6.2
and on docopt-ng)."""

from __future__ import annotations

import signal
from typing import Any

import pytest

from remus import __version__
from remus.cli_common import Args, ShowText, opt_float, opt_int, opt_size, parse, run_command, size_bytes
from remus.errors import RemusError, UsageError

DOC = """Usage: tool [options] FILE

Options:
  -h, --help         show this help message and exit
  -n, --dry-run      change nothing
  -i MS, --interval=MS  an interval
  --seconds=S        how long
  --memory=SIZE      how much
  --state-dir=DIR    where [default: /run/x]
  --version          show the version and exit
"""


def test_help_and_version_win_wherever_they_stand() -> None:
    for argv in (["-h"], ["--help"], ["FILE", "--bogus", "-h"], ["--he"], ["-nh"]):
        if argv == ["FILE", "--bogus", "-h"]:
            with pytest.raises(UsageError, match="no such option: --bogus"):
                parse(DOC, "tool", argv)
            continue
        with pytest.raises(ShowText) as shown:
            parse(DOC, "tool", argv)
        assert shown.value.text == DOC
    with pytest.raises(ShowText) as shown:
        parse(DOC, "tool", ["--version"])
    assert shown.value.text == f"tool {__version__}\n"


@pytest.mark.parametrize("argv, message", [
    (["--bogus", "f"], "no such option: --bogus"),
    (["-x", "f"], "no such option: -x"),
    (["-nx", "f"], "no such option: -x"),
    (["--seconds"], "--seconds option requires a value"),
    (["-i"], "-i option requires a value"),
    (["--dry-run=yes", "f"], "--dry-run option does not take a value"),
    (["--help=1"], "--help option does not take a value"),
    (["--s", "f"], r"ambiguous option: --s \(--seconds, --state-dir\?\)"),
    ([], "wrong arguments; usage: tool \\[options\\] FILE"),
    (["a", "b"], "wrong arguments"),
])
def test_malformed_command_lines_name_what_is_wrong(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse(DOC, "tool", argv)


def test_values_reach_the_command_with_defaults_and_prefixes() -> None:
    args = parse(DOC, "tool", ["--sec=2.5", "-i", "7", "f"])
    assert args["--seconds"] == "2.5" and args["--interval"] == "7" and args["FILE"] == "f"
    assert args["--state-dir"] == "/run/x"
    assert parse(DOC, "tool", ["-ni7", "f"])["--interval"] == "7"


def test_converters_name_the_option() -> None:
    args: dict[str, Any] = {"--seconds": "abc", "--interval": "0", "--memory": "12Q", "--n": None}
    with pytest.raises(UsageError, match="option --seconds: not a number: 'abc'"):
        opt_float(args, "--seconds", 5.0, 0.1, 10.0)
    with pytest.raises(UsageError, match="option --interval: 0 is not between 1 and 100"):
        opt_int(args, "--interval", 5, 1, 100)
    with pytest.raises(UsageError, match="option --memory: not a size such as 64M or 2G: '12Q'"):
        opt_size(args, "--memory", "64M", 1, 1 << 40)
    with pytest.raises(UsageError, match="option --memory: 32G is not between 1M and 16G"):
        opt_size({"--memory": "32G"}, "--memory", "64M", 1 << 20, 16 << 30)
    assert opt_int(args, "--n", 5, 1, 100) == 5
    assert opt_size({"--memory": "16G"}, "--memory", "64M", 1 << 20, 16 << 30) == "16G"
    with pytest.raises(UsageError, match="option --seconds: nan is not between 0.1 and 10"):
        opt_float({"--seconds": "nan"}, "--seconds", 5.0, 0.1, 10.0)


def run(body: Any, argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = run_command("tool", DOC, body, argv)
    out, err = capsys.readouterr()
    return status, out, err


def test_exit_statuses_and_one_line_messages(capsys: pytest.CaptureFixture[str]) -> None:
    def ok(args: Args) -> int:
        return 0

    assert run(ok, ["--bogus"], capsys) == (2, "", "tool: error: no such option: --bogus (see tool --help)\n")
    assert run(ok, ["--version"], capsys) == (0, f"tool {__version__}\n", "")
    assert run(ok, ["f"], capsys) == (0, "", "")

    def usage(args: Args) -> int:
        opt_float(args, "--seconds", 5.0, 0.1, 10.0)
        return 0

    assert run(usage, ["--seconds=abc", "f"], capsys) == (
        2, "", "tool: error: option --seconds: not a number: 'abc' (see tool --help)\n")

    def fails(args: Args) -> int:
        raise RemusError("the backup went away")

    assert run(fails, ["f"], capsys) == (1, "", "tool: the backup went away\n")

    def no_file(args: Args) -> int:
        open("/nonexistent/dir/file")
        return 0

    assert run(no_file, ["f"], capsys) == (1, "", "tool: No such file or directory: /nonexistent/dir/file\n")


def test_sigint_and_sigterm_are_a_requested_stop(capsys: pytest.CaptureFixture[str]) -> None:
    handlers = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    try:
        for sig, name in ((signal.SIGINT, "SIGINT"), (signal.SIGTERM, "SIGTERM")):
            def body(args: Args) -> int:
                signal.raise_signal(sig)
                raise AssertionError("the signal should have stopped the body")

            assert run(body, ["f"], capsys) == (0, "", f"tool: stopped by {name}\n")
            # winding down, a second signal is ignored rather than a traceback
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            signal.signal(signal.SIGINT, handlers[0])
            signal.signal(signal.SIGTERM, handlers[1])
    finally:
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])


@pytest.mark.parametrize("typed, expected", [("512M", 512 << 20), ("2G", 2 << 30), ("2GiB", 2 << 30),
                                              ("4096K", 4 << 20), ("1t", 1 << 40)])
def test_remus_receiver_max_memory_is_read_in_bytes(typed: str, expected: int) -> None:
    from remus.backup.cli import parse as parse_receiver

    assert parse_receiver(["--max-memory", typed])["max_memory"] == expected


def test_a_size_that_is_not_one_names_the_option() -> None:
    with pytest.raises(UsageError, match=r"option --memory: not a size such as 64M or 2G: '12Q'"):
        size_bytes("--memory", "12Q")

"""``remus-keygen``: through ``main(argv)`` and as a real command."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from remus import __version__
from remus.link.keygen import HELP, KeygenArgs, main, parse
from remus.link.keys import DEFAULT_KEY_FILE, NEW_KEY_BYTES, load_key

BIN = Path(__file__).resolve().parent.parent / "bin" / "remus-keygen"


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = main(argv)
    out, err = capsys.readouterr()
    return status, out, err


def test_defaults() -> None:
    assert parse([]) == KeygenArgs(DEFAULT_KEY_FILE, False)
    assert DEFAULT_KEY_FILE == "/etc/remus/authkey"


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--key-file=/k"], KeygenArgs("/k", False)),
        (["--key-file", "/k"], KeygenArgs("/k", False)),
        (["--force", "--key-file=/k"], KeygenArgs("/k", True)),
        (["--key=/k", "--fo"], KeygenArgs("/k", True)),  # unique prefixes, as docopt allows
    ],
)
def test_options(argv: list[str], expected: KeygenArgs) -> None:
    assert parse(argv) == expected


def test_writes_a_key_and_says_what_to_do_next(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "etc" / "remus" / "authkey"
    status, out, err = run_main([f"--key-file={path}"], capsys)
    assert (status, err) == (0, "")
    assert len(load_key(str(path))) == NEW_KEY_BYTES
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert f"wrote a new key to {path}" in out
    assert f"scp -p {path} root@OTHER-HOST:{path}" in out


def test_refuses_to_overwrite_without_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "authkey"
    assert run_main([f"--key-file={path}"], capsys)[0] == 0
    first = path.read_bytes()
    status, out, err = run_main([f"--key-file={path}"], capsys)
    assert (status, out) == (1, "")
    assert err.count("\n") == 1 and err.startswith("remus-keygen: key file ") and "--force" in err
    assert path.read_bytes() == first
    status, _out, err = run_main(["--force", f"--key-file={path}"], capsys)
    assert (status, err) == (0, "")
    assert path.read_bytes() != first


@pytest.mark.parametrize("flag", ["-h", "--help", "--he"])
def test_help(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_main([flag], capsys) == (0, HELP, "")
    assert run_main(["--force", flag, "--bogus-after"], capsys)[0] == 2  # every option is checked


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_main(["--version"], capsys) == (0, f"remus-keygen {__version__}\n", "")


@pytest.mark.parametrize(
    "argv, reason",
    [
        (["--bogus"], "no such option: --bogus"),
        (["-x"], "no such option: -x"),
        (["-hx"], "no such option: -hx"),
        (["--force=yes"], "option --force does not take a value"),
        (["--key-file"], "option --key-file requires a value"),
        (["--key-file="], "option --key-file: the value is empty"),
        (["somewhere"], "unexpected argument: 'somewhere'"),
        (["--", "x"], "unexpected argument: '--'"),
    ],
)
def test_usage_errors_name_the_culprit(argv: list[str], reason: str, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run_main(argv, capsys)
    assert (status, out) == (2, "")
    assert err == f"remus-keygen: error: {reason} (see remus-keygen --help)\n"


def test_the_help_lists_every_option() -> None:
    for option in ("--key-file=FILE", "--force", "-h, --help", "--version"):
        assert option in HELP


def test_the_installed_command(tmp_path: Path) -> None:
    """bin/remus-keygen as a process: exit codes 0, 1 and 2 with one-line messages."""
    path = tmp_path / "authkey"
    env = dict(os.environ, PYTHONPATH=str(BIN.parent.parent))

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(BIN), *args], capture_output=True, text=True, env=env,
                              timeout=60, check=False)

    made = run("--key-file", str(path))
    assert made.returncode == 0, made.stderr
    assert "scp -p" in made.stdout
    assert len(load_key(str(path))) == NEW_KEY_BYTES
    again = run("--key-file", str(path))
    assert again.returncode == 1 and again.stderr.count("\n") == 1 and "already exists" in again.stderr
    bad = run("--nope")
    assert bad.returncode == 2
    assert bad.stderr == "remus-keygen: error: no such option: --nope (see remus-keygen --help)\n"
    assert run("--help").stdout == HELP

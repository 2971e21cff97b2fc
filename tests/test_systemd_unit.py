"""contrib/systemd: remus-receiver.service and its /etc/default file.

The unit is read as systemd reads it (keys of [Unit], [Service], [Install]),
checked by ``systemd-analyze verify`` where systemd is installed, and the
default file's options are run through the receiver's own option parser, so a
renamed option breaks this test rather than a host's boot.
"""

from __future__ import annotations

import configparser
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "contrib" / "systemd" / "remus-receiver.service"
DEFAULT = ROOT / "contrib" / "systemd" / "remus-receiver.default"
RECEIVER = Path(sys.executable).parent / "remus-receiver"


def read_unit(text: str) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=True, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    parser.read_string(text)
    return parser


def default_options() -> list[str]:
    """REMUS_RECEIVER_OPTS from the default file, split as systemd splits $VAR."""
    assignments = [line for line in DEFAULT.read_text().splitlines() if line and not line.startswith("#")]
    assert len(assignments) == 1, assignments
    name, _, value = assignments[0].partition("=")
    assert name == "REMUS_RECEIVER_OPTS"
    (unquoted,) = shlex.split(value)
    return unquoted.split()


def receiver_help() -> str:
    return subprocess.run([str(RECEIVER), "--help"], capture_output=True, text=True, check=True).stdout


def test_unit_keys() -> None:
    unit = read_unit(UNIT.read_text())
    assert unit.sections() == ["Unit", "Service", "Install"]
    after = unit["Unit"]["After"].split()
    assert "network-online.target" in after
    assert {"xenstored.service", "xen.service"} <= set(after)
    assert "network-online.target" in unit["Unit"]["Wants"].split()
    # Xen is ordered after, never required: a host without Xen still starts it.
    assert not any(key in unit["Unit"] for key in ("Requires", "Requisite", "BindsTo"))
    service = unit["Service"]
    assert service["Type"] == "simple"
    assert service["EnvironmentFile"] == "-/etc/default/remus-receiver"
    assert service["ExecStart"] == "/usr/bin/remus-receiver $REMUS_RECEIVER_OPTS"
    assert service["Restart"] == "on-failure"
    assert service["RuntimeDirectory"] == "remus"
    # /run/remus also holds the primary's netbuf records: never removed on stop.
    assert service["RuntimeDirectoryPreserve"] == "yes"
    assert service["KillMode"] == "process"
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_default_file_options_parse() -> None:
    options = default_options()
    assert "--control=/run/remus/receiver.sock" in options  # inside RuntimeDirectory=remus
    from remus.backup.cli import parse

    settings = parse(options)
    assert settings["command"] == "serve"
    assert (settings["port"], settings["control"]) == (8002, "/run/remus/receiver.sock")


def test_default_file_documents_only_real_options() -> None:
    documented = set(re.findall(r"^#\s+(--[a-z-]+)", DEFAULT.read_text(), re.MULTILINE))
    assert {"--port", "--key-file", "--takeover", "--fence", "--control"} <= documented
    offered = set(re.findall(r"--[a-z-]+", receiver_help()))
    assert documented <= offered, f"documented but not in remus-receiver --help: {documented - offered}"


def verify(unit_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", "verify", str(unit_dir / "remus-receiver.service")],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install systemd)")
    # verify checks that ExecStart's program exists: point it at this checkout's.
    text = UNIT.read_text().replace("/usr/bin/remus-receiver", str(RECEIVER))
    (tmp_path / "remus-receiver.service").write_text(text)
    result = verify(tmp_path)
    # verify exits 0 on keys it ignores, so its warnings count as failures.
    assert result.returncode == 0 and result.stderr == "" and result.stdout == "", result
    # The check can fail: a key systemd cannot parse is reported.
    (tmp_path / "remus-receiver.service").write_text(text.replace("Restart=on-failure", "Restart=sometimes"))
    broken = verify(tmp_path)
    assert "sometimes" in broken.stderr

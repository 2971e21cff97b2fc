"""The lab's shell helpers (``tests/xenlab/dom0-lib.sh``) that can run without Xen.

``lab_xl_create`` is run by ``sh`` against a fake ``xl`` on ``PATH`` that fails its first
creates as libxl does when xenconsoled is late, and logs every call.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

LIB = Path(__file__).resolve().parent / "xenlab" / "dom0-lib.sh"

FAKE_XL = """#!/bin/sh
echo "$*" >> "$XL_LOG"
if [ "$1" = create ]; then
    n=$(cat "$XL_FAILS")
    if [ "$n" -gt 0 ]; then
        echo $((n - 1)) > "$XL_FAILS"
        echo "libxl: error: console_xswait_callback: domain 1 console tty: timed out" >&2
        exit 3
    fi
fi
exit 0
"""


def run_create(tmp_path: Path, fails: int, *args: str) -> tuple[int, list[str], str]:
    """Run ``lab_xl_create ARGS`` with an ``xl`` that fails FAILS creates; (rc, xl calls, out)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    xl = bindir / "xl"
    xl.write_text(FAKE_XL)
    xl.chmod(0o755)
    (tmp_path / "fails").write_text(f"{fails}\n")
    log = tmp_path / "xl.log"
    log.write_text("")
    script = f'. "{LIB}"; lab_xl_create "$@"'
    proc = subprocess.run(
        ["sh", "-c", script, "sh", *args], capture_output=True, text=True, timeout=60,
        env={"PATH": f"{bindir}:/usr/bin:/bin", "XL_LOG": str(log),
             "XL_FAILS": str(tmp_path / "fails")})
    return proc.returncode, log.read_text().splitlines(), proc.stdout


@pytest.mark.parametrize("fails", [0, 1, 2])
def test_create_retries_until_it_succeeds(tmp_path: Path, fails: int) -> None:
    rc, calls, out = run_create(tmp_path, fails, "domd", "/lab/domd.cfg", "-p")
    assert rc == 0
    expected = ["create -q -p /lab/domd.cfg", "destroy domd"] * fails
    assert calls == expected + ["create -q -p /lab/domd.cfg"]
    assert out.count("xl create domd: try") == fails


def test_create_gives_up_after_three_tries(tmp_path: Path) -> None:
    rc, calls, out = run_create(tmp_path, 5, "domu", "/lab/domu.cfg")
    assert rc == 1
    assert calls == ["create -q /lab/domu.cfg", "destroy domu"] * 3
    assert "try 3 of 3 failed" in out

"""The Xen lab from pytest: builds the lab and runs its whole suite in one QEMU boot.

Selected only with ``REMUS_XENLAB=1`` or ``-m xenlab``; the default run skips it
(it needs root and several minutes).  ``tests/xenlab/ci.sh`` does the work; this
test checks its RESULT lines.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

CI = Path(__file__).resolve().parent / "xenlab" / "ci.sh"


@pytest.fixture
def lab_selected(request: pytest.FixtureRequest) -> None:
    markexpr = request.config.getoption("-m", default="") or ""
    if os.environ.get("REMUS_XENLAB") != "1" and "xenlab" not in markexpr:
        pytest.skip("boots Xen under QEMU for minutes: select with REMUS_XENLAB=1 or -m xenlab "
                    "(or run bash tests/xenlab/ci.sh)")


@pytest.mark.xenlab
def test_lab_suite(lab_selected: None) -> None:
    proc = subprocess.run(["bash", str(CI)], capture_output=True, text=True, timeout=3600)
    output = proc.stdout + proc.stderr
    results = re.findall(r"^RESULT (\S+) (PASS|FAIL|SKIP) ?(.*)$", proc.stdout, re.M)
    if any(name == "xenlab" and status == "SKIP" for name, status, _ in results):
        pytest.skip(next(detail for name, status, detail in results if name == "xenlab"))
    failed = [f"{name}: {detail}" for name, status, detail in results if status == "FAIL"]
    assert proc.returncode == 0 and not failed, "\n".join(failed) + "\n" + output[-6000:]
    assert any(status == "PASS" for _, status, _ in results), output[-6000:]

"""The README's main command, remus-demo, end to end (receiver, primary, SIGKILL, failover)."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.helpers import ROOT


def test_remus_demo_passes_its_checks() -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", "remus.demo", "--seconds", "2", "--memory", "16M"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("[demo] PASS") == 4
    assert "Remus's promise held." in done.stdout
    assert "activated sim:demo from checkpoint" in done.stderr

"""The README's main command, remus-demo, end to end (receiver, primary, SIGKILL, failover)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

from tests.helpers import repo_env


def test_remus_demo_passes_its_checks(tmp_path: Path) -> None:
    plot = importlib.util.find_spec("matplotlib") is not None  # the [plot] extra, when installed
    args = ["--seconds", "2", "--memory", "16M"] + (["--plot", str(tmp_path / "demo.svg")] if plot else [])
    done = subprocess.run([sys.executable, "-m", "remus.demo", *args],
                          env=repo_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("[demo] PASS") == 4
    assert "Remus's promise held." in done.stdout
    assert "activated sim:demo from checkpoint" in done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    if plot:
        assert (tmp_path / "demo.svg").read_text().lstrip().startswith("<?xml")
        assert f"plot of the primary's checkpoints written to {tmp_path / 'demo.svg'}" in done.stdout

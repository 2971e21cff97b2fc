"""Fixtures shared by the test modules (helpers that are not fixtures live in ``tests/helpers.py``).

Two ways to run the suite (see the README): everything, ``python -m pytest``; or the quick
run without the long campaigns, ``python -m pytest -m 'not slow'``.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from typing import Any, Iterator

import pytest

from tests.helpers import repo_env


class Spawner:
    """Starts the tree's commands (``python -m MODULE``) and kills what is left of them at the end."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def __call__(self, module: str, *args: str, **kwargs: Any) -> subprocess.Popen[str]:
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        proc: subprocess.Popen[str] = subprocess.Popen(
            [sys.executable, "-m", module, *args], env=kwargs.pop("env", repo_env()), text=True, **kwargs
        )
        self.procs.append(proc)
        return proc

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait()
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()


@pytest.fixture
def spawn() -> Iterator[Spawner]:
    """``spawn("remus.cli", "--blackhole", "sim:x")``: a command of this tree, killed after the test."""
    spawner = Spawner()
    try:
        yield spawner
    finally:
        spawner.cleanup()

"""Every benchmark in tests/bench/ still imports (they are run by hand, not by pytest, so a
moved module would otherwise go unnoticed until someone measures)."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parent / "bench"
MODULES = sorted(p.stem for p in BENCH.glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("name", MODULES)
def test_a_benchmark_imports_and_says_how_to_run_it(name: str) -> None:
    module = importlib.import_module(f"tests.bench.{name}")
    assert module.__doc__, f"tests/bench/{name}.py has no docstring"
    if hasattr(module, "main"):  # a benchmark, not one of their helpers (streams, wordrle)
        assert "Run" in module.__doc__, f"tests/bench/{name}.py: its docstring does not say how to run it"
        done = subprocess.run([sys.executable, "-m", f"tests.bench.{name}", "--help"],
                              cwd=BENCH.parent.parent, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr

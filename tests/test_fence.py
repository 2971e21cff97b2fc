"""remus.fence.run_fence: only exit 0 in time fences; output kept; the deadline kills the group."""

from __future__ import annotations

import os
import time
from pathlib import Path

from remus.fence import run_fence


def test_exit_0_fences_and_sees_the_environment() -> None:
    result = run_fence('echo "fencing $REMUS_PEER:$REMUS_PORT for $REMUS_DOMAIN as $REMUS_ROLE"',
                       {"REMUS_ROLE": "primary", "REMUS_PEER": "backup", "REMUS_PORT": "8002",
                        "REMUS_DOMAIN": "web"}, timeout_s=10)
    assert result.ok and result.status == 0
    assert result.output_tail.strip() == "fencing backup:8002 for web as primary"
    assert result.describe().startswith("fence command exited 0 after ")
    assert result.describe().endswith(": fencing backup:8002 for web as primary")


def test_a_failing_command_does_not_fence_and_says_why() -> None:
    result = run_fence("echo no such node >&2; exit 3", {}, timeout_s=10)
    assert not result.ok and result.status == 3
    assert "exited 3" in result.describe() and result.describe().endswith(": no such node")


def test_a_command_killed_by_a_signal_does_not_fence() -> None:
    result = run_fence("kill -9 $$", {}, timeout_s=10)
    assert not result.ok and result.status == -9
    assert "killed by signal 9" in result.describe()


def test_the_deadline_kills_the_command_and_what_it_started(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    started = time.monotonic()
    result = run_fence(f"sleep 60 & echo $! > {pid_file}; wait", {}, timeout_s=0.5)
    assert not result.ok and result.status is None
    assert time.monotonic() - started < 10
    assert "did not finish" in result.describe()
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.02)
    else:
        raise AssertionError("the fence command's child outlived the deadline")


def test_only_the_tail_of_a_long_output_is_kept() -> None:
    result = run_fence("seq 1 100000", {}, timeout_s=10)
    assert result.ok and len(result.output_tail) <= 2000 and result.output_tail.endswith("100000\n")

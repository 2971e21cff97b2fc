"""The Xen lab's netbuf checker (tests/xenlab/netbuf_lab.py ``check``) on made-up captures.

The lab judges real captures with it; here it must pass a correct run and
flag every way output can escape early: a frame out before its epoch's ack,
output that was never buffered at all (what ``--no-net`` looks like), a
frame of the still-open epoch out before the stop, and a frame out after a
SIGKILL but before the cleanup.  Times are made up; nothing here waits.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from types import ModuleType
from typing import Any, Dict, List, Optional, Sequence, Tuple

import pytest

LAB = Path(__file__).resolve().parent / "xenlab" / "netbuf_lab.py"
T0 = 1_800_000_000.0
#: (suspended, buffered, acked), seconds after T0: three checkpoints, one a second.
CHECKPOINTS = [(1.0, 1.1, 1.5), (2.0, 2.1, 2.5), (3.0, 3.1, 3.5)]
#: (in at the vif, out past the plug or None), seconds after T0, one per frame.
Frames = List[Tuple[float, Optional[float]]]


@pytest.fixture(scope="module")
def lab() -> ModuleType:
    spec = importlib.util.spec_from_file_location("netbuf_lab", LAB)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write(path: Path, rows: List[Dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def frame(n: int, kind: str, t_pre: float, t_post: Optional[float]) -> List[Dict[str, Any]]:
    rows = [{"tap": "pre", "unix": T0 + t_pre, "hash": f"h{n}", "kind": kind}]
    if t_post is not None:
        rows.append({"tap": "post", "unix": T0 + t_post, "hash": f"h{n}", "kind": kind})
    return rows


def buffered_run() -> Frames:
    """(in, out) of frames correctly held: each epoch out at its ack; the open one at the stop."""
    frames: Frames = [(0.5, 1.5), (0.9, 1.5), (1.4, 2.5), (2.05, 2.5), (2.7, 3.5)]
    frames += [(3.2, 3.9), (3.6, 3.9)]           # after the last BUFFER: released at the stop (3.8)
    frames += [(4.5, 4.5), (5.0, 5.0), (6.0, 6.0)]   # remus gone: straight through
    return frames


def run_check(lab: ModuleType, tmp_path: Path, frames: Sequence[Tuple[float, Optional[float]]],
              markers: Dict[str, float], *options: str,
              checkpoints: Sequence[Tuple[float, float, float]] = CHECKPOINTS) -> int:
    """``netbuf_lab.py check`` on these frames, checkpoints and markers; its exit status."""
    sightings: List[Dict[str, Any]] = []
    for n, (t_pre, t_post) in enumerate(frames):
        sightings += frame(n, "icmp" if n % 2 else "ipv6", t_pre, t_post)
    stats = [{"event": "checkpoint", "seq": i + 1, "pause_ms": 50.0, "period_ms": 1000.0 if i else None,
              "suspended_unix": T0 + s, "buffered_unix": T0 + b, "acked_unix": T0 + a}
             for i, (s, b, a) in enumerate(checkpoints)]
    argv = ["check", "--name", "t", "--kinds", "icmp,ipv6",
            "--sniff", write(tmp_path / "sniff.jsonl", sightings),
            "--stats", write(tmp_path / "stats.jsonl", stats + [{"event": "summary"}]),
            "--markers", write(tmp_path / "markers.jsonl",
                               [{"event": e, "unix": T0 + t} for e, t in markers.items()]),
            *options]
    status: int = lab.main(argv)
    return status


def results(out: str) -> Dict[str, str]:
    return {m[0]: m[1] for m in re.findall(r"^RESULT t_(\S+) (PASS|FAIL|SKIP)", out, re.M)}


TERM = {"installed": 0.2, "stopping": 3.8, "released": 4.0}


def test_correctly_buffered_run_passes(lab: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = run_check(lab, tmp_path, buffered_run(), TERM, "--open-until", "stopping")
    got = results(capsys.readouterr().out)
    assert rc == 0 and set(got.values()) == {"PASS"}, got
    assert set(got) == {"checkpoints", "no_early_release", "held", "all_ethertypes", "all_delivered",
                        "flows_after_exit"}


def test_a_frame_out_before_its_epochs_ack_fails(lab: ModuleType, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    frames = buffered_run()
    frames[2] = (1.4, 1.6)   # in before BUFFER 2 (2.1): must wait for ack 2 (2.5)
    assert run_check(lab, tmp_path, frames, TERM)== 1
    got = results(capsys.readouterr().out)
    assert got["no_early_release"] == "FAIL" and got["all_delivered"] == "PASS"


def test_a_frame_during_the_suspend_may_wait_for_the_next_ack_only(lab: ModuleType, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    # In between suspend 2 (2.0) and BUFFER 2 (2.1): in epoch 2 or 3; out at ack 2 is allowed.
    frames = buffered_run()
    frames[3] = (2.05, 2.5)
    assert run_check(lab, tmp_path, frames, TERM)== 0
    assert "1 arrived between a suspend and its BUFFER" in capsys.readouterr().out


def test_unbuffered_output_is_flagged(lab: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # What --no-net looks like: every frame out the moment it came in.
    frames = [(t_pre, t_pre) for t_pre, _ in buffered_run()]
    assert run_check(lab, tmp_path, frames, TERM, "--open-until", "stopping")== 1
    got = results(capsys.readouterr().out)
    assert got["no_early_release"] == "FAIL" and got["held"] == "FAIL"


def test_the_open_epoch_must_wait_for_the_stop(lab: ModuleType, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    frames = buffered_run()
    frames[5] = (3.2, 3.3)   # after the last BUFFER, out before the stop request
    assert run_check(lab, tmp_path, frames, TERM, "--open-until", "stopping")== 1
    out = capsys.readouterr().out
    assert results(out)["no_early_release"] == "FAIL" and "2 frames in the epoch still open" in out


def test_a_lost_frame_fails(lab: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    frames = buffered_run()
    frames[1] = (0.9, None)
    assert run_check(lab, tmp_path, frames, TERM)== 1
    assert results(capsys.readouterr().out)["all_delivered"] == "FAIL"


KILL = {"installed": 0.2, "killed": 3.7, "cleaning": 4.6, "cleaned": 4.8}


def killed_run() -> Frames:
    frames = buffered_run()[:5]
    frames += [(3.9, 4.7), (4.2, 4.7)]          # after the SIGKILL: held until the cleanup
    frames += [(5.0, 5.0), (6.0, 6.0)]          # after the cleanup: straight through
    return frames


@pytest.mark.parametrize("escape", [None, (4.2, 4.3)], ids=["held", "escaped"])
def test_after_sigkill_output_waits_for_the_cleanup(lab: ModuleType, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str],
                                                    escape: Optional[Tuple[float, float]]) -> None:
    frames = killed_run()
    if escape:
        frames[6] = escape
    rc = run_check(lab, tmp_path, frames, KILL, "--blocked-marker", "killed", "--unblocked-marker", "cleaned")
    got = results(capsys.readouterr().out)
    assert got["blocked_until_cleanup"] == ("FAIL" if escape else "PASS")
    assert rc == (1 if escape else 0) and got["flows_after_exit"] == "PASS"


def test_killed_during_the_first_checkpoint_everything_since_the_install_waits(
        lab: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    frames = [(0.5, 4.7), (2.0, 4.7), (4.2, 4.7), (5.0, 5.0), (6.0, 6.0)]
    assert run_check(lab, tmp_path, frames, KILL, "--blocked-marker", "killed", "--unblocked-marker", "cleaned",
                     checkpoints=[])== 0
    out = capsys.readouterr().out
    assert "3 frames since the install (no checkpoint finished) waited" in out
    frames[0] = (0.5, 1.0)   # out during the live copy: never acknowledged
    assert run_check(lab, tmp_path, frames, KILL, "--blocked-marker", "killed", "--unblocked-marker", "cleaned",
                     checkpoints=[])== 1
    assert results(capsys.readouterr().out)["blocked_until_cleanup"] == "FAIL"

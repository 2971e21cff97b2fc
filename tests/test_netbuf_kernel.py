"""Network buffering against this machine's real kernel, each test in a fresh network namespace.

Needs root (for the namespace).  Where the kernel has no sch_plug (this
project's development hosts) the no-plug test checks the clear error and
the plug tests are skipped with that reason; in the Xen lab's dom0 (Debian's
6.1 kernel, sch_plug as a module) it is the other way round.  The redirect
test needs no plug and runs everywhere.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict

import pytest

HERE = Path(__file__).resolve().parent
needs_netns = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None,
    reason="needs root, unshare and ip to make a network namespace",
)


def scenario(name: str, tmp_path: Path, *wrapper: str) -> Dict[str, Any]:
    state = tmp_path / "netbuf"
    state.mkdir()
    done = subprocess.run(
        ["unshare", "--net", *wrapper, sys.executable, str(HERE / "netbuf_scenarios.py"), name, str(state)],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    result: Dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    if "skip" in result:
        pytest.skip(result["skip"])
    assert "netbuf_error" not in result, result
    return result


def assert_nothing_left(result: Dict[str, Any]) -> None:
    assert [link for link in result["links"] if link.startswith("remus")] == []
    assert "ingress" not in result["vb"] and "mirred" not in result["vb"]
    assert result["records"] == []


@needs_netns
def test_no_sch_plug_gives_the_clear_error_and_leaves_nothing(tmp_path: Path) -> None:
    result = scenario("no_plug", tmp_path)
    assert "no plug qdisc (sch_plug)" in result["error"] and "modprobe sch_plug" in result["error"]
    assert "CONFIG_NET_SCH_PLUG" in result["error"]
    assert_nothing_left(result)


@needs_netns
def test_redirect_takes_every_kind_of_frame(tmp_path: Path) -> None:
    # IPv4, IPv6, ARP, 802.1Q, an unknown ethertype and a bare 14-byte header: all reach the IFB.
    result = scenario("redirect", tmp_path)
    assert result["seen"] == result["sent"]


@needs_netns
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv to drop CAP_NET_ADMIN")
def test_without_cap_net_admin_is_told_so(tmp_path: Path) -> None:
    result = scenario("not_root", tmp_path, "setpriv", "--bounding-set", "-net_admin")
    assert result["error"] is not None and "needs root (CAP_NET_ADMIN)" in result["error"]


@needs_netns
def test_real_plug_holds_each_epoch_until_its_commit(tmp_path: Path) -> None:
    result = scenario("plug_epochs", tmp_path)
    assert result["arrived_missing"] == []          # the frames did reach the vif...
    assert (result["held_1"], result["held_2"]) == (12, 18)   # ...and waited in the plug
    assert result["out_before_commit"] == []
    assert result["first_missing"] == []            # RELEASE_ONE let epoch 1 out...
    assert result["second_early"] == [] and result["still_held"] == 6   # ...and only epoch 1
    assert result["second_missing"] == []           # release let the rest out
    assert_nothing_left(result)


@needs_netns
def test_cleanup_after_sigkill_unblocks_the_interface(tmp_path: Path) -> None:
    result = scenario("sigkill_cleanup", tmp_path)
    assert result["held"] == 6 and result["out_before"] == []   # blocked: nobody releases
    assert result["cleanup_rc"] == 0 and "vb: cleaned up" in result["cleanup_out"]
    assert result["released_missing"] == [] and result["after_missing"] == []
    assert_nothing_left(result)

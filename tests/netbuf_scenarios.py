"""Network-buffering scenarios against the real kernel, each run in a fresh network namespace.

``python3 netbuf_scenarios.py NAME STATE_DIR`` is started by
test_netbuf_kernel.py under ``unshare --net``; it builds a veth pair
va <-> vb with vb in a bridge br0, as a vif sits in dom0's bridge (``ip``,
as test scaffolding only), runs the scenario with vb as the guest's
interface ("vif") and va as the guest's side, and prints one JSON object:
the scenario's findings, or ``{"skip": reason}``.  A frame the bridge
passes up to br0 has left the plug (or was never held).  Nothing a
scenario makes outlives the namespace.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from tests.netbuf_packets import KINDS, Sender, Tap, frame, seq_of  # noqa: E402

from remus.errors import NetbufError, NetbufUnavailable  # noqa: E402
from remus.netbuf import devices_for, tc  # noqa: E402
from remus.netbuf.netlink import RtnlSocket  # noqa: E402
from remus.netbuf.plug import PlugBuffer, lookup_link  # noqa: E402

Result = Dict[str, Any]
WAIT_S = 10.0  # an upper bound for frames to arrive; tests never assert on durations


def sh(command: str) -> str:
    return subprocess.run(command, shell=True, check=True, capture_output=True, text=True).stdout


def veth() -> None:
    # No IPv6 of the namespace's own (router solicitations, MLD reports): only the test's frames flow.
    sh("sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1")
    sh("ip link set lo up; ip link add va type veth peer name vb; ip link add br0 type bridge; "
       "ip link set vb master br0; for d in va vb br0; do ip link set $d up; done")


def links() -> List[str]:
    return sorted(line.split(":")[1].strip().split("@")[0] for line in sh("ip -o link show").splitlines())


def vb_qdiscs() -> str:
    return sh("tc qdisc show dev vb; tc filter show dev vb ingress")


def plug_qlen(ifb: str) -> int:
    with RtnlSocket() as rtnl:
        link = lookup_link(rtnl, ifb)
        assert link is not None
        answers = rtnl.request(tc.get_root_qdisc(link.ifindex))
    qlen = tc.parse_qdisc(answers[0][1]).qlen
    return qlen or 0


def wait_qlen(ifb: str, count: int) -> int:
    deadline = time.monotonic() + WAIT_S
    while (qlen := plug_qlen(ifb)) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    return qlen


def send(sender: Sender, seqs: range) -> set:
    for seq in seqs:
        sender.send(frame(KINDS[seq % len(KINDS)], seq))
    return set(seqs)


class Sightings:
    """The test frames that reached an interface (br0: past the plug)."""

    def __init__(self, ifname: str) -> None:
        self.tap = Tap(ifname, outgoing=False)
        self.got: set = set()

    def seen(self, seqs: set) -> set:
        self.got |= {seq_of(s.data) for s in self.tap.read_ready()}
        return self.got & seqs

    def wait(self, seqs: set) -> set:
        """``seqs`` seen so far, waiting up to WAIT_S for all of them."""
        deadline = time.monotonic() + WAIT_S
        while (got := self.seen(seqs)) != seqs and time.monotonic() < deadline:
            time.sleep(0.01)
        return got


def install_or_skip(state_dir: str) -> PlugBuffer:
    [device] = devices_for(["vb"], 100, state_dir=state_dir)
    try:
        device.install()
    except NetbufUnavailable as exc:
        if "sch_plug" in str(exc):
            raise Skip("this kernel has no sch_plug") from None
        raise
    assert isinstance(device, PlugBuffer)
    return device


class Skip(Exception):
    pass


# ------------------------------------------------------------------------------ scenarios


def no_plug(state_dir: str) -> Result:
    """Installing where the kernel has no sch_plug: the clear error, and nothing left behind."""
    [device] = devices_for(["vb"], 200, state_dir=state_dir)
    try:
        device.install()
    except NetbufUnavailable as exc:
        return {"error": str(exc), "links": links(), "vb": vb_qdiscs(), "records": os.listdir(state_dir)}
    device.release()
    raise Skip("this kernel has sch_plug: the plug scenarios cover it")


def redirect(state_dir: str) -> Result:
    """The redirect alone (IFB, ingress, the u32/mirred filter): which kinds of frame reach the IFB."""
    with RtnlSocket() as rtnl:
        rtnl.request(tc.new_ifb("remus-t"))
        ifb = lookup_link(rtnl, "remus-t")
        vb = lookup_link(rtnl, "vb")
        assert ifb is not None and vb is not None
        rtnl.request(tc.new_ingress(vb.ifindex))
        rtnl.request(tc.new_redirect(vb.ifindex, ifb.ifindex))
        tap = Tap("remus-t")
        sender = Sender("va")
        sent = send(sender, range(1, 1 + 2 * len(KINDS)))
        got = {seq_of(s.data) for s in tap.wait_for(sent, WAIT_S)}
        rtnl.request(tc.del_redirect(vb.ifindex))
        rtnl.request(tc.del_ingress(vb.ifindex))
        rtnl.request(tc.del_link(ifb.ifindex))
    return {"sent": sorted(sent), "seen": sorted(s for s in got if s is not None)}


def not_root(state_dir: str) -> Result:
    """Installing without CAP_NET_ADMIN (started under ``setpriv --bounding-set -net_admin``, on lo)."""
    [device] = devices_for(["lo"], 200, state_dir=state_dir)
    try:
        device.install()
    except NetbufUnavailable as exc:
        return {"error": str(exc)}
    device.release()
    return {"error": None}


def plug_epochs(state_dir: str) -> Result:
    """The real plug: held until RELEASE_ONE, epoch by epoch, all out at release, nothing left."""
    arrivals = Sightings("vb")            # before the redirect
    sightings = Sightings("br0")          # after the plug
    sender = Sender("va")
    device = install_or_skip(state_dir)
    assert device.record is not None
    ifb = device.record.ifb
    first = send(sender, range(1, 13))    # every kind, twice
    held_1 = wait_qlen(ifb, len(first))
    device.postsuspend()                  # BUFFER: those 12 are epoch 1
    second = send(sender, range(13, 19))
    held_2 = wait_qlen(ifb, len(first) + len(second))
    arrived = arrivals.wait(first | second)
    out_before_commit = sightings.seen(first | second)
    device.commit()                       # RELEASE_ONE: epoch 1 only
    out_1 = sightings.wait(first)
    still_held = plug_qlen(ifb)
    second_early = sightings.seen(second)
    device.release()
    out_2 = sightings.wait(second)
    return {
        "held_1": held_1, "held_2": held_2, "arrived_missing": sorted((first | second) - arrived),
        "out_before_commit": sorted(out_before_commit), "first_missing": sorted(first - out_1),
        "still_held": still_held, "second_early": sorted(second_early), "second_missing": sorted(second - out_2),
        "links": links(), "vb": vb_qdiscs(), "records": os.listdir(state_dir),
    }


def sigkill_cleanup(state_dir: str) -> Result:
    """A remus killed by SIGKILL leaves the guest's output held; remus-netbuf-cleanup lets it go."""
    install_or_skip(state_dir).release()  # skips early where there is no sch_plug
    ready_r, ready_w = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            [device] = devices_for(["vb"], 100, state_dir=state_dir)
            device.install()
            os.write(ready_w, b"1")
            time.sleep(3600)
        finally:
            os._exit(1)
    os.read(ready_r, 1)
    os.kill(child, signal.SIGKILL)
    os.waitpid(child, 0)
    sightings = Sightings("br0")
    sender = Sender("va")
    with open(os.path.join(state_dir, "vb"), encoding="utf-8") as f:
        ifb = json.load(f)["ifb"]
    stuck = send(sender, range(1, 7))
    held = wait_qlen(ifb, len(stuck))     # the dead remus's plug holds them: nobody releases
    out_before = sightings.seen(stuck)
    script = os.path.join(os.path.dirname(HERE), "bin", "remus-netbuf-cleanup")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE))
    cleanup = subprocess.run([sys.executable, script, "--state-dir", state_dir], capture_output=True, text=True,
                             env=env)
    released = sightings.wait(stuck)
    after = send(sender, range(7, 13))     # and the vif is back to normal
    flowing = sightings.wait(after)
    return {
        "held": held, "out_before": sorted(out_before), "cleanup_rc": cleanup.returncode,
        "cleanup_out": cleanup.stdout + cleanup.stderr, "released_missing": sorted(stuck - released),
        "after_missing": sorted(after - flowing), "links": links(), "vb": vb_qdiscs(),
        "records": os.listdir(state_dir),
    }


SCENARIOS: Dict[str, Callable[[str], Result]] = {
    f.__name__: f for f in (no_plug, redirect, not_root, plug_epochs, sigkill_cleanup)
}


def main() -> int:
    name, state_dir = sys.argv[1], sys.argv[2]
    try:
        if name != "not_root":
            veth()
        result = SCENARIOS[name](state_dir)
    except Skip as exc:
        result = {"skip": str(exc)}
    except NetbufError as exc:
        result = {"netbuf_error": str(exc)}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

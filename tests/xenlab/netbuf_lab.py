"""End-to-end network-buffering test tools for the Xen lab's dom0 (run by jobs/netbuf.sh).

Subcommands:

``protect``  runs the real ``remus.engine.Engine`` with the real ``PlugBuffer``
             on one interface, checkpointing a stand-in domain: a process
             stopped and continued with SIGSTOP/SIGCONT (``--pid``, the veth
             sender) or a Xen guest paused and unpaused with ``xl``
             (``--xl``).  Captures are empty; acks come ``--ack-delay-ms``
             after each send, like a backup's.  Writes the same statistics
             JSON as ``remus --stats-json`` (with ``suspended_unix`` and
             ``acked_unix``), plus ``installed``/``released`` markers.
``send``     writes numbered frames of every kind (IPv4, IPv6, ARP, 802.1Q,
             unknown ethertype, bare header) out of an interface.
``sniff``    records every frame on a ``--pre`` interface (the vif: the
             kernel taps it before tc redirects it) and a ``--post`` one
             (the bridge: frames passed up after the plug), with kernel
             timestamps, until SIGTERM.
``check``    matches the two captures against the checkpoint statistics and
             prints ``RESULT`` lines (see ``check`` for the rules).

It prints; it is a test tool, not part of the remus package.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import select
import signal
import statistics
import subprocess
import sys
import time
from bisect import bisect_right
from typing import Any, Callable, Dict, List, Optional, Sequence, TextIO

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
sys.path.insert(0, os.path.dirname(TESTS))

from tests.netbuf_packets import KINDS, Sender, Tap, kind_of, seq_of, stream  # noqa: E402

from remus.channel import BlackholeChannel  # noqa: E402
from remus.clock import StopFlag  # noqa: E402
from remus.devices import CheckpointDevice  # noqa: E402
from remus.domain import Capture, DomainInfo  # noqa: E402
from remus.engine import Engine  # noqa: E402
from remus.errors import DomainError  # noqa: E402
from remus.netbuf import devices_for  # noqa: E402
from remus.report import Reporter  # noqa: E402
from remus.signals import stop_on_signals  # noqa: E402
from remus.stream.records import Checkpoint  # noqa: E402
from remus.stream.sender import EncodedCheckpoint  # noqa: E402


def mark(path: str, event: str, **extra: Any) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(dict(event=event, unix=time.time(), **extra)) + "\n")


# ------------------------------------------------------------------------------ protect


class StandInDomain:
    """A domain the engine can suspend and resume, whose captures are empty."""

    def __init__(self, name: str, suspend: Callable[[], None], resume: Callable[[], None]) -> None:
        self.name = name
        self._suspend, self._resume = suspend, resume
        self._suspended = False

    @classmethod
    def process(cls, pid: int) -> "StandInDomain":
        """The sender process: SIGSTOP and SIGCONT."""
        return cls(f"pid{pid}", lambda: os.kill(pid, signal.SIGSTOP), lambda: os.kill(pid, signal.SIGCONT))

    @classmethod
    def xl(cls, domain: str) -> "StandInDomain":
        """A Xen guest: ``xl pause`` and ``xl unpause`` (slow under TCG: a process each)."""
        return cls(domain, lambda: _run(["xl", "pause", domain]), lambda: _run(["xl", "unpause", domain]))

    @property
    def info(self) -> DomainInfo:
        return DomainInfo("stand-in", self.name)

    @property
    def suspended(self) -> bool:
        return self._suspended

    def devices(self, net_buffering: bool, interval_ms: int = 0) -> Sequence[CheckpointDevice]:
        return []

    def suspend(self) -> None:
        self._suspend()
        self._suspended = True

    def capture(self) -> Capture:
        return Capture([Checkpoint()], 0)

    def resume(self) -> None:
        self._resume()
        self._suspended = False

    def close(self) -> None:
        if self._suspended:
            self.resume()


def _run(argv: List[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise DomainError(f"{' '.join(argv)}: {done.stderr.strip()}")


class DelayedAckChannel(BlackholeChannel):
    """Bytes to /dev/null; each ack arrives ``delay_s`` after the checkpoint was sent."""

    def __init__(self, delay_s: float) -> None:
        super().__init__()
        self.delay_s = delay_s
        self._sent_at = 0.0

    def send(self, checkpoint: EncodedCheckpoint) -> None:
        super().send(checkpoint)
        self._sent_at = time.monotonic()

    def wait_for_ack(self, seq: int) -> None:
        time.sleep(max(0.0, self._sent_at + self.delay_s - time.monotonic()))


class Hook:
    """A device that only calls ``on(hook_name)``: placed around the real buffers to time them."""

    name = "hook"

    def __init__(self, on: Callable[[str], None]) -> None:
        self.on = on

    def install(self) -> None:
        self.on("install")

    def postsuspend(self) -> None:
        self.on("postsuspend")

    def preresume(self) -> None:
        pass

    def commit(self) -> None:
        pass

    def release(self) -> None:
        pass


def protect(args: argparse.Namespace) -> int:
    domain = StandInDomain.process(args.pid) if args.pid else StandInDomain.xl(args.xl)
    buffers = [] if args.no_net else devices_for([args.vif], args.interval_ms)
    stop = StopFlag()
    reporter = Reporter(f"stand-in:{domain.name}", sys.stderr, args.stats, live=False)
    started = [0.0]

    def before(hook: str) -> None:
        if hook == "postsuspend":
            started[0] = time.time()

    def after(hook: str) -> None:
        if hook == "install":
            mark(args.markers, "installed", devices=[d.name for d in buffers])
        elif hook == "postsuspend":   # the plugs got TCQ_PLUG_BUFFER between these two times
            mark(args.markers, "buffer", start=started[0])

    devices: List[CheckpointDevice] = [Hook(before), *buffers, Hook(after)]
    engine = Engine(domain, DelayedAckChannel(args.ack_delay_ms / 1000), interval_ms=args.interval_ms,
                    devices=devices, stop=stop, on_checkpoint=reporter)
    with stop_on_signals(stop):
        try:
            engine.run()
        finally:
            reporter.finish(engine.statistics())
            mark(args.markers, "released")
            domain.close()
    return 0


# ------------------------------------------------------------------------------ send


def send(args: argparse.Namespace) -> int:
    sender = Sender(args.ifname)
    period = 1.0 / args.rate
    stop = StopFlag()
    next_at = time.monotonic()
    with stop_on_signals(stop):
        for seq, data in stream():
            if stop.is_set():
                break
            sender.send(data)
            if seq == 1:
                mark(args.markers, "sending")
            next_at += period
            time.sleep(max(0.0, next_at - time.monotonic()))
    return 0


# ------------------------------------------------------------------------------ sniff


def sniff(args: argparse.Namespace) -> int:
    taps = {"pre": Tap(args.pre, outgoing=False), "post": Tap(args.post, outgoing=False)}
    stop = StopFlag()
    with open(args.out, "w", encoding="utf-8") as out, stop_on_signals(stop):
        mark(args.markers, "sniffing")
        while not stop.is_set():
            readable, _, _ = select.select(list(taps.values()), [], [], 0.2)
            for name, tap in taps.items():
                if tap in readable:
                    for seen in tap.read_ready():
                        write_sighting(out, name, seen.unix, seen.data)
        for name, tap in taps.items():   # what arrived before the stop
            for seen in tap.read_ready():
                write_sighting(out, name, seen.unix, seen.data)
            out.write(json.dumps({"tap": name, "capture_drops": tap.count_drops()}) + "\n")
    return 0


def classify(data: bytes) -> str:
    """A short name for a frame's kind (test frames by their number, others by ethertype)."""
    seq = seq_of(data)
    if seq is not None:
        return kind_of(seq)
    ethertype = int.from_bytes(data[12:14], "big") if len(data) >= 14 else 0
    if ethertype == 0x0800 and len(data) > 23:
        return {1: "icmp", 17: "udp", 6: "tcp"}.get(data[23], "ipv4")
    return {0x0806: "arp", 0x86DD: "ipv6", 0x8100: "vlan"}.get(ethertype, f"0x{ethertype:04x}")


def write_sighting(out: TextIO, tap: str, unix: float, data: bytes) -> None:
    digest = hashlib.sha1(data).hexdigest()[:16]
    out.write(json.dumps({"tap": tap, "unix": unix, "hash": digest, "kind": classify(data), "len": len(data),
                          "seq": seq_of(data)}) + "\n")


# ------------------------------------------------------------------------------ check


def read_lines(path: str) -> List[Dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def result(name: str, ok: Optional[bool], detail: str) -> bool:
    print(f"RESULT {name} {'SKIP' if ok is None else 'PASS' if ok else 'FAIL'} {detail}", flush=True)
    return ok is not False


#: Timestamps closer than this are the same instant (see ``check``).
CLOCK_RESOLUTION_S = 1e-6


def check(args: argparse.Namespace) -> int:
    """Match the captures against the checkpoints; print RESULT lines; 0 if none failed.

    A frame's ``pre`` time is its first sighting on the vif, its ``post``
    time its sighting on the bridge.  Its epoch is the first checkpoint whose
    TCQ_PLUG_BUFFER came after it reached the plug.  The BUFFER of
    checkpoint k ran inside a known window: between the ``buffer`` marker's
    ``start`` and ``unix`` when ``protect`` timed it, else between
    ``suspended_unix`` and the resume (``suspended_unix`` + ``pause_ms``).
    Frames inside a window could be in either epoch ("ambiguous"); a frame
    must never leave before the ack of the earliest epoch it can be in
    (``no-early-release``: never a false alarm).  Also counted, as the
    issue words it: frames out before the ack of the first checkpoint
    *suspended* after them; with a suspend that takes time (``xl pause``)
    the guest may still send after ``suspended_unix``, and such frames
    rightly leave with the epoch that is closing.  Only frames seen exactly
    once on the bridge are timed (repeated identical frames, such as ARP
    retries, cannot be matched one to one).  Times are compared to the
    microsecond (``CLOCK_RESOLUTION_S``): the lab's dom0 clock is coarse
    enough that a frame released right after an ack carries the very same
    time, which the two float conversions then round apart.
    """
    name = args.name
    sightings = [s for s in read_lines(args.sniff) if "unix" in s]
    capture_drops = sum(s.get("capture_drops", 0) for s in read_lines(args.sniff))
    checkpoints = [c for c in read_lines(args.stats) if c.get("event") == "checkpoint"]
    marks = read_lines(args.markers)
    markers = {m["event"]: m["unix"] for m in marks if m["event"] != "buffer"}
    buffers = [m for m in marks if m["event"] == "buffer"]
    if not checkpoints or not sightings:
        result(f"{name}-checkpoints", False, f"{len(checkpoints)} checkpoints, {len(sightings)} frames captured")
        return 1
    suspended = [c["suspended_unix"] for c in checkpoints]
    resumed = [c["suspended_unix"] + c["pause_ms"] / 1000 for c in checkpoints]
    acked = [c["acked_unix"] for c in checkpoints]
    timed = len(buffers) >= len(checkpoints)
    lo = [b["start"] for b in buffers[: len(checkpoints)]] if timed else suspended
    hi = [b["unix"] for b in buffers[: len(checkpoints)]] if timed else resumed
    # Without an "installed" marker (a run of the remus command itself) timing starts at the first suspend.
    installed, unblocked = markers.get("installed", suspended[0]), markers[args.unblocked_marker]
    ok = result(f"{name}-checkpoints", True,
                f"{len(checkpoints)} checkpoints, mean period "
                f"{statistics.mean(c['period_ms'] for c in checkpoints[1:]) if len(checkpoints) > 1 else 0:.0f} ms, "
                f"mean pause {statistics.mean(c['pause_ms'] for c in checkpoints):.1f} ms, BUFFER window "
                f"{statistics.mean(h - l for h, l in zip(hi, lo)) * 1000:.1f} ms "
                f"({'timed around the plugs' if timed else 'suspend to resume'})")

    pre: Dict[str, float] = {}
    post: Dict[str, List[float]] = {}
    kinds: Dict[str, str] = {}
    for s in sightings:
        if s["tap"] == "pre":
            pre.setdefault(s["hash"], s["unix"])
        else:
            post.setdefault(s["hash"], []).append(s["unix"])
        kinds[s["hash"]] = s["kind"]
    unique = {h: times[0] for h, times in post.items() if len(times) == 1 and h in pre}

    violations: List[str] = []
    holds: List[float] = []
    held_by_kind: Dict[str, int] = {}
    ambiguous = by_suspend_time = 0
    for h, t_post in unique.items():
        t_pre = pre[h]
        if not installed <= t_pre < hi[-1]:
            continue
        earliest = bisect_right(hi, t_pre)
        latest = bisect_right(lo, t_pre)
        ambiguous += earliest != latest
        holds.append(t_post - t_pre)
        held_by_kind[kinds[h]] = held_by_kind.get(kinds[h], 0) + 1
        if t_post < acked[earliest] - CLOCK_RESOLUTION_S:
            violations.append(f"{kinds[h]} in at {t_pre:.3f}, out at {t_post:.3f}, ack {earliest + 1} at "
                              f"{acked[earliest]:.3f}")
        first_suspended_after = bisect_right(suspended, t_pre)
        if first_suspended_after < len(acked) and t_post < acked[first_suspended_after] - CLOCK_RESOLUTION_S:
            by_suspend_time += 1
    ok &= result(f"{name}-no-early-release", bool(holds) and not violations,
                 f"{len(holds)} frames arrived while buffered, {len(violations)} left before their epoch's ack"
                 + (f" ({'; '.join(violations[:3])})" if violations else "")
                 + f"; {ambiguous} arrived during a BUFFER window; {by_suspend_time} left before the ack of the "
                 "first checkpoint suspended after them")
    if holds:
        ok &= result(f"{name}-held", statistics.median(holds) > 0,
                     f"hold time median {statistics.median(holds) * 1000:.0f} ms, max {max(holds) * 1000:.0f} ms; "
                     f"frames by kind: {dict(sorted(held_by_kind.items()))}")
    expected = [k for k in args.kinds.split(",") if k]
    missing_kinds = [k for k in expected if not held_by_kind.get(k)]
    if expected:
        ok &= result(f"{name}-all-ethertypes", not missing_kinds,
                     f"held and released: {sorted(held_by_kind)}"
                     + (f"; never seen held: {missing_kinds}" if missing_kinds else ""))

    # Every frame that reached the vif while buffering was in place, or after, comes out (those of
    # the capture's last second may still be in flight).
    last = max(s["unix"] for s in sightings)
    lost = sorted((t, h) for h, t in pre.items() if h not in post and installed < t < last - 1.0)
    where = ", ".join(f"{kinds[h]} at {describe(t, markers, suspended, acked)}" for t, h in lost[:4])
    verdict: Optional[bool] = not lost
    if lost and capture_drops >= len(lost):
        verdict = None   # the capture itself lost that many: cannot tell
    ok &= result(f"{name}-all-delivered", verdict,
                 f"{len(pre)} frames reached the vif, {len(lost)} never came out" + (f": {where}" if lost else "")
                 + f"; the capture dropped {capture_drops}")

    if args.blocked_marker:
        blocked, until = markers[args.blocked_marker] + 0.05, markers[args.blocked_until]
        early = [h for h, t in unique.items() if pre[h] > blocked and t < until]
        waited = [h for h, t in unique.items() if blocked < pre[h] < until]
        ok &= result(f"{name}-blocked-until-cleanup", bool(waited) and not early,
                     f"{len(waited)} frames sent after the SIGKILL waited for the cleanup; {len(early)} came out before it")

    after = [t - pre[h] for h, t in unique.items() if pre[h] > unblocked + 0.1]
    slow = [d for d in after if d > args.flow_bound_s]
    ok &= result(f"{name}-flows-after-exit", bool(after) and not slow,
                 f"{len(after)} frames after remus was gone, slowest {max(after, default=0) * 1000:.0f} ms"
                 + (f"; {len(slow)} slower than {args.flow_bound_s} s" if slow else ""))
    return 0 if ok else 1


def describe(t: float, markers: Dict[str, float], suspended: List[float], acked: List[float]) -> str:
    """Where time ``t`` falls: relative to the nearest marker and checkpoint."""
    k = bisect_right(suspended, t)
    near = min(markers.items(), key=lambda item: abs(item[1] - t))
    return (f"{t:.3f} ({t - near[1]:+.3f} s from {near[0]}, after checkpoint {k}"
            + (f", {t - acked[k - 1]:+.3f} s from its ack" if k else "") + ")")


# ------------------------------------------------------------------------------ main


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="netbuf_lab.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("protect")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--pid", type=int)
    who.add_argument("--xl")
    p.add_argument("--vif", required=True)
    p.add_argument("--stats", required=True)
    p.add_argument("--markers", required=True)
    p.add_argument("--interval-ms", type=int, default=100)
    p.add_argument("--ack-delay-ms", type=int, default=30)
    p.add_argument("--no-net", action="store_true")
    p = sub.add_parser("send")
    p.add_argument("--ifname", required=True)
    p.add_argument("--markers", required=True)
    p.add_argument("--rate", type=float, default=300.0)
    p = sub.add_parser("sniff")
    p.add_argument("--pre", required=True)
    p.add_argument("--post", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--markers", required=True)
    p = sub.add_parser("check")
    p.add_argument("--name", required=True)
    p.add_argument("--sniff", required=True)
    p.add_argument("--stats", required=True)
    p.add_argument("--markers", required=True)
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--blocked-marker", help="marker after which nothing sent may come out before --blocked-until")
    p.add_argument("--blocked-until", default="cleaning")
    p.add_argument("--unblocked-marker", default="released", help="marker after which frames must flow")
    p.add_argument("--flow-bound-s", type=float, default=0.5)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    return {"protect": protect, "send": send, "sniff": sniff, "check": check}[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())

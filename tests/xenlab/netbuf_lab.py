"""End-to-end network-buffering test tools for the Xen lab's dom0 (run by jobs/netbuf.sh).

Subcommands:

``protect``    runs the real ``remus.engine.Engine`` with the real
               ``PlugBuffer`` on one interface, checkpointing a stand-in
               domain: a process stopped and continued with SIGSTOP/SIGCONT
               (the veth sender, which has no Xen guest behind it).  Its
               captures are empty; acks come ``--ack-delay-ms`` after each
               send, like a backup's.  Writes the same statistics JSON as
               ``remus --stats-json``.  (A Xen guest is protected by the
               ``remus`` command itself.)
``send``       writes numbered frames of every kind (IPv4, IPv6, ARP, 802.1Q,
               unknown ethertype, bare header) out of an interface.
``sniff``      records every frame on a ``--pre`` interface (the vif: the
               kernel taps it before tc redirects it) and a ``--post`` one
               (the bridge: frames passed up after the plug), with kernel
               timestamps, until SIGTERM.  With ``--record VIF`` it also
               writes the ``installed`` marker once remus's ownership record
               for VIF lists the redirect (from then on the vif's output
               waits in the plug).
``check``      matches the two captures against the checkpoint statistics
               and the job's markers and prints ``RESULT`` lines (see
               ``check`` for the rules).

Markers are JSON lines ``{"event": NAME, "unix": TIME}`` that the job and
these tools append to one file per run.  This is a test tool, not part of
the remus package: it prints, and it changes nothing but the interfaces it
is told to send on or buffer.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import select
import signal
import statistics
import sys
import time
from bisect import bisect_right
from typing import Any, Dict, List, Optional, Sequence, TextIO

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
sys.path.insert(0, os.path.dirname(TESTS))

from tests.netbuf_packets import KINDS, Sender, Tap, kind_of, seq_of, stream  # noqa: E402

from remus.channel import BlackholeChannel  # noqa: E402
from remus.clock import StopFlag  # noqa: E402
from remus.devices import CheckpointDevice  # noqa: E402
from remus.domain import Capture, DomainInfo  # noqa: E402
from remus.engine import Engine  # noqa: E402
from remus.netbuf import devices_for  # noqa: E402
from remus.netbuf.owners import DEFAULT_STATE_DIR, RecordError, RecordStore  # noqa: E402
from remus.report import Reporter  # noqa: E402
from remus.signals import stop_on_signals  # noqa: E402
from remus.stream.records import Checkpoint  # noqa: E402
from remus.stream.sender import FramedCheckpoint  # noqa: E402


def mark(path: str, event: str, **extra: Any) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(dict(event=event, unix=time.time(), **extra)) + "\n")


# ------------------------------------------------------------------------------ protect


class ProcessDomain:
    """A process as the domain: suspended with SIGSTOP, resumed with SIGCONT; empty captures."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._suspended = False

    @property
    def info(self) -> DomainInfo:
        return DomainInfo("stand-in", f"pid{self.pid}")

    @property
    def suspended(self) -> bool:
        return self._suspended

    def devices(self, net_buffering: bool, interval_ms: int = 0) -> Sequence[CheckpointDevice]:
        return []

    def prepare_suspend(self) -> None:
        pass

    def suspend(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)
        self._suspended = True

    def capture(self) -> Capture:
        return Capture([Checkpoint()], 0)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)
        self._suspended = False

    def close(self) -> None:
        if self._suspended:
            self.resume()


class DelayedAckChannel(BlackholeChannel):
    """Bytes to /dev/null; each ack arrives ``delay_s`` after the checkpoint was sent."""

    def __init__(self, delay_s: float) -> None:
        super().__init__()
        self.delay_s = delay_s
        self._sent_at = 0.0

    def send(self, checkpoint: FramedCheckpoint) -> None:
        super().send(checkpoint)
        self._sent_at = time.monotonic()

    def wait_for_ack(self, seq: int) -> None:
        time.sleep(max(0.0, self._sent_at + self.delay_s - time.monotonic()))


def protect(args: argparse.Namespace) -> int:
    domain = ProcessDomain(args.pid)
    stop = StopFlag()
    reporter = Reporter(f"stand-in:pid{args.pid}", sys.stderr, args.stats, live=False)
    engine = Engine(domain, DelayedAckChannel(args.ack_delay_ms / 1000), interval_ms=args.interval_ms,
                    devices=devices_for([args.vif], args.interval_ms), stop=stop, on_checkpoint=reporter)
    with stop_on_signals(stop):
        try:
            engine.run()
        finally:
            reporter.finish(engine.statistics())
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
    watch = RecordStore(args.state_dir) if args.record else None
    with open(args.out, "w", encoding="utf-8") as out, stop_on_signals(stop):
        mark(args.markers, "sniffing")
        while not stop.is_set():
            if watch is not None and installed(watch, args.record, args.markers):
                watch = None
            readable, _, _ = select.select(list(taps.values()), [], [], 0.2 if watch is None else 0.02)
            for name, tap in taps.items():
                if tap in readable:
                    for seen in tap.read_ready():
                        write_sighting(out, name, seen.unix, seen.data)
        for name, tap in taps.items():   # what arrived before the stop
            for seen in tap.read_ready():
                write_sighting(out, name, seen.unix, seen.data)
            out.write(json.dumps({"tap": name, "capture_drops": tap.count_drops()}) + "\n")
    return 0


def installed(store: RecordStore, vif: str, markers: str) -> bool:
    """True, and the ``installed`` marker written, once remus's record for ``vif`` lists the redirect."""
    try:
        record = store.read(vif)
    except RecordError:
        return False   # caught between two writes of the record
    if record is None or "redirect" not in record.done:
        return False
    mark(markers, "installed", ifb=record.ifb, pid=record.pid, steps=list(record.done))
    return True


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
#: Frames of the capture's last stretch may still be on their way out (``all_delivered``).
IN_FLIGHT_S = 1.0


def check(args: argparse.Namespace) -> int:
    """Match the captures against the checkpoints; print RESULT lines; 0 if none failed.

    A frame's ``pre`` time is its first sighting on the vif, its ``post``
    time its sighting on the bridge.  The TCQ_PLUG_BUFFER of checkpoint N
    was sent between its ``suspended_unix`` and its ``buffered_unix``, so a
    frame that reached the vif before ``buffered_unix`` of checkpoint N is
    in epoch N or an earlier one, and must not come out before
    ``acked_unix`` of checkpoint N (``no_early_release``: the weakest claim
    that is always true, so never a false alarm); frames inside that window
    could be in either epoch ("ambiguous").  Frames that came after the last
    recorded BUFFER are in an epoch no checkpoint closed: with
    ``--open-until MARKER`` they must not come out before that marker (the
    stop request).  Only frames seen exactly once on the bridge are timed
    (repeated identical frames, such as ARP retries, cannot be matched one
    to one).  Times are compared to the microsecond
    (``CLOCK_RESOLUTION_S``): the lab's dom0 clock is coarse enough that a
    frame released right after an ack carries the very same time, which the
    two float conversions then round apart.

    With ``--blocked-marker`` (a SIGKILL): frames that reached the vif after
    it (or after ``installed``, when no checkpoint was recorded at all, i.e.
    remus died in its first) must not come out before ``--blocked-until``
    and must come out after it.  Frames after ``--unblocked-marker`` (remus
    gone, or cleaned up after) must pass within ``--flow-bound-s``.
    """
    name = args.name
    sightings = [s for s in read_lines(args.sniff) if "unix" in s]
    capture_drops = sum(s.get("capture_drops", 0) for s in read_lines(args.sniff))
    checkpoints = [c for c in read_lines(args.stats) if c.get("event") == "checkpoint"] \
        if os.path.exists(args.stats) else []
    markers = {m["event"]: m["unix"] for m in read_lines(args.markers)}
    if not sightings or (not checkpoints and not args.blocked_marker):
        result(f"{name}_checkpoints", False, f"{len(checkpoints)} checkpoints, {len(sightings)} frames captured")
        return 1
    suspended = [c["suspended_unix"] for c in checkpoints]
    buffered = [c["buffered_unix"] for c in checkpoints]
    acked = [c["acked_unix"] for c in checkpoints]
    installed = markers["installed"]
    unblocked = markers[args.unblocked_marker]
    ok = True

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

    if checkpoints:
        periods = [c["period_ms"] for c in checkpoints[1:]]
        ok &= result(f"{name}_checkpoints", True,
                     f"{len(checkpoints)} checkpoints, mean period {statistics.mean(periods) if periods else 0:.0f} ms, "
                     f"pause of the first {checkpoints[0]['pause_ms'] / 1000:.1f} s, of the others "
                     f"{statistics.mean(c['pause_ms'] for c in checkpoints[1:]) if periods else 0:.0f} ms on average, "
                     f"suspend to BUFFER "
                     f"{statistics.mean(b - s for b, s in zip(buffered, suspended)) * 1000:.1f} ms on average")
        violations: List[str] = []
        open_violations: List[str] = []
        holds: List[float] = []
        held_by_kind: Dict[str, int] = {}
        ambiguous = open_epoch = 0
        open_until = markers[args.open_until] if args.open_until else None
        for h, t_post in unique.items():
            t_pre = pre[h]
            if t_pre < installed:
                continue
            if t_pre >= buffered[-1]:
                if open_until is not None and t_pre < open_until:
                    open_epoch += 1
                    if t_post < open_until - CLOCK_RESOLUTION_S:
                        open_violations.append(f"{kinds[h]} in at {t_pre:.3f}, out at {t_post:.3f}, "
                                               f"stop at {open_until:.3f}")
                continue
            epoch = bisect_right(buffered, t_pre)   # the earliest epoch (0-based) the frame can be in
            ambiguous += bisect_right(suspended, t_pre) != epoch
            holds.append(t_post - t_pre)
            held_by_kind[kinds[h]] = held_by_kind.get(kinds[h], 0) + 1
            if t_post < acked[epoch] - CLOCK_RESOLUTION_S:
                violations.append(f"{kinds[h]} in at {t_pre:.3f}, out at {t_post:.3f}, ack {epoch + 1} at "
                                  f"{acked[epoch]:.3f}")
        ok &= result(f"{name}_no_early_release", bool(holds) and not violations and not open_violations,
                     f"{len(holds)} frames arrived while buffered, {len(violations)} left before their epoch's ack"
                     + (f" ({'; '.join(violations[:3])})" if violations else "")
                     + f"; {ambiguous} arrived between a suspend and its BUFFER"
                     + (f"; of {open_epoch} frames in the epoch still open at the stop, {len(open_violations)} "
                        "left before it" + (f" ({'; '.join(open_violations[:3])})" if open_violations else "")
                        if open_until is not None else ""))
        if holds:
            ok &= result(f"{name}_held", statistics.median(holds) > 0,
                         f"hold time median {statistics.median(holds) * 1000:.0f} ms, max {max(holds) * 1000:.0f} ms; "
                         f"frames by kind: {dict(sorted(held_by_kind.items()))}")
        expected = [k for k in args.kinds.split(",") if k]
        missing_kinds = [k for k in expected if not held_by_kind.get(k)]
        if expected:
            ok &= result(f"{name}_all_ethertypes", not missing_kinds,
                         f"held and released: {sorted(held_by_kind)}"
                         + (f"; never seen held: {missing_kinds}" if missing_kinds else ""))

    # Every frame that reached the vif while buffering was in place, or after, comes out (those of
    # the capture's last second may still be in flight).
    last = max(s["unix"] for s in sightings)
    lost = sorted((t, h) for h, t in pre.items() if h not in post and installed < t < last - IN_FLIGHT_S)
    where = ", ".join(f"{kinds[h]} at {describe(t, markers, suspended, acked)}" for t, h in lost[:4])
    verdict: Optional[bool] = not lost
    if lost and capture_drops >= len(lost):
        verdict = None   # the capture itself lost that many: cannot tell
    ok &= result(f"{name}_all_delivered", verdict,
                 f"{len(pre)} frames reached the vif, {len(lost)} never came out" + (f": {where}" if lost else "")
                 + f"; the capture dropped {capture_drops}")

    if args.blocked_marker:
        since, what = markers[args.blocked_marker] + 0.05, f"after the {args.blocked_marker} marker"
        if not checkpoints:
            since, what = installed, "since the install (no checkpoint finished)"
        until = markers[args.blocked_until]
        early = [h for h, t in unique.items() if since < pre[h] < until and t < until - CLOCK_RESOLUTION_S]
        waited = [h for h, t in unique.items() if since < pre[h] < until]
        ok &= result(f"{name}_blocked_until_cleanup", bool(waited) and not early,
                     f"{len(waited)} frames {what} waited for the cleanup; {len(early)} came out before it")

    after = [t - pre[h] for h, t in unique.items() if pre[h] > unblocked + 0.1]
    slow = [d for d in after if d > args.flow_bound_s]
    ok &= result(f"{name}_flows_after_exit", bool(after) and not slow,
                 f"{len(after)} frames after the {args.unblocked_marker} marker, slowest "
                 f"{max(after, default=0) * 1000:.0f} ms" + (f"; {len(slow)} slower than {args.flow_bound_s} s"
                                                              if slow else ""))
    return 0 if ok else 1


def describe(t: float, markers: Dict[str, float], suspended: List[float], acked: List[float]) -> str:
    """Where time ``t`` falls: relative to the nearest marker and checkpoint."""
    k = bisect_right(suspended, t)
    near = min(markers.items(), key=lambda item: abs(item[1] - t))
    return (f"{t:.3f} ({t - near[1]:+.3f} s from {near[0]}, after checkpoint {k}"
            + (f", {t - acked[k - 1]:+.3f} s from its ack" if k else "") + ")")


# ------------------------------------------------------------------------------ main


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="netbuf_lab.py", description=(__doc__ or "").split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("protect")
    p.add_argument("--pid", type=int, required=True)
    p.add_argument("--vif", required=True)
    p.add_argument("--stats", required=True)
    p.add_argument("--interval-ms", type=int, default=100)
    p.add_argument("--ack-delay-ms", type=int, default=30)
    p = sub.add_parser("send")
    p.add_argument("--ifname", required=True)
    p.add_argument("--markers", required=True)
    p.add_argument("--rate", type=float, default=300.0)
    p = sub.add_parser("sniff")
    p.add_argument("--pre", required=True)
    p.add_argument("--post", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--markers", required=True)
    p.add_argument("--record", metavar="VIF", help="also write the installed marker when remus has buffered VIF")
    p.add_argument("--state-dir", default=DEFAULT_STATE_DIR)
    p = sub.add_parser("check")
    p.add_argument("--name", required=True)
    p.add_argument("--sniff", required=True)
    p.add_argument("--stats", required=True)
    p.add_argument("--markers", required=True)
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--open-until", help="marker (the stop request) before which the last, open epoch stays held")
    p.add_argument("--blocked-marker", help="marker (the SIGKILL) after which nothing comes out before --blocked-until")
    p.add_argument("--blocked-until", default="cleaning")
    p.add_argument("--unblocked-marker", default="released", help="marker after which frames must flow")
    p.add_argument("--flow-bound-s", type=float, default=0.5)
    args = parser.parse_args(argv)
    commands = {"protect": protect, "send": send, "sniff": sniff, "check": check}
    return commands[args.command](args)


if __name__ == "__main__":
    # A command-line tool piped into head dies quietly; never done on import (the tests call main).
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    raise SystemExit(main())

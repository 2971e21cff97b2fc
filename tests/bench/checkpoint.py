"""Benchmark: whole checkpoints of a simulated guest, compression on against off.

Run: ``python -m tests.bench.checkpoint [--seconds S] [--interval MS] [--tcp]``.

Runs the real engine on a simulated guest (64 MiB, 4000 dirty pages/s by
default) into /dev/null (or, with ``--tcp``, into a receiver process on localhost),
alternating compression on and off so both see the same machine, and prints
each figure with its ratio on/off.  Checkpoint 1 is all of memory, and
checkpoint 2's period holds its transfer; the checkpoints after it carry what
the guest dirtied meanwhile, each less, until one's period is within 1.5
intervals: that is the catch-up, printed as its own figure (nan if none
comes within twice ``--seconds``: then everything counts from checkpoint 2).  Steady-state
figures are over the checkpoints from there on (``--seconds`` of them); the
rate over every period from checkpoint 2's on (catch-up included, as this
benchmark measured until 2026-11-29) is printed too.  Nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import statistics
from typing import Any

from remus.channel import BlackholeChannel, Channel
from remus.clock import StopFlag
from remus.engine import Engine
from remus.sim.domain import SimulatedDomain
from remus.sim.spec import parse_sim_spec
from remus.stats import CheckpointStats


class ReceiverProcess:
    """A ``remus-receiver --once`` on 127.0.0.1 in a forked process: its own interpreter, as on
    a real backup (a receiver thread in this process would share the primary's GIL)."""

    def __init__(self) -> None:
        from remus.backup.server import Receiver
        from tests.helpers import LINK_KEY

        receiver = Receiver(port=0, listen="127.0.0.1", key=LINK_KEY, once=True, stop=StopFlag(),
                            say=lambda line: None, on_event=lambda event: None)
        self.port = receiver.bind()
        self.pid = os.fork()
        if self.pid == 0:
            status = 1
            try:
                status = receiver.serve()
            finally:
                os._exit(status)
        receiver._listener.close()  # type: ignore[union-attr]  # the child's now

    def finish(self) -> None:
        os.waitpid(self.pid, 0)


def one_run(compression: bool, seconds: float, interval_ms: int, tcp: bool, sim: str) -> dict[str, float]:
    domain = SimulatedDomain(parse_sim_spec(sim))
    stop = StopFlag()
    seen: list[CheckpointStats] = []
    backup: Any = None
    channel: Channel
    if tcp:
        from remus.transport import TcpChannel
        from tests.helpers import LINK_KEY

        backup = ReceiverProcess()
        channel = TcpChannel("127.0.0.1", backup.port, key=LINK_KEY)
    else:
        channel = BlackholeChannel()

    settled: list[int] = []  # index in ``seen`` of the first checkpoint after the catch-up
    caught_up: list[bool] = []  # False: no period came within 1.5 intervals (counted from checkpoint 2)

    def on_checkpoint(stats: CheckpointStats) -> None:
        seen.append(stats)
        if not settled and len(seen) > 2 and (stats.period_ms or 0) <= 1.5 * interval_ms:
            settled.append(len(seen) - 1)
            caught_up.append(True)
        if not settled and sum(s.period_ms or 0 for s in seen[2:]) >= 2 * seconds * 1000:
            settled.append(2)
            caught_up.append(False)
        if settled and sum(s.period_ms or 0 for s in seen[settled[0]:]) >= seconds * 1000:
            stop.set("done")

    engine = Engine(domain, channel, interval_ms=interval_ms, compression=compression,
                    devices=list(domain.devices(True)), stop=stop, on_checkpoint=on_checkpoint)
    try:
        engine.run()
    finally:
        domain.close()
        if backup is not None:
            backup.finish()
    steady = seen[settled[0]:]
    catch_up = seen[2 : settled[0]]
    since_second = seen[2:]
    return {
        "checkpoints/s": len(steady) / (sum(s.period_ms or 0 for s in steady) / 1000),
        "checkpoints/s, catch-up in": len(since_second) / (sum(s.period_ms or 0 for s in since_second) / 1000),
        "catch-up s": sum(s.period_ms or 0 for s in catch_up) / 1000 if caught_up[0] else float("nan"),
        "pause ms (mean)": statistics.fmean(s.pause_ms for s in steady),
        "send+ack ms (mean)": statistics.fmean(s.ack_ms for s in steady),
        "wire KiB/checkpoint": statistics.fmean(s.wire_bytes for s in steady) / 1024,
        "first checkpoint s": (seen[0].pause_ms + seen[0].ack_ms) / 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--interval", type=int, default=25, help="ms (25 = the 40 checkpoints/s target)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tcp", action="store_true", help="replicate to a receiver on localhost")
    parser.add_argument("--sim", default="sim:bench,memory=64M,dirty_rate=4000,packet_rate=50",
                        help="the simulated guest")
    args = parser.parse_args()
    results: dict[bool, list[dict[str, float]]] = {True: [], False: []}
    for _ in range(args.rounds):
        for compression in (True, False):
            results[compression].append(one_run(compression, args.seconds, args.interval, args.tcp, args.sim))
    where = "a receiver on localhost" if args.tcp else "/dev/null"
    print(f"{args.sim}, -i {args.interval}, into {where}; "
          f"medians of {args.rounds} alternating runs")
    print(f"{'figure':24} {'compression':>12} {'--no-compression':>17} {'ratio on/off':>13}")
    for key in results[True][0]:
        on = statistics.median(r[key] for r in results[True])
        off = statistics.median(r[key] for r in results[False])
        print(f"{key:24} {on:12.2f} {off:17.2f} {on / off if off else float('nan'):13.2f}")


if __name__ == "__main__":
    main()

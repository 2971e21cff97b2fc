"""Benchmark: the memory each side holds, as a multiple of the guest's memory.

Run: ``python -m tests.bench.memory [--memory 256M] [--checkpoints 40]``.

Two child processes, one after the other.  The primary runs the real engine
on a simulated guest with compression on, its stream written to a temporary
file (``BlackholeChannel``); its resident memory is read from
/proc/self/status after the first checkpoint and after the last: private
(``RssAnon``: cache, copies, Python objects) and the guest's shared memory
(``RssShmem``), and the peak (``VmHWM``).  The backup then feeds that file to
a ``BackupSession`` and reports the same.  Printed as multiples of the
guest's memory.  Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from remus.sim.spec import _parse_size


def rss() -> dict[str, int]:
    """RssAnon, RssShmem and VmHWM of this process, in bytes."""
    out = {}
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssShmem", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def primary(memory: str, checkpoints: int, path: str) -> dict[str, object]:
    from remus.channel import BlackholeChannel
    from remus.clock import StopFlag
    from remus.engine import Engine
    from remus.sim.domain import SimulatedDomain
    from remus.sim.spec import parse_sim_spec

    open(path, "wb").close()  # the channel opens it for writing, it does not create it
    domain = SimulatedDomain(parse_sim_spec(f"sim:mem,memory={memory},dirty_rate=12000,packet_rate=0"))
    stop = StopFlag()
    samples: list[dict[str, int]] = []

    def on_checkpoint(_stats: object) -> None:
        if len(samples) == 0 or engine.seq >= checkpoints:
            samples.append(rss())
        if engine.seq >= checkpoints:
            stop.set("done")

    engine = Engine(domain, BlackholeChannel(path), interval_ms=25, compression=True,
                    devices=list(domain.devices(True)), stop=stop, on_checkpoint=on_checkpoint)
    try:
        engine.run()
    finally:
        domain.close()
    return {"after first": samples[0], "steady": samples[-1]}


def backup(path: str) -> dict[str, object]:
    from remus.backup.session import BackupSession

    before = rss()
    session = BackupSession()
    with open(path, "rb") as stream:
        while chunk := stream.read(1 << 20):
            session.receive_data(chunk)
    return {"before": before, "steady": rss(), "seq": session.image.seq}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--memory", default="256M")
    parser.add_argument("--checkpoints", type=int, default=40)
    parser.add_argument("--side", choices=("primary", "backup"), help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side == "primary":
        print(json.dumps(primary(args.memory, args.checkpoints, args.path)))
        return
    if args.side == "backup":
        print(json.dumps(backup(args.path)))
        return
    guest = _parse_size(args.memory)
    with tempfile.TemporaryDirectory(prefix="remus-bench-memory-") as tmp:
        path = os.path.join(tmp, "stream")
        results = {}
        for side in ("primary", "backup"):
            done = subprocess.run([sys.executable, "-m", "tests.bench.memory", "--side", side, "--path", path,
                                   "--memory", args.memory, "--checkpoints", str(args.checkpoints)],
                                  check=True, capture_output=True, text=True)
            results[side] = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"guest {args.memory}, {args.checkpoints} checkpoints at 12000 dirty pages/s, -i 25; "
          "multiples of guest memory")
    for side, phases in results.items():
        for phase, values in phases.items():
            if isinstance(values, dict):
                print(f"{side:8} {phase:12} private {values['RssAnon'] / guest:5.2f}  "
                      f"guest's shared {values['RssShmem'] / guest:5.2f}  peak {values['VmHWM'] / guest:5.2f}")
    print(f"backup committed checkpoint {results['backup']['seq']}")


if __name__ == "__main__":
    main()

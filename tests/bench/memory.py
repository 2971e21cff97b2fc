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

``--libxc`` measures the primary on the Xen path instead, where the pages
come from libxc's stream as one buffer each (``CheckpointSaver`` over the
test suite's fake libxc, ``tests.xen_fakes``, for a guest of ``--memory``),
twice in the same run: as remus runs it, and without giving the freed heap
back after the first checkpoint (``remus.heap``), the baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from typing import TYPE_CHECKING, Any

from remus.sim.spec import _parse_size

if TYPE_CHECKING:
    from remus.stream.records import PageData


def rss() -> dict[str, int]:
    """RssAnon, RssShmem and VmHWM of this process, in bytes."""
    out = {}
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssShmem", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def _engine_memory(domain: Any, path: str, checkpoints: int, first_at: int,
                   **engine_options: Any) -> dict[str, object]:
    """Run the engine on ``domain`` into the file ``path`` with compression; RSS after checkpoint
    ``first_at`` and after the last of ``checkpoints``."""
    from remus.channel import BlackholeChannel
    from remus.clock import StopFlag
    from remus.engine import Engine

    open(path, "wb").close()  # the channel opens it for writing, it does not create it
    stop = StopFlag()
    samples: list[dict[str, int]] = []

    def on_checkpoint(_stats: object) -> None:
        if engine.seq in (first_at, checkpoints):
            samples.append(rss())
        if engine.seq >= checkpoints:
            stop.set("done")

    engine = Engine(domain, BlackholeChannel(path), interval_ms=25, compression=True, stop=stop,
                    on_checkpoint=on_checkpoint, **engine_options)
    try:
        engine.run()
    finally:
        domain.close()
    return {"after first": samples[0], "steady": samples[-1]}


def primary(memory: str, checkpoints: int, path: str) -> dict[str, object]:
    from remus.sim.domain import SimulatedDomain
    from remus.sim.spec import parse_sim_spec

    domain = SimulatedDomain(parse_sim_spec(f"sim:mem,memory={memory},dirty_rate=12000,packet_rate=0"))
    return _engine_memory(domain, path, checkpoints, 1, devices=list(domain.devices(True)))


_NOISE = os.urandom(64 * 4096)


def _half_random(pfns: list[int]) -> "PageData":
    """Pages of 2 KiB of noise and 2 KiB of zeros, as libxc would send them (one buffer each)."""
    from remus.stream.records import PageData

    return PageData(tuple(pfns), tuple(_NOISE[(p % 64) * 4096 : (p % 64) * 4096 + 2048] + bytes(2048) for p in pfns))


def primary_libxc(memory: str, checkpoints: int, path: str, trim: bool) -> dict[str, object]:
    from remus import heap
    from tests.xen_fakes import FakeLibxc, make_domain

    libxc = FakeLibxc(dirty_per_checkpoint=300, guest_pages=_parse_size(memory) // 4096, content=_half_random)
    domain, _guest = make_domain(libxc, precopy_timeout_s=120.0, step_timeout_s=120.0)
    # After the first checkpoint's release (checkpoint 2), and at the end.
    return _engine_memory(domain, path, checkpoints, 2, release_memory=heap.trim if trim else lambda: None)


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
    parser.add_argument("--libxc", action="store_true", help="the primary on the Xen path, with and without "
                        "giving the heap back (a fake libxc)")
    parser.add_argument("--side", choices=("primary", "backup", "libxc", "libxc-kept"), help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side == "primary":
        print(json.dumps(primary(args.memory, args.checkpoints, args.path)))
        return
    if args.side in ("libxc", "libxc-kept"):
        print(json.dumps(primary_libxc(args.memory, args.checkpoints, args.path, args.side == "libxc")))
        return
    if args.side == "backup":
        print(json.dumps(backup(args.path)))
        return
    guest = _parse_size(args.memory)
    with tempfile.TemporaryDirectory(prefix="remus-bench-memory-") as tmp:
        path = os.path.join(tmp, "stream")
        results = {}
        for side in ("libxc", "libxc-kept") if args.libxc else ("primary", "backup"):
            done = subprocess.run([sys.executable, "-m", "tests.bench.memory", "--side", side, "--path", path,
                                   "--memory", args.memory, "--checkpoints", str(args.checkpoints)],
                                  check=True, capture_output=True, text=True)
            results[side] = json.loads(done.stdout.strip().splitlines()[-1])
    load = "300 dirty pages a checkpoint (fake libxc)" if args.libxc else "12000 dirty pages/s"
    print(f"guest {args.memory}, {args.checkpoints} checkpoints at {load}, -i 25; multiples of guest memory")
    for side, phases in results.items():
        for phase, values in phases.items():
            if isinstance(values, dict):
                print(f"{side:8} {phase:12} private {values['RssAnon'] / guest:5.2f}  "
                      f"guest's shared {values['RssShmem'] / guest:5.2f}  peak {values['VmHWM'] / guest:5.2f}")
    if args.libxc:
        kept, trimmed = (results[side]["steady"]["RssAnon"] for side in ("libxc-kept", "libxc"))
        print(f"primary steady private memory, given back / kept: {trimmed / kept:.2f}")
    else:
        print(f"backup committed checkpoint {results['backup']['seq']}")


if __name__ == "__main__":
    main()

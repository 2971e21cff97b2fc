"""Benchmark: a replicated disk's write throughput and 4 KiB write latency, against the same
server with replication off and against the plain file, measured in the same run.

Run: ``python -m tests.bench.disk [--seconds S] [--interval MS] [--size MIB]``.

Three set-ups write the same pattern to a fresh raw image:

* ``file``: ``os.pwrite`` on the image (what the data path costs at best);
* ``nbd``: an NBD client over a unix socket to ``remus.disk.server`` on the image,
  replication off;
* ``replicated``: the same client and server, but the image records its epochs and the
  real engine checkpoints a small simulated guest every ``--interval`` ms, sending each
  epoch's writes before the COMMIT to ``remus-receiver`` (its own process) on 127.0.0.1,
  which applies them to a replica at commit.

For each: throughput of 64 KiB writes for ``--seconds``, then 4 KiB writes one at a time
(median and 99th percentile latency).  Ratios are printed against ``nbd`` (the target for
``replicated`` is >= 0.5 of its throughput) and against ``file``.  Nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable

from remus.clock import StopFlag
from remus.disk.device import DiskDevice
from remus.disk.epochs import RecordingImage
from remus.disk.server import BlockTarget, ImageFile, NbdServer
from remus.engine import Engine
from remus.sim.disk import NbdClient
from remus.sim.domain import SimulatedDomain
from remus.sim.spec import parse_sim_spec
from remus.stats import CheckpointStats
from remus.transport import TcpChannel
from tests.helpers import LINK_KEY, write_key_file

BIG = 64 * 1024
SMALL = 4096


def measure(write: Callable[[int, bytes], None], size: int, seconds: float) -> dict[str, float]:
    big = os.urandom(BIG)
    blocks = size // BIG
    n = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        write((n % blocks) * BIG, big)
        n += 1
    elapsed = time.perf_counter() - start
    small = os.urandom(SMALL)
    lat = []
    deadline = time.perf_counter() + seconds / 2
    i = 0
    while time.perf_counter() < deadline:
        t = time.perf_counter()
        write((i * 7919 % (size // SMALL)) * SMALL, small)
        lat.append(time.perf_counter() - t)
        i += 1
    lat.sort()
    return {"mib_s": n * BIG / elapsed / (1 << 20), "p50_us": statistics.median(lat) * 1e6,
            "p99_us": lat[int(len(lat) * 0.99)] * 1e6}


def fresh_image(work: str, name: str, size: int) -> str:
    path = os.path.join(work, name)
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def run_file(work: str, size: int, seconds: float) -> dict[str, float]:
    image = ImageFile(fresh_image(work, "file.img", size))
    try:
        return measure(lambda off, data: image.write(off, data), size, seconds)
    finally:
        image.close()


def run_nbd(work: str, size: int, seconds: float, target: BlockTarget, sock: str) -> dict[str, float]:
    server = NbdServer(target)
    server.listen_unix(os.path.join(work, sock))
    client = NbdClient(os.path.join(work, sock))
    try:
        return measure(client.write, size, seconds)
    finally:
        client.close()
        server.close()


def start_receiver(work: str) -> tuple[subprocess.Popen[bytes], int]:
    """``remus-receiver`` in its own process (not this one's GIL), on a free loopback port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    events = os.path.join(work, "events")
    proc = subprocess.Popen([sys.executable, "-m", "remus.backup.cli", "--listen", "127.0.0.1", "--port",
                             str(port), "--once", "--disk-root", os.path.join(work, "backup"),
                             "--key-file", write_key_file(work), "--control", os.path.join(work, "control"),
                             "--events-json", events], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not os.path.exists(events) and time.monotonic() < deadline:
        time.sleep(0.02)
    return proc, port


def run_replicated(work: str, size: int, seconds: float, interval_ms: int) -> dict[str, float]:
    os.makedirs(work)
    path = fresh_image(work, "replicated.img", size)
    target = RecordingImage(ImageFile(path))
    domain = SimulatedDomain(parse_sim_spec(
        f"sim:bench,memory=1M,dirty_rate=100,packet_rate=0,disk={path},disk_size={size}"))
    receiver, port = start_receiver(work)
    stop = StopFlag()
    checkpoints: list[CheckpointStats] = []
    engine = Engine(domain, TcpChannel("127.0.0.1", port, key=LINK_KEY), interval_ms=interval_ms,
                    devices=[DiskDevice(0, target)], stop=stop, on_checkpoint=checkpoints.append)
    thread = threading.Thread(target=engine.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not checkpoints and time.monotonic() < deadline:  # protection (and the first sync) done
            time.sleep(0.01)
        first = len(checkpoints)
        started = time.monotonic()
        result = run_nbd(work, size, seconds, target, "replicated.sock")
        elapsed = time.monotonic() - started
        during = checkpoints[first:]
        result["checkpoints_s"] = len(during) / elapsed
        # What the backup had committed meanwhile (disk writes dominate these checkpoints).
        result["acked_mib_s"] = sum(c.raw_bytes for c in during) / elapsed / (1 << 20)
        result["period_ms"] = statistics.median(c.period_ms or 0.0 for c in during) if during else 0.0
        return result
    finally:
        stop.set("bench")
        thread.join(timeout=120)
        domain.close()
        try:
            receiver.wait(timeout=30)
        except subprocess.TimeoutExpired:  # never leave it behind
            receiver.kill()
            receiver.wait()
        target.image.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--interval", type=int, default=50)
    parser.add_argument("--size", type=int, default=64, help="image size in MiB")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    size = args.size << 20
    work = tempfile.mkdtemp(prefix="remus-bench-disk-")
    runs: dict[str, list[dict[str, float]]] = {"file": [], "nbd": [], "replicated": []}
    try:
        for r in range(args.rounds):  # alternate, so that every set-up sees the same machine
            runs["file"].append(run_file(work, size, args.seconds))
            runs["nbd"].append(run_nbd(work, size, args.seconds,
                                       ImageFile(fresh_image(work, f"nbd{r}.img", size)), f"nbd{r}.sock"))
            runs["replicated"].append(run_replicated(os.path.join(work, f"r{r}"), size, args.seconds,
                                                     args.interval))
    finally:
        shutil.rmtree(work)
    results = {name: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for name, rs in runs.items()}
    base, plain = results["nbd"], results["file"]
    print(f"disk benchmark: {args.size} MiB image, {args.seconds:.1f} s per set-up, {args.rounds} rounds "
          f"(medians), checkpoints every {args.interval} ms")
    print(f"{'set-up':<12}{'64K MiB/s':>11}{'x nbd':>8}{'x file':>8}{'4K p50 us':>11}{'4K p99 us':>11}")
    for name, r in results.items():
        print(f"{name:<12}{r['mib_s']:>11.1f}{r['mib_s'] / base['mib_s']:>8.2f}{r['mib_s'] / plain['mib_s']:>8.2f}"
              f"{r['p50_us']:>11.0f}{r['p99_us']:>11.0f}")
    rep = results["replicated"]
    print(f"replicated / unreplicated throughput: {rep['mib_s'] / base['mib_s']:.2f} (target >= 0.50)")
    print(f"during the replicated runs: {rep['checkpoints_s']:.1f} checkpoints/s (median period "
          f"{rep['period_ms']:.0f} ms), {rep['acked_mib_s']:.1f} MiB/s committed by the backup "
          f"({rep['acked_mib_s'] / base['mib_s']:.2f} x nbd)")


if __name__ == "__main__":
    main()

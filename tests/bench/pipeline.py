"""Benchmark: the replication pipeline's throughput against its parts, in one run.

Run: ``python -m tests.bench.pipeline [--pattern words|random] [--memory 256M]
[--dirty 3000] [--checkpoints 30]``.

On a page stream captured from the simulated guest's write model
(``tests.bench.streams``), measured one after the other in this process:

* **pipeline**: what the primary and the backup do with each checkpoint
  after the pause, serially: ``CheckpointEncoder.encode`` (XOR with the
  cache, zstd, framing, CRC) and ``BackupSession.receive_data`` (decode,
  CRC check, zstd, XOR back, staging, commit into the image);
* **pipeline, overlapped**: the same work as the engine does it, in two
  processes: the primary streams each checkpoint (``CheckpointEncoder.stream``:
  a chunk is sent as soon as it is made) over loopback TCP to a forked backup
  that decodes as the bytes arrive and acknowledges each commit, and the
  next checkpoint starts only after the ack (no sealing: see tests/bench/seal.py);
* **zstd-L1**: one ``zstd -1`` compression of the same raw pages, per batch
  of 1024 pages (the cheapest real codec on the same bytes);
* **loopback TCP**: the same number of raw page bytes through a TCP
  connection on 127.0.0.1 (sender and reader threads);
* **memcpy**: one copy of the same raw bytes.

All four in MB/s of raw dirty-page bytes, and the pipeline's as a ratio of
each.  Steady checkpoints only (the first, all of memory, primes both sides
untimed).  Nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import socket
import threading
import time

import zstandard

from remus.backup.session import BackupSession, Committed
from remus.sim.domain import SIM_DHDR_TYPE
from remus.sim.spec import SimSpec, _parse_size
from remus.stream.compression import NATIVE, VECTORISED
from remus.stream.records import Checkpoint, DomainHeader, PageData, Record, SimVcpu
from remus.stream.sender import CheckpointEncoder, session_header
from tests.bench.streams import Stream, capture, raw_bytes


def pipeline_s(stream: Stream, memory: int) -> float:
    spec = SimSpec("bench", memory=memory, pattern=stream.pattern)
    encoder = CheckpointEncoder(compression=True)
    backup = BackupSession()
    backup.receive_data(session_header({"domain": "bench", "kind": "sim", "sim": spec.to_dict()}))
    digest = bytes(32)  # the backup does not check it before activation

    def records(pages: list[PageData], seq: int) -> list[Record]:
        head: list[Record] = [DomainHeader(SIM_DHDR_TYPE, 0, 0)] if seq == 1 else []
        return head + list(pages) + [SimVcpu(seq, seq, seq, digest), Checkpoint()]

    for chunk in encoder.encode(1, records(stream.first, 1)).chunks:
        backup.receive_data(chunk)
    start = time.perf_counter()
    for seq, pages in enumerate(stream.checkpoints, 2):
        for chunk in encoder.encode(seq, records(pages, seq)).chunks:
            backup.receive_data(chunk)
    elapsed = time.perf_counter() - start
    assert backup.image.seq == len(stream.checkpoints) + 1, "the backup did not commit every checkpoint"
    return elapsed


def overlapped_s(stream: Stream, memory: int) -> float:
    """The primary here, the backup in a forked child, one loopback TCP connection; one
    ack byte per commit.  The first checkpoint is sent untimed."""
    spec = SimSpec("bench", memory=memory, pattern=stream.pattern)
    digest = bytes(32)
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    child = os.fork()
    if child == 0:  # the backup
        code = 1
        try:
            conn, _ = server.accept()
            backup = BackupSession()
            while True:
                data = conn.recv(1 << 20)
                if not data:
                    break
                for output in backup.receive_data(data):
                    if isinstance(output, Committed):
                        conn.sendall(b"a")
            code = 0 if backup.image.seq == len(stream.checkpoints) + 1 else 3
        finally:
            os._exit(code)
    server.close()
    encoder = CheckpointEncoder(compression=True)

    def records(pages: list[PageData], seq: int) -> list[Record]:
        head: list[Record] = [DomainHeader(SIM_DHDR_TYPE, 0, 0)] if seq == 1 else []
        return head + list(pages) + [SimVcpu(seq, seq, seq, digest), Checkpoint()]

    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.sendall(session_header({"domain": "bench", "kind": "sim", "sim": spec.to_dict()}))

        def checkpoint(seq: int, pages: list[PageData]) -> None:
            for chunk in encoder.stream(seq, records(pages, seq)).chunks:
                conn.sendall(chunk)
            if conn.recv(1) != b"a":
                raise RuntimeError(f"the backup did not acknowledge checkpoint {seq}")

        checkpoint(1, stream.first)
        start = time.perf_counter()
        for seq, pages in enumerate(stream.checkpoints, 2):
            checkpoint(seq, pages)
        elapsed = time.perf_counter() - start
    _pid, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the backup did not commit every checkpoint"
    return elapsed


def zstd_s(stream: Stream) -> float:
    cctx = zstandard.ZstdCompressor(level=1)
    batches = [b"".join(r.pages) for c in stream.checkpoints for r in c]
    start = time.perf_counter()
    for batch in batches:
        cctx.compress(batch)
    return time.perf_counter() - start


def tcp_s(total: int) -> float:
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    got = [0]

    def reader() -> None:
        conn, _ = server.accept()
        with conn:
            while got[0] < total:
                data = conn.recv(1 << 20)
                if not data:
                    return
                got[0] += len(data)

    thread = threading.Thread(target=reader)
    thread.start()
    block = bytes(4 << 20)
    with socket.create_connection(("127.0.0.1", port)) as conn:
        start = time.perf_counter()
        sent = 0
        while sent < total:
            conn.sendall(block[: min(len(block), total - sent)])
            sent += min(len(block), total - sent)
        thread.join()
        elapsed = time.perf_counter() - start
    server.close()
    return elapsed


def memcpy_s(stream: Stream, total: int) -> float:
    buf = bytearray(total)
    pieces = [r.pages for c in stream.checkpoints for r in c]
    start = time.perf_counter()
    off = 0
    for pages in pieces:
        joined = b"".join(pages)
        buf[off : off + len(joined)] = joined
        off += len(joined)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pattern", default="words", choices=("words", "random"))
    parser.add_argument("--memory", default="256M")
    parser.add_argument("--dirty", type=int, default=3000, help="dirty pages per checkpoint")
    parser.add_argument("--checkpoints", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    memory = _parse_size(args.memory)
    stream = capture(args.pattern, memory, args.checkpoints, args.dirty)
    total = sum(raw_bytes(c) for c in stream.checkpoints)
    mb = total / 1e6
    best = {
        "pipeline (encode + backup)": min(pipeline_s(stream, memory) for _ in range(args.rounds)),
        "pipeline, overlapped": min(overlapped_s(stream, memory) for _ in range(args.rounds)),
        "zstd -1 on the same pages": min(zstd_s(stream) for _ in range(args.rounds)),
        "loopback TCP, same bytes": min(tcp_s(total) for _ in range(args.rounds)),
        "memcpy, same bytes": min(memcpy_s(stream, total) for _ in range(args.rounds)),
    }
    pipe = mb / best["pipeline (encode + backup)"]
    print(f"pattern={args.pattern}, guest {args.memory}, {args.checkpoints} checkpoints of "
          f"~{args.dirty} dirty pages ({mb:.0f} MB), best of {args.rounds}, numpy: {VECTORISED}, C helper: {NATIVE}")
    overlapped = mb / best["pipeline, overlapped"]
    print(f"{'stage':30} {'MB/s':>9} {'pipeline / this':>16} {'overlapped / this':>18}")
    for name, seconds in best.items():
        rate = mb / seconds
        print(f"{name:30} {rate:9.0f} {pipe / rate:16.3f} {overlapped / rate:18.3f}")
    print(f"pipeline: {best['pipeline (encode + backup)'] / stream.dirty_pages * 1e6:.1f} us per dirty page")


if __name__ == "__main__":
    main()

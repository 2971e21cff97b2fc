"""Benchmark: what sealing the link costs, against the same work unsealed, in the same run.

Run: ``python -m tests.bench.seal [--memory-mib M] [--dirty-pages N] [--checkpoints K] [--rounds R]``.

(a) The AEAD alone: ChaCha20-Poly1305 seal and open of the same random 4 KiB
    pages, one page, 16 pages (64 KiB, FRAME_MAX) and 256 pages (1 MiB) per frame, beside a
    memcpy of the same bytes (and, for comparison, AES-256-GCM's encrypt+decrypt, the other AEAD
    the design allows, without framing).
(b) The checkpoint pipeline over loopback TCP: ``CheckpointEncoder`` output for
    a simulated guest (made before the clock starts), sent through a
    ``SealedLink`` to 127.0.0.1, opened, fed to a ``BackupSession`` that
    commits each checkpoint and sends its ACK back sealed; the primary waits
    for each ACK as the engine does.  Sealed (after a real handshake) and
    unsealed (``SealedLink.unsealed()``, the benchmark-only framing) runs
    alternate, and the ratio sealed/unsealed of the median throughputs is
    printed (the target is >= 0.8).

Nothing is asserted; the figures depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import statistics
import threading
import time
from typing import Any, Callable

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from remus.backup.session import BackupSession, SendBack
from remus.link.blocking import SealedLink, initiate, respond
from remus.link.seal import NullOpener, NullSealer, Opener, Sealer
from remus.sim.domain import SIM_DHDR_TYPE
from remus.sim.spec import SimSpec
from remus.stream.codec import StreamDecoder, encode_record
from remus.stream.records import (
    MAX_BATCH_PAGES,
    PAGE_SIZE,
    Ack,
    Checkpoint,
    Close,
    DomainHeader,
    PageData,
    SimVcpu,
    StreamHeader,
)
from remus.stream.sender import CheckpointEncoder, session_header

MIB = 1 << 20


# --------------------------------------------------------------------------- (a) the AEAD alone


def rate_mib_s(action: Callable[[], None], size_bytes: int, min_s: float = 0.3) -> float:
    """MiB per CPU second of ``action`` (which handles ``size_bytes``), repeated for at least ``min_s``.

    CPU time (this process's), not wall time: other processes on a loaded
    machine then change the figures less.
    """
    action()  # warm up
    runs = 0
    start = time.process_time()
    while True:
        action()
        runs += 1
        elapsed = time.process_time() - start
        if elapsed >= min_s:
            return runs * size_bytes / elapsed / MIB


def aead_figures(pages: list[bytes], pages_per_frame: int) -> dict[str, float]:
    frames = [b"".join(pages[i : i + pages_per_frame]) for i in range(0, len(pages), pages_per_frame)]
    size = sum(len(f) for f in frames)
    key = os.urandom(32)
    stream_sealer = Sealer(key)
    sealed_stream = [stream_sealer.seal(f) for f in frames]  # one direction's frames, in order

    def memcpy() -> None:
        for frame in frames:
            bytearray(frame)

    def seal() -> None:
        sealer = Sealer(key)
        for frame in frames:
            sealer.seal(frame)

    def open_() -> None:
        opener = Opener(key)
        for data in sealed_stream:
            opener.receive_data(data)

    def null_frames() -> None:
        sealer, opener = NullSealer(), NullOpener()
        for frame in frames:
            opener.receive_data(sealer.seal(frame))

    def seal_open() -> None:
        sealer, opener = Sealer(key), Opener(key)
        for frame in frames:
            opener.receive_data(sealer.seal(frame))

    return {
        "memcpy": rate_mib_s(memcpy, size),
        "null framing": rate_mib_s(null_frames, size),
        "seal": rate_mib_s(seal, size),
        "open": rate_mib_s(open_, size),
        "seal+open": rate_mib_s(seal_open, size),
        "AES-256-GCM enc+dec": rate_mib_s(lambda: raw_aead(AESGCM(key), frames), size),
    }


def raw_aead(aead: Any, frames: list[bytes]) -> None:
    """Encrypt and decrypt each frame with ``aead`` directly (no framing): for the comparison column."""
    nonce = bytes(12)
    for frame in frames:
        aead.decrypt(nonce, aead.encrypt(nonce, frame, b"hdr"), b"hdr")


# --------------------------------------------------------------------------- (b) the pipeline


def encoded_stream(memory_pages: int, dirty_pages: int, checkpoints: int, compression: bool,
                   seed: int) -> tuple[bytes, list[list[bytes]], int]:
    """The opening and each checkpoint's chunks for a simulated guest with random page contents."""
    rng = random.Random(seed)
    spec = SimSpec("bench", memory=memory_pages * PAGE_SIZE)
    opening = session_header({"domain": "bench", "kind": "sim", "sim": spec.to_dict()})
    encoder = CheckpointEncoder(compression)
    out: list[list[bytes]] = []
    payload = 0
    for seq in range(1, checkpoints + 2):
        dirty = list(range(memory_pages)) if seq == 1 else sorted(rng.sample(range(memory_pages), dirty_pages))
        records: list[Any] = [DomainHeader(SIM_DHDR_TYPE, 0, 0)] if seq == 1 else []
        for start in range(0, len(dirty), MAX_BATCH_PAGES):
            batch = dirty[start : start + MAX_BATCH_PAGES]
            records.append(PageData(tuple(batch), tuple(rng.randbytes(PAGE_SIZE) for _ in batch)))
        records += [SimVcpu(seq * 100, seq, seq, bytes(32)), Checkpoint()]
        encoded = encoder.encode(seq, records)
        out.append(list(encoded.chunks))
        if seq > 1:
            payload += encoded.wire_bytes
    return opening, out, payload


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class AckReader:
    """The primary's ACK side: opens frames from the backup and waits for a given ACK."""

    def __init__(self, sock: socket.socket, link: SealedLink) -> None:
        self.sock, self.link = sock, link
        self.decoder = StreamDecoder()
        self.decoder.receive_data(StreamHeader().encode())
        self.acked = -1

    def wait(self, seq: int) -> None:
        while self.acked < seq:
            data = self.sock.recv(65536)
            if not data:
                raise RuntimeError("the backup closed the connection")
            for plaintext in self.link.receive_data(data):
                self.decoder.receive_data(plaintext)
            for event in self.decoder.events():
                if isinstance(event, Ack):
                    self.acked = event.seq
                elif isinstance(event, Close):
                    raise RuntimeError(f"the backup closed the session: {event.message}")


def serve_backup(listener: socket.socket, key: bytes, sealed: bool, committed: list[int]) -> None:
    conn, _addr = listener.accept()
    with conn:
        _tune(conn)
        link = respond(conn, key) if sealed else SealedLink.unsealed()
        session = BackupSession()
        while True:
            data = conn.recv(1 << 18)
            for plaintext in link.receive_data(data):
                for output in session.receive_data(plaintext):
                    if isinstance(output, SendBack):
                        link.send(conn, encode_record(output.record))
            if not data:
                committed.append(session.image.seq)
                return


def one_transfer(opening: bytes, checkpoints: list[list[bytes]], sealed: bool) -> tuple[float, float]:
    """Wall and CPU seconds (both sides: they are threads of this process) from the first steady
    checkpoint to the last ACK; the handshake and the first, whole-memory checkpoint are excluded."""
    key = os.urandom(64)
    listener = socket.create_server(("127.0.0.1", 0))
    committed: list[int] = []
    backup = threading.Thread(target=serve_backup, args=(listener, key, sealed, committed), daemon=True)
    backup.start()
    with socket.create_connection(listener.getsockname()[:2], timeout=60) as sock:
        _tune(sock)
        link = initiate(sock, key) if sealed else SealedLink.unsealed()
        acks = AckReader(sock, link)
        link.send(sock, opening)
        acks.wait(0)
        for chunk in checkpoints[0]:
            link.send(sock, chunk)
        acks.wait(1)
        start, start_cpu = time.perf_counter(), time.process_time()
        for seq, chunks in enumerate(checkpoints[1:], 2):
            for chunk in chunks:
                link.send(sock, chunk)
            acks.wait(seq)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - start_cpu
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(65536):
            pass
    backup.join(timeout=60)
    listener.close()
    if committed != [len(checkpoints)]:
        raise RuntimeError(f"the backup committed {committed}, not {len(checkpoints)}")
    return elapsed, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memory-mib", type=int, default=32)
    parser.add_argument("--dirty-pages", type=int, default=2048, help="pages per steady checkpoint")
    parser.add_argument("--checkpoints", type=int, default=12, help="steady checkpoints per run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--aead-pages", type=int, default=2048)
    args = parser.parse_args()

    rng = random.Random(1)
    pages = [rng.randbytes(PAGE_SIZE) for _ in range(args.aead_pages)]
    print(f"(a) ChaCha20-Poly1305 on {args.aead_pages} random 4 KiB pages, MiB per CPU second (ratio to memcpy)")
    for per_frame, label in ((1, "4 KiB frames"), (16, "64 KiB frames"), (256, "1 MiB frames")):
        figures = aead_figures(pages, per_frame)
        base = figures["memcpy"]
        line = "  ".join(f"{k} {v:8.0f} ({v / base:5.3f})" for k, v in figures.items())
        print(f"  {label:13} {line}")

    memory_pages = args.memory_mib * MIB // PAGE_SIZE
    print(f"(b) checkpoint pipeline over TCP 127.0.0.1: sim guest {args.memory_mib} MiB, random pages, "
          f"{args.dirty_pages} dirty pages per checkpoint, {args.checkpoints} checkpoints per run, "
          f"medians of {args.rounds} alternating runs")
    print(f"  {'stream':16} {'sealed MiB/s':>13} {'unsealed':>9} {'ratio':>6}   "
          f"{'sealed MiB/cpu-s':>17} {'unsealed':>9} {'ratio':>6}   {'sealed ckpt/s':>14} {'unsealed':>9}")
    for compression in (False, True):
        opening, checkpoints, payload = encoded_stream(memory_pages, args.dirty_pages, args.checkpoints,
                                                       compression, seed=2)
        runs: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
        for _ in range(args.rounds):
            for sealed in (True, False):
                runs[sealed].append(one_transfer(opening, checkpoints, sealed))
        wall = {k: statistics.median(r[0] for r in v) for k, v in runs.items()}
        cpu = {k: statistics.median(r[1] for r in v) for k, v in runs.items()}
        label = "compressed" if compression else "--no-compression"
        mib = payload / MIB
        print(f"  {label:16} {mib / wall[True]:13.1f} {mib / wall[False]:9.1f} {wall[False] / wall[True]:6.2f}   "
              f"{mib / cpu[True]:17.1f} {mib / cpu[False]:9.1f} {cpu[False] / cpu[True]:6.2f}   "
              f"{args.checkpoints / wall[True]:14.1f} {args.checkpoints / wall[False]:9.1f}")
    print("  ratio = sealed / unsealed throughput (target >= 0.8); MiB/cpu-s counts the CPU of both sides")


if __name__ == "__main__":
    main()

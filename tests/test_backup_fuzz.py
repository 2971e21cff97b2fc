"""Fuzz campaigns over the backup: the sans-IO session, and the real receiver behind the sealed link.

Inputs are valid primary streams, mutated (bytes flipped, inserted, deleted, duplicated,
spliced from another stream, cut) and fed in random pieces.  Every input is derived from
``random.Random(SEED + i)``, so a failure names the input that reproduces it.  What must
hold for every input: only ``RemoteProtocolError`` comes out (anything else is a bug), the
call returns (no hang), and every checkpoint that gets committed is, byte for byte, a
checkpoint the primary really took (0 garbled commits).

``REMUS_FUZZ_RUNS`` sets the number of inputs of the sans-IO campaign (default 3000; run
100000 or more for a long campaign); the campaign through the receiver runs a tenth of it.
"""

from __future__ import annotations

import os
import random
import time
from typing import Any

import pytest

from remus.backup.session import BackupSession, Committed
from remus.errors import RemoteProtocolError
from remus.sim.memory import MemoryDigest
from remus.sim.spec import SimSpec
from remus.stream.codec import encode_record
from remus.stream.records import PAGE_SIZE, Checkpoint, Close, CloseReason, DomainHeader, PageData, SimVcpu
from remus.stream.sender import CheckpointEncoder, session_header

RUNS = int(os.environ.get("REMUS_FUZZ_RUNS", "3000"))
SEED = 20261128
PAGES = 256  # 1 MiB, the smallest simulated guest
from remus.sim.domain import SIM_DHDR_TYPE  # noqa: E402


class SmallPrimary:
    """A 1 MiB guest whose checkpoints are computed in-process (digest per checkpoint)."""

    def __init__(self, seed: int, compression: bool) -> None:
        rng = random.Random(seed)
        self.rng = rng
        self.memory = bytearray(rng.randbytes(PAGES * PAGE_SIZE))
        encoder = CheckpointEncoder(compression, cache_pages=8)
        spec = SimSpec("f", memory=PAGES * PAGE_SIZE)
        self.stream = bytearray(session_header({"domain": "f", "kind": "sim", "sim": spec.to_dict(),
                                                "give_up_ms": 200}))
        self.digests: dict[int, bytes] = {}
        self.commit_ends: list[int] = [len(self.stream)]
        for seq in range(1, 5):
            dirty = list(range(PAGES)) if seq == 1 else sorted(rng.sample(range(PAGES), rng.randint(1, 6)))
            for pfn in dirty[1:] if seq == 1 else dirty:
                off = pfn * PAGE_SIZE + rng.randrange(PAGE_SIZE - 8)
                self.memory[off : off + 8] = rng.randbytes(8)
            digest = MemoryDigest.of(bytes(self.memory)).digest()
            records: list[Any] = [DomainHeader(SIM_DHDR_TYPE, 0, 0)] if seq == 1 else []
            records.append(PageData(tuple(dirty), tuple(
                bytes(self.memory[p * PAGE_SIZE : (p + 1) * PAGE_SIZE]) for p in dirty)))
            records += [SimVcpu(seq * 10, seq, seq, digest), Checkpoint()]
            for chunk in encoder.encode(seq, records, captured_unix=1_700_000_000.0 + seq).chunks:
                self.stream += chunk
            self.digests[seq] = digest
            self.commit_ends.append(len(self.stream))
        self.stream += encode_record(Close(CloseReason.STOPPED, "done"))


PRIMARIES = [SmallPrimary(seed, compression) for seed in (1, 2) for compression in (True, False)]


def mutate(rng: random.Random, primary: SmallPrimary, other: bytes) -> bytes:
    """``primary``'s stream, mutated after a random checkpoint boundary (so that some
    checkpoints before the damage commit and the damage meets every later stage)."""
    data = bytes(primary.stream)
    out = bytearray(data)
    floor = rng.choice(primary.commit_ends)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(7)
        at = rng.randrange(min(floor, len(out)), len(out) + 1)
        if op == 0 and out:  # flip a few bits
            for _ in range(rng.randint(1, 8)):
                i = rng.randrange(len(out))
                out[i] ^= 1 << rng.randrange(8)
        elif op == 1:  # insert random bytes
            out[at:at] = rng.randbytes(rng.randint(1, 64))
        elif op == 2:  # delete a range
            del out[at : at + rng.randint(1, 256)]
        elif op == 3:  # duplicate a range
            out[at:at] = out[at : at + rng.randint(1, 512)]
        elif op == 4:  # splice in a piece of another stream
            start = rng.randrange(len(other))
            out[at:at] = other[start : start + rng.randint(8, 2048)]
        elif op == 5:  # cut
            del out[at:]
        elif op == 6 and len(out) >= 16:  # overwrite a record length field with something big
            i = rng.randrange(min(floor, len(out) - 16), len(out) - 8)
            out[i + 4 : i + 8] = rng.choice([0xFFFFFFFF, 0x7FFFFFFF, 1 << 24, 0]).to_bytes(4, "little")
    return bytes(out)


def feed(session: BackupSession, data: bytes, rng: random.Random) -> list[Any]:
    """Feed ``data`` in random pieces, then EOF; the outputs up to the first protocol error."""
    outputs: list[Any] = []
    pos = 0
    try:
        while pos < len(data):
            step = rng.choice([1, 7, 64, 4096, 1 << 20])
            outputs += session.receive_data(data[pos : pos + step])
            pos += step
        outputs += session.receive_data(b"")
    except RemoteProtocolError:
        pass
    return outputs


def check_commits(session: BackupSession, outputs: list[Any], primary: SmallPrimary, case: int) -> int:
    commits = [o.seq for o in outputs if isinstance(o, Committed)]
    if session.image.seq:
        got = MemoryDigest.of(session.image.memory(PAGES)).digest()
        assert got == primary.digests[session.image.seq], f"garbled commit, input {case}"
    return len(commits)


@pytest.mark.slow
def test_fuzzing_the_sans_io_session_commits_only_real_checkpoints() -> None:
    started = time.monotonic()
    committed = protocol_errors = 0
    for case in range(RUNS):
        rng = random.Random(SEED + case)
        primary, other = rng.sample(PRIMARIES, 2)
        data = mutate(rng, primary, bytes(other.stream))
        session = BackupSession(max_memory=1 << 20)
        try:
            outputs = feed(session, data, rng)
        except Exception as exc:  # anything but RemoteProtocolError is a bug
            raise AssertionError(f"input {case} (seed {SEED + case}) raised {type(exc).__name__}: {exc}") from exc
        committed += check_commits(session, outputs, primary, case)
        protocol_errors += session.state.name != "CLOSED"
    elapsed = time.monotonic() - started
    print(f"\nfuzz: {RUNS} inputs in {elapsed:.1f} s, {committed} checkpoints committed (all genuine)")
    assert committed > 0  # the campaign does reach commits, or it proves nothing


@pytest.mark.slow
def test_fuzzing_the_receiver_through_the_sealed_link_never_ends_it_or_garbles_a_commit() -> None:
    from tests.helpers import SealedClient
    from tests.test_transport import ReceiverThread

    backup = ReceiverThread(once=False)
    runs = max(20, RUNS // 10)
    try:
        for case in range(runs):
            rng = random.Random(SEED + 7_000_000 + case)
            primary, other = rng.sample(PRIMARIES, 2)
            data = mutate(rng, primary, bytes(other.stream))
            before = len(backup.events)
            with SealedClient(backup.port) as client:
                client.sendall(data)
            deadline = time.monotonic() + 15
            ended = ("closed", "broken", "refused", "nothing-to-activate", "activated", "activation-failed",
                     "no-session")
            while not any(e["event"] in ended for e in backup.events[before:]):
                assert backup.thread.is_alive(), f"the receiver ended at input {case}"
                assert time.monotonic() < deadline, f"input {case} hung the receiver: {backup.events[before:]}"
                time.sleep(0.01)
            for event in backup.events[before:]:
                if event["event"] == "activated":
                    assert event["verified"] is True  # the sim guest checks the digest itself
            # An activated simulated guest would refuse the next session for its name: stop it.
            for running in list(backup.receiver._running.values()):
                running.standby.close()
            backup.receiver._running.clear()
        assert backup.thread.is_alive()
    finally:
        backup.finish()

"""The backup's session, sans I/O: commits, acks, and a committed image that no cut or
garbage in the stream can turn into a partial checkpoint."""

from __future__ import annotations

import random
import zlib
from typing import Optional

import pytest

from remus.backup.session import BackupSession, ClosedByPrimary, Committed, Opened, Refused, SendBack, StreamEnded
from remus.errors import RemoteProtocolError
from remus.sim.domain import SIM_DHDR_TYPE
from remus.sim.memory import MemoryDigest
from remus.sim.spec import SimSpec
from remus.stream.codec import encode_record
from remus.stream.records import (
    PAGE_SIZE,
    Ack,
    Checkpoint,
    Close,
    CloseReason,
    Commit,
    DomainHeader,
    PageData,
    SimVcpu,
)
from remus.stream.sender import CheckpointEncoder, session_header

PAGES = 256


class SyntheticPrimary:
    """A guest whose checkpoints are computed in-process, with a digest per checkpoint."""

    def __init__(self, seed: int, compression: bool = True) -> None:
        self.rng = random.Random(seed)
        self.memory = bytearray(self.rng.randbytes(PAGES * PAGE_SIZE))
        self.encoder = CheckpointEncoder(compression, cache_pages=64)
        self.digests: list[bytes] = [b""]  # digests[seq]
        self.counter = 0
        spec = SimSpec("t", memory=PAGES * PAGE_SIZE)
        self.opening = session_header({"domain": "t", "kind": "sim", "sim": spec.to_dict(), "give_up_ms": 200})
        self.commit_ends: list[int] = [len(self.opening)]  # stream offset after each COMMIT
        self.stream = bytearray(self.opening)

    def checkpoint(self) -> None:
        seq = len(self.digests)
        if seq == 1:
            dirty = list(range(PAGES))
        else:
            dirty = sorted(self.rng.sample(range(PAGES), self.rng.randint(1, 40)))
            for pfn in dirty:
                off = pfn * PAGE_SIZE + self.rng.randrange(0, PAGE_SIZE - 16)
                self.memory[off : off + 16] = self.rng.randbytes(16)
        self.counter += 100
        digest = MemoryDigest.of(bytes(self.memory)).digest()
        records: list = [DomainHeader(SIM_DHDR_TYPE, 0, 0)] if seq == 1 else []
        for start in range(0, len(dirty), 100):
            chunk = dirty[start : start + 100]
            records.append(PageData(tuple(chunk), tuple(
                bytes(self.memory[p * PAGE_SIZE : (p + 1) * PAGE_SIZE]) for p in chunk)))
        records += [SimVcpu(self.counter, seq, seq, digest), Checkpoint()]
        encoded = self.encoder.encode(seq, records, captured_unix=1_700_000_000.0 + seq)
        for chunk in encoded.chunks:
            self.stream += chunk
        self.commit_ends.append(len(self.stream))
        self.digests.append(digest)


def make_primary(checkpoints: int = 6, seed: int = 1, compression: bool = True) -> SyntheticPrimary:
    primary = SyntheticPrimary(seed, compression)
    for _ in range(checkpoints):
        primary.checkpoint()
    return primary


def image_digest(session: BackupSession) -> bytes:
    return MemoryDigest.of(session.image.memory(PAGES)).digest()


def assert_image_is_checkpoint(session: BackupSession, primary: SyntheticPrimary) -> None:
    seq = session.image.seq
    if seq:
        assert image_digest(session) == primary.digests[seq]
        vcpu = session.image.sim_vcpu()
        assert vcpu is not None and vcpu.memory_digest == primary.digests[seq]


@pytest.mark.parametrize("compression", [True, False], ids=["compressed", "raw"])
def test_commits_and_acks(compression: bool) -> None:
    primary = make_primary(compression=compression)
    session = BackupSession()
    outputs = session.receive_data(bytes(primary.stream)) + session.receive_data(b"")
    assert isinstance(outputs[0], Opened)
    acks = [o.record.seq for o in outputs if isinstance(o, SendBack) and isinstance(o.record, Ack)]
    assert acks == [0, 1, 2, 3, 4, 5, 6]
    assert [o.seq for o in outputs if isinstance(o, Committed)] == [1, 2, 3, 4, 5, 6]
    assert outputs[-1] == StreamEnded(0)
    assert session.image.seq == 6
    assert_image_is_checkpoint(session, primary)


def test_a_cut_anywhere_leaves_the_last_complete_checkpoint() -> None:
    primary = make_primary()
    stream = bytes(primary.stream)
    rng = random.Random(7)
    offsets = sorted(set(rng.randrange(0, len(stream)) for _ in range(150)) | set(primary.commit_ends)
                     | {e - 1 for e in primary.commit_ends} | {e + 1 for e in primary.commit_ends})
    for offset in offsets:
        session = BackupSession()
        session.receive_data(stream[:offset])
        session.receive_data(b"")
        complete = sum(1 for end in primary.commit_ends[1:] if end <= offset)
        assert session.image.seq == complete, offset
        assert_image_is_checkpoint(session, primary)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["insert", "flip", "overwrite"])
def test_garbage_raises_a_protocol_error_and_never_a_partial_checkpoint(mode: str) -> None:
    primary = make_primary()
    stream = bytes(primary.stream)
    rng = random.Random(zlib.crc32(mode.encode()))  # seeded, replayable (hash() of a str is not)
    errors = 0
    for _ in range(120):
        offset = rng.randrange(0, len(stream))
        if mode == "insert":
            data = stream[:offset] + rng.randbytes(rng.randint(1, 64)) + stream[offset:]
        elif mode == "flip":
            data = bytearray(stream)
            data[offset] ^= 1 << rng.randrange(8)
            data = bytes(data)
        else:
            n = rng.randint(1, 200)
            data = stream[:offset] + rng.randbytes(n) + stream[offset + n:]
        session = BackupSession()
        chunk = rng.choice([61, 4096, 1 << 20])
        try:
            for start in range(0, len(data), chunk):
                session.receive_data(data[start : start + chunk])
            session.receive_data(b"")
        except RemoteProtocolError:
            errors += 1
        # Whatever happened, the image is a complete checkpoint from before the damage.
        complete_before = sum(1 for end in primary.commit_ends[1:] if end <= offset)
        assert session.image.seq <= max(complete_before, 0) or data == stream, offset
        assert_image_is_checkpoint(session, primary)
    assert errors > 60  # most damage is detected as such, not silently survived


def stream_of(*records: object, opening: Optional[bytes] = None) -> bytes:
    primary_opening = opening if opening is not None else make_primary(0).opening
    return primary_opening + b"".join(encode_record(r) for r in records)  # type: ignore[arg-type]


def first_checkpoint_records() -> list:
    page = bytes(PAGE_SIZE)
    return [DomainHeader(SIM_DHDR_TYPE, 0, 0), PageData((1,), (page,)), SimVcpu(1, 1, 1, b"\0" * 32),
            Checkpoint()]


@pytest.mark.parametrize("name,records,needle", [
    ("commit-out-of-order", first_checkpoint_records() + [Commit(2, 4, 0)], "COMMIT 2 where 1 was due"),
    ("commit-bad-crc", first_checkpoint_records() + [Commit(1, 4, 0)], "does not match its COMMIT"),
    ("ack-from-primary", [Ack(1)], "Ack record while receiving"),
    ("page-beyond-memory", [DomainHeader(SIM_DHDR_TYPE, 0, 0), PageData((PAGES,), (bytes(PAGE_SIZE),))],
     "beyond the domain's 256 pages"),
    ("record-after-checkpoint", first_checkpoint_records() + [PageData((1,), (bytes(PAGE_SIZE),))],
     "after CHECKPOINT"),
    ("late-domain-header", [PageData((1,), (bytes(PAGE_SIZE),)), DomainHeader(SIM_DHDR_TYPE, 0, 0)],
     "domain header anywhere but"),
])
def test_out_of_place_records_are_protocol_errors(name: str, records: list, needle: str) -> None:
    session = BackupSession()
    with pytest.raises(RemoteProtocolError) as info:
        session.receive_data(stream_of(*records))
    assert needle in str(info.value)
    assert session.image.seq == 0


def test_commit_without_checkpoint_record_or_vcpu_is_refused() -> None:
    from remus.stream.codec import CommitDigest

    records = first_checkpoint_records()[:-1]  # no CHECKPOINT
    digest = CommitDigest()
    for r in records:
        digest.add(r.TYPE, encode_record(r))
    count, crc = digest.take()
    session = BackupSession()
    with pytest.raises(RemoteProtocolError, match="without a CHECKPOINT"):
        session.receive_data(stream_of(*records, Commit(1, count, crc)))


def test_orderly_close_is_not_a_failover() -> None:
    primary = make_primary(2)
    session = BackupSession()
    outputs = session.receive_data(bytes(primary.stream) + encode_record(Close(CloseReason.STOPPED, "bye")))
    assert isinstance(outputs[-1], ClosedByPrimary) and outputs[-1].message == "bye"
    with pytest.raises(RemoteProtocolError):
        session.receive_data(encode_record(Ack(1)))


def test_a_session_that_cannot_be_taken_is_refused() -> None:
    bad = session_header({"domain": "t", "kind": "sim", "sim": {"name": "t", "memory": -5}})
    session = BackupSession()
    outputs = session.receive_data(bad)
    assert isinstance(outputs[-1], Refused)
    assert isinstance(outputs[0], SendBack) and isinstance(outputs[0].record, Close)
    assert outputs[0].record.reason == CloseReason.REFUSED


def test_after_the_primary_hung_up_nothing_more_is_committed_or_acknowledged() -> None:
    # Its FIN is in, with checkpoint 3 still unread (whole) and checkpoint 4 cut: neither is
    # taken, so no ACK the primary could never read; the image stays checkpoint 2.
    primary = make_primary(4)
    stream = bytes(primary.stream)
    session = BackupSession()
    first = session.receive_data(stream[: primary.commit_ends[2]])
    assert [o.seq for o in first if isinstance(o, Committed)] == [1, 2]
    session.primary_hung_up()
    rest = session.receive_data(stream[primary.commit_ends[2] : primary.commit_ends[4] - 5]) + session.receive_data(b"")
    assert not any(isinstance(o, Committed) for o in rest)
    assert not any(isinstance(o, SendBack) for o in rest)
    assert len(rest) == 1 and isinstance(rest[0], StreamEnded) and rest[0].partial_bytes
    assert session.image.seq == 2 and session.not_taken == 1
    assert_image_is_checkpoint(session, primary)


def test_a_hang_up_in_the_middle_of_a_checkpoint_drops_what_was_staged() -> None:
    primary = make_primary(3)
    stream = bytes(primary.stream)
    middle = primary.commit_ends[3] - 33  # all of checkpoint 3 staged but its COMMIT
    session = BackupSession()
    session.receive_data(stream[:middle])
    assert session.receiving
    session.primary_hung_up()
    assert not session.receiving
    assert session.receive_data(stream[middle:]) == []
    assert session.image.seq == 2 and session.not_taken == 1
    assert_image_is_checkpoint(session, primary)


def test_an_orderly_close_after_a_hang_up_stays_orderly() -> None:
    primary = make_primary(2)
    session = BackupSession()
    session.receive_data(bytes(primary.stream[: primary.commit_ends[1]]))
    session.primary_hung_up()
    outputs = session.receive_data(bytes(primary.stream[primary.commit_ends[1] :])
                                   + encode_record(Close(CloseReason.STOPPED, "bye")))
    assert [type(o) for o in outputs] == [ClosedByPrimary]
    assert session.image.seq == 1


def test_a_hang_up_before_the_session_is_open_changes_nothing() -> None:
    primary = make_primary(2)
    session = BackupSession()
    session.primary_hung_up()  # still awaiting the stream header: not a session to cut short
    outputs = session.receive_data(bytes(primary.stream))
    assert [o.seq for o in outputs if isinstance(o, Committed)] == [1, 2]

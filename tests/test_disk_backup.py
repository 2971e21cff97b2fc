"""Disk records through the engine's hook and the backup session: sent before the COMMIT,
covered by it, applied at that COMMIT only."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from remus.backup.session import BackupSession, Committed
from remus.clock import FakeClock, StopFlag
from remus.disk.device import DiskDevice
from remus.disk.epochs import RecordingImage
from remus.disk.server import ImageFile
from remus.engine import Engine
from remus.errors import RemoteProtocolError
from remus.sim.domain import SIM_DHDR_TYPE
from remus.sim.spec import SimSpec
from remus.stream.codec import StreamDecoder
from remus.stream.records import Checkpoint, Commit, DiskWrite, DomainHeader, PageData, SimVcpu, StreamHeader
from remus.stream.sender import CheckpointEncoder, session_header
from tests.helpers import CallLog, FakeChannel, FakeDomain, stop_after

DISK = 64 * 1024


def test_engine_sends_the_epoch_after_the_capture_and_before_the_commit(tmp_path: Path) -> None:
    path = tmp_path / "d.img"
    path.write_bytes(bytes(DISK))
    target = RecordingImage(ImageFile(str(path)))
    device = DiskDevice(0, target)
    log, clock = CallLog(), FakeClock()
    domain = FakeDomain(log, clock)
    channel = FakeChannel(log, clock)
    stop = StopFlag()
    seen: list[int] = []

    def on_call(what: str, seq: int) -> None:  # the guest writes while it runs
        if what == "resume":
            target.write(4096 * seq, b"w%d" % seq, False)
            seen.append(seq)

    domain.on_call = on_call
    Engine(domain, channel, interval_ms=10, devices=[device], clock=clock, stop=stop,
           on_checkpoint=stop_after(stop, 3)).run()
    kinds = []
    for encoded in channel.sent:
        decoder = StreamDecoder()
        decoder.receive_data(StreamHeader().encode() + b"".join(encoded.chunks))
        records = list(decoder.events())[1:]
        kinds.append([type(r).__name__ for r in records])
        commit = records[-1]
        assert isinstance(commit, Commit) and commit.records == len(records) - 1
        writes = [r for r in records if isinstance(r, DiskWrite)]
        if encoded.seq == 1:
            assert b"".join(w.data for w in writes) == bytes(DISK)  # the whole disk first
        else:  # the write made after checkpoint seq-1 resumed the guest
            assert writes == [DiskWrite(0, 4096 * (encoded.seq - 1), b"w%d" % (encoded.seq - 1))]
    assert kinds[1] == ["PageBatch", "Checkpoint", "DiskWrite", "Commit"]
    assert not target.log.protecting  # released
    target.image.close()


class DiskPrimary:
    """A synthetic primary: a tiny sim guest plus a disk, its checkpoints encoded in-process."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        spec = SimSpec("t", memory=1 << 20)
        self.opening = session_header({"domain": "t", "kind": "sim", "sim": spec.to_dict(),
                                       "disks": [{"path": "/images/t.img", "size": DISK}]})
        self.encoder = CheckpointEncoder(True)
        self.disk = bytearray(DISK)
        self.disks = [b""]  # disk after checkpoint seq
        self.stream = bytearray(self.opening)
        self.commit_ends = [len(self.stream)]

    def checkpoint(self) -> None:
        seq = len(self.disks)
        records: list = [DomainHeader(SIM_DHDR_TYPE, 0, 0)] if seq == 1 else []
        records += [PageData((seq,), (bytes(4096),)), SimVcpu(seq, 0, 0, bytes(32)), Checkpoint()]
        if seq == 1:
            records.append(DiskWrite(0, 0, bytes(self.disk)))
        for _ in range(self.rng.randint(1, 6)):
            off = self.rng.randrange(0, DISK - 600)
            data = self.rng.randbytes(self.rng.randint(1, 600))
            self.disk[off : off + len(data)] = data
            records.append(DiskWrite(0, off, data))
        for chunk in self.encoder.encode(seq, records).chunks:
            self.stream += chunk
        self.commit_ends.append(len(self.stream))
        self.disks.append(bytes(self.disk))


def replica(root: Path) -> bytes:
    return (root / "images/t.img").read_bytes()


def test_a_cut_anywhere_leaves_the_replica_at_the_last_committed_checkpoint(tmp_path: Path) -> None:
    primary = DiskPrimary(5)
    for _ in range(5):
        primary.checkpoint()
    rng = random.Random(7)
    cuts = sorted(rng.sample(range(len(primary.opening), len(primary.stream)), 25)) + primary.commit_ends[1:]
    for i, cut in enumerate(cuts):
        root = tmp_path / f"r{i}"
        session = BackupSession(disk_root=str(root))
        session.receive_data(bytes(primary.stream[:cut]))
        session.receive_data(b"")
        seq = session.image.seq
        assert seq == sum(1 for end in primary.commit_ends[1:] if end <= cut)
        if seq:  # before the first commit the replica holds whatever arrived (nothing to fail over to)
            assert replica(root) == primary.disks[seq]
        assert session.disks is not None
        session.disks.close()


def test_a_corrupt_checkpoint_never_touches_the_replica(tmp_path: Path) -> None:
    primary = DiskPrimary(9)
    primary.checkpoint()
    primary.checkpoint()
    stream = bytearray(primary.stream)
    stream[primary.commit_ends[2] - 30] ^= 0xFF  # a byte inside checkpoint 2's last disk write
    session = BackupSession(disk_root=str(tmp_path))
    outputs = session.receive_data(bytes(stream[: primary.commit_ends[1]]))
    assert any(isinstance(o, Committed) for o in outputs)
    with pytest.raises(RemoteProtocolError):
        session.receive_data(bytes(stream[primary.commit_ends[1] :]))
    assert replica(tmp_path) == primary.disks[1]


def test_disk_records_need_disks_and_must_fit(tmp_path: Path) -> None:
    spec = SimSpec("t", memory=1 << 20)
    session = BackupSession()
    session.receive_data(session_header({"domain": "t", "kind": "sim", "sim": spec.to_dict()}))
    encoded = CheckpointEncoder(False).encode(1, [DomainHeader(SIM_DHDR_TYPE, 0, 0), Checkpoint(),
                                                  DiskWrite(0, 0, b"x")])
    with pytest.raises(RemoteProtocolError, match="replicates no disk"):
        session.receive_data(b"".join(encoded.chunks))
    refused = BackupSession(disk_root=str(tmp_path))
    outputs = refused.receive_data(session_header({"domain": "t", "kind": "sim", "sim": spec.to_dict(),
                                                   "disks": [{"path": "rel.img", "size": 1}]}))
    assert any(type(o).__name__ == "Refused" for o in outputs)


def test_receiver_disk_root_option() -> None:
    from remus.backup.cli import parse

    assert parse([])["disk_root"] == ""
    assert parse(["--disk-root", "/srv/replicas"])["disk_root"] == "/srv/replicas"


def test_a_broken_replica_set_is_never_handed_to_a_domain(tmp_path: Path) -> None:
    from remus.backup.activation import DiskStandby
    from remus.disk.replica import DiskSpec, DiskStaging, ReplicaSet
    from remus.errors import DiskError
    from remus.stream.records import DiskDigest

    class Inner:
        activated = discarded = False

        def committed(self, image: object, seq: int, changed: object) -> None: ...

        def activate(self) -> dict[str, object]:
            Inner.activated = True
            return {"counter": 1}

        def discard(self) -> None:
            Inner.discarded = True

        def close(self) -> None: ...

        def warming(self) -> bool:
            return False

    replicas = ReplicaSet([DiskSpec("/d.img", 4096)], root=str(tmp_path))
    replicas.apply(1, DiskStaging())
    staging = DiskStaging()
    replicas.stage(staging, DiskDigest(0, 4096, bytes(32)))  # the replica will not match it
    with pytest.raises(RemoteProtocolError):
        replicas.apply(2, staging)
    standby = DiskStandby(Inner(), replicas)  # type: ignore[arg-type]
    with pytest.raises(DiskError, match="refusing to hand over"):
        standby.activate()
    assert not Inner.activated
    good = DiskStandby(Inner(), ReplicaSet([DiskSpec("/e.img", 4096)], root=str(tmp_path)))  # type: ignore[arg-type]
    assert good.activate() == {"counter": 1, "disks": [str(tmp_path / "e.img")], "disk_seq": 0}

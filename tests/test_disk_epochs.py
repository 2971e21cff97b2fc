"""Epochs on the primary and the replica on the backup, including the epoch rule under load."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Iterator

import pytest

from remus.disk.epochs import EpochLog, RecordingImage, file_digest, write_records
from remus.disk.replica import DiskSpec, DiskStaging, ReplicaSet, replica_path
from remus.disk.server import ImageFile, NbdServer
from remus.errors import DiskError, RemoteProtocolError
from remus.sim.disk import NbdClient
from remus.stream.records import DISK_WRITE_MAX_BYTES, DiskDigest, DiskWrite, decode_record

SEED = int(os.environ.get("REMUS_DISK_SEED", "11"))

def image_file(tmp: Path, size: int, fill: bytes = b"\0") -> str:
    path = str(tmp / "disk.img")
    with open(path, "wb") as f:
        f.write(fill * size)
    return path

def test_nothing_is_recorded_before_protection_and_epochs_split_at_boundaries() -> None:
    log = EpochLog()
    log.record(0, b"before")
    log.start()
    log.record(10, b"one")
    first = log.mark_boundary()
    log.record(20, b"two")
    log.record(30, b"three")
    second = log.mark_boundary()
    assert first.writes == [(10, b"one")]
    assert second.writes == [(20, b"two"), (30, b"three")] and second.nbytes == 8
    log.stop()
    log.record(40, b"after")
    assert log.open.writes == []

def test_an_epoch_over_its_limit_fails_its_checkpoint_with_the_cure() -> None:
    log = EpochLog(max_epoch_bytes=10)
    log.start()
    log.record(0, b"x" * 8)
    log.record(8, b"y" * 8)
    with pytest.raises(DiskError, match="checkpoint more often"):
        log.mark_boundary()
    log.record(0, b"z")
    assert log.mark_boundary().writes == [(0, b"z")]

def test_write_records_are_bounded_and_round_trip() -> None:
    data = bytes(range(256)) * (DISK_WRITE_MAX_BYTES // 256 * 2 + 3)
    records = write_records(2, [(4096, data), (0, b"abc")])
    assert [(r.offset, len(r.data)) for r in records if isinstance(r, DiskWrite)] == [
        (4096, DISK_WRITE_MAX_BYTES), (4096 + DISK_WRITE_MAX_BYTES, DISK_WRITE_MAX_BYTES),
        (4096 + 2 * DISK_WRITE_MAX_BYTES, 768), (0, 3),
    ]
    for record in records:
        assert isinstance(record, DiskWrite)
        assert decode_record(record.TYPE, record.encode_body()) == record
    body = DiskWrite(1, 5, b"hi").encode_body()
    # u32 disk 1, u32 reserved, u64 offset 5, data
    assert body.hex() == "01000000" "00000000" "0500000000000000" "6869"
    with pytest.raises(RemoteProtocolError):
        decode_record(DiskWrite.TYPE, body[:16])  # no data

def test_first_boundary_carries_the_whole_disk_then_only_the_epoch(tmp_path: Path) -> None:
    path = image_file(tmp_path, 3 << 20, b"\x07")
    rec = RecordingImage(ImageFile(path))
    rec.write(0, b"unrecorded", False)
    rec.start()
    rec.write(100, b"a", False)
    full = rec.boundary(0, digest=True)
    writes = [r for r in full if isinstance(r, DiskWrite)]
    assert [(w.offset, len(w.data)) for w in writes] == [(0, 1 << 20), (1 << 20, 1 << 20), (2 << 20, 1 << 20)]
    assert full[-1] == DiskDigest(0, 3 << 20, file_digest(path))
    rec.write(200, b"bc", True)
    assert rec.boundary(0) == [DiskWrite(0, 200, b"bc")]

@pytest.fixture
def served_recording() -> Iterator[tuple[RecordingImage, str]]:
    workdir = tempfile.mkdtemp(prefix="epoch-")
    path = os.path.join(workdir, "disk.img")
    with open(path, "wb") as f:
        f.truncate(1 << 20)
    rec = RecordingImage(ImageFile(path))
    server = NbdServer(rec)
    sock = server.listen_unix(os.path.join(workdir, "sock"))
    try:
        yield rec, sock
    finally:
        server.close()
        rec.image.close()
        shutil.rmtree(workdir)

def test_epoch_rule_acknowledged_before_the_boundary_means_in_that_epoch(
    served_recording: tuple[RecordingImage, str],
) -> None:
    """Two guests' writers hammer the server while boundaries fall at random moments.

    Every write a writer saw acknowledged before a boundary began is in that epoch or an
    earlier one; every write is in exactly one epoch; and replaying epochs 1..N gives the
    image as it was at boundary N (its digest, taken under the same lock).
    """
    rec, sock = served_recording
    rng = random.Random(SEED)
    rec.start()
    base = rec.boundary(0)  # the full-sync epoch: the disk before any write
    replay = bytearray(rec.size)
    for r in base:
        if isinstance(r, DiskWrite):
            replay[r.offset : r.offset + len(r.data)] = r.data
    acked: list[int] = []  # write ids, in the order their replies arrived
    stop = threading.Event()

    def writer(wid: int) -> None:
        client = NbdClient(sock)
        n = 0
        while not stop.is_set():
            n += 1
            ident = wid * 1_000_000 + n
            block = (ident * 2654435761) % 256
            client.write(block * 4096, ident.to_bytes(8, "little") * 512)
            acked.append(ident)
        client.close()

    threads = [threading.Thread(target=writer, args=(w,)) for w in (1, 2)]
    for t in threads:
        t.start()
    seen: set[int] = set()
    try:
        for _ in range(40):
            for _spin in range(rng.randrange(1, 2000)):
                pass
            acked_before = set(acked)
            records = rec.boundary(0, digest=True)
            writes = [r for r in records if isinstance(r, DiskWrite)]
            ids = {int.from_bytes(w.data[:8], "little") for w in writes}
            assert not ids & seen, "a write counted in two epochs"
            seen |= ids
            assert acked_before <= seen, "an acknowledged write missing from its epoch"
            for w in writes:
                replay[w.offset : w.offset + len(w.data)] = w.data
            digest = records[-1]
            assert isinstance(digest, DiskDigest)

            assert hashlib.blake2b(bytes(replay), digest_size=32).digest() == digest.digest
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert len(seen) > 40

def test_replica_is_created_with_the_size_and_applies_only_what_is_committed(tmp_path: Path) -> None:
    spec = DiskSpec("/var/lib/xen/images/vm1.img", 64 * 1024)
    replicas = ReplicaSet([spec], root=str(tmp_path))
    path = replica_path(spec, str(tmp_path))
    assert path == str(tmp_path / "var/lib/xen/images/vm1.img") and os.path.getsize(path) == 64 * 1024
    first = DiskStaging()
    replicas.stage(first, DiskWrite(0, 4096, b"F" * 10))  # before the first commit: written through
    assert Path(path).read_bytes()[4096:4106] == b"F" * 10 and first.writes == []
    replicas.apply(1, first)
    staging = DiskStaging()
    replicas.stage(staging, DiskWrite(0, 0, b"A" * 4096))
    replicas.stage(staging, DiskWrite(0, 0, b"B" * 100))  # later writes win, in order
    assert Path(path).read_bytes() == b"\0" * 4096 + b"F" * 10 + bytes(60 * 1024 - 10)  # staged: not applied
    expected = b"B" * 100 + b"A" * 3996 + b"F" * 10 + bytes(60 * 1024 - 10)

    replicas.stage(staging, DiskDigest(0, 64 * 1024, hashlib.blake2b(expected, digest_size=32).digest()))
    replicas.apply(2, staging)
    assert Path(path).read_bytes() == expected
    # an uncommitted checkpoint's staging is simply dropped: nothing reaches the replica
    dropped = DiskStaging()
    replicas.stage(dropped, DiskWrite(0, 8192, b"C" * 10))
    assert replicas.handover() == {"disks": [path], "disk_seq": 2}
    assert Path(path).read_bytes() == expected

def test_replica_refuses_bad_records_and_a_wrong_size(tmp_path: Path) -> None:
    spec = DiskSpec("/d.img", 8192)
    replicas = ReplicaSet([spec], root=str(tmp_path))
    staging = DiskStaging()
    for bad in (DiskWrite(1, 0, b"x"), DiskWrite(0, 8190, b"xyz"), DiskDigest(0, 4096, bytes(32))):
        with pytest.raises(RemoteProtocolError):
            replicas.stage(staging, bad)
    replicas.close()
    with pytest.raises(DiskError, match="remove or resize"):
        ReplicaSet([DiskSpec("/d.img", 4096)], root=str(tmp_path))
    with pytest.raises(RemoteProtocolError):
        DiskSpec.parse_all([{"path": "relative.img", "size": 1}])

def test_a_digest_mismatch_breaks_the_set_and_handover_refuses(tmp_path: Path) -> None:
    replicas = ReplicaSet([DiskSpec("/d.img", 4096)], root=str(tmp_path))
    staging = DiskStaging()
    replicas.stage(staging, DiskDigest(0, 4096, bytes(32)))
    with pytest.raises(RemoteProtocolError, match="differs"):
        replicas.apply(1, staging)
    with pytest.raises(DiskError, match="refusing"):
        replicas.handover()
    replicas.close()


def test_first_sync_sends_only_the_extents_the_backup_lacks(tmp_path: Path) -> None:
    from remus.disk.epochs import EXTENT_BYTES, collect_hashes, extent_hash, hash_records

    size = 3 * EXTENT_BYTES + 4096
    path = image_file(tmp_path, size, b"\x01")
    rec = RecordingImage(ImageFile(path))
    data = Path(path).read_bytes()
    theirs = [extent_hash(data[off : off + EXTENT_BYTES]) for off in range(0, size, EXTENT_BYTES)]
    theirs[1] = extent_hash(bytes(EXTENT_BYTES))  # the backup's extent 1 differs
    records = hash_records(0, theirs) + hash_records(1, [b"x" * 16])  # another disk's are ignored
    for r in records:
        assert decode_record(r.TYPE, r.encode_body()) == r
    rec.peer_hashes = lambda: collect_hashes(records, 0)
    rec.start()
    sent = rec.boundary(0)
    assert [(w.offset, len(w.data)) for w in sent if isinstance(w, DiskWrite)] == [(EXTENT_BYTES, EXTENT_BYTES)]
    assert (rec.synced_extents, rec.skipped_extents) == (1, 3)


def test_the_backup_sends_its_replicas_hashes_before_accepting(tmp_path: Path) -> None:
    from remus.backup.session import BackupSession, SendBack
    from remus.disk.epochs import extent_hash
    from remus.sim.spec import SimSpec
    from remus.stream.records import Ack, DiskHashes
    from remus.stream.sender import session_header

    existing = tmp_path / "img/d.img"
    existing.parent.mkdir()
    existing.write_bytes(b"\x05" * 8192)
    opening = session_header({"domain": "t", "kind": "sim", "sim": SimSpec("t").to_dict(),
                              "disks": [{"path": "/img/d.img", "size": 8192}, {"path": "/img/new.img", "size": 4096}]})
    session = BackupSession(disk_root=str(tmp_path))
    sent = [o.record for o in session.receive_data(opening) if isinstance(o, SendBack)]
    assert sent == [DiskHashes(0, 1 << 20, 0, (extent_hash(b"\x05" * 8192),)),
                    DiskHashes(1, 1 << 20, 0, (extent_hash(bytes(4096)),)), Ack(0)]
    assert session.disks is not None
    session.disks.close()


def test_a_xen_config_is_retargeted_to_replicas_kept_elsewhere() -> None:
    import json

    from remus.disk.replica import retarget_config

    config = json.dumps({"c_info": {"name": "vm"}, "disks": [
        {"pdev_path": "/img/a.img", "vdev": "xvda", "script": "block-remus"},
        {"pdev_path": "/img/ro.iso", "vdev": "xvdc"}]})
    moved = json.loads(retarget_config(config, {"/img/a.img": "/replicas/img/a.img"}))
    assert [d["pdev_path"] for d in moved["disks"]] == ["/replicas/img/a.img", "/img/ro.iso"]
    assert retarget_config(config, {}) == config

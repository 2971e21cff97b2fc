"""The backup's copies of the primary's disks: staged per checkpoint, applied only at commit.

A session that replicates disks names them in its SESSION record
(``"disks": [{"path": ..., "size": ...}, ...]``, index = position).  The
backup keeps each replica at the same path (under ``root`` if one is given,
for a backup on the same host), creating it with the right size if it is
missing.  ``DiskStaging`` collects one checkpoint's ``DiskWrite`` and
``DiskDigest`` records in memory (pure data, bounded);
``ReplicaSet.apply`` writes them to the replicas when, and only when, that
checkpoint's COMMIT has been verified, in the order they were written on the
primary.  (The first checkpoint's writes go to the replicas as they arrive:
until it commits there is nothing to fail over to.)  A replica therefore always holds the disk of the last committed
checkpoint, and ``handover`` gives it to the domain at failover after an
``fdatasync``.

If applying fails half-way (an I/O error on the backup's own disk) the set
is marked ``broken`` and ``handover`` refuses: a replica between two
checkpoints is never handed to a domain.  What this module never does:
decide when a checkpoint commits (``remus.backup``), or run a domain.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

from remus.disk.epochs import EXTENT_BYTES, extent_hash, fd_extent_hashes, file_digest, hash_records
from remus.errors import DiskError, RemoteProtocolError
from remus.stream.records import MAX_DISKS, DiskDigest, DiskHashes, DiskWrite

log = logging.getLogger(__name__)

#: Bound on one checkpoint's staged disk writes held in memory.
MAX_STAGED_DISK_BYTES = 1 << 30


@dataclass(frozen=True)
class DiskSpec:
    """One replicated disk as the SESSION record describes it."""

    path: str
    size: int

    @classmethod
    def parse_all(cls, disks: Any) -> list["DiskSpec"]:
        """The ``disks`` list of a SESSION record.

        Raises:
            RemoteProtocolError: it is not a list of {path: absolute str, size: int > 0}.
        """
        if not isinstance(disks, list) or len(disks) > MAX_DISKS:
            raise RemoteProtocolError(f"session 'disks' must be a list of at most {MAX_DISKS}")
        specs = []
        for disk in disks:
            path, size = (disk.get("path"), disk.get("size")) if isinstance(disk, dict) else (None, None)
            if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
                raise RemoteProtocolError(f"session disk {disk!r}: 'path' must be an absolute path")
            if not isinstance(size, int) or size <= 0:
                raise RemoteProtocolError(f"session disk {path}: 'size' must be a positive byte count")
            specs.append(cls(os.path.normpath(path), size))
        return specs


@dataclass
class DiskStaging:
    """One checkpoint's disk records, as received (pure data)."""

    writes: list[DiskWrite] = field(default_factory=list)
    digests: dict[int, DiskDigest] = field(default_factory=dict)
    nbytes: int = 0

    def add(self, record: DiskWrite | DiskDigest, specs: Sequence[DiskSpec]) -> None:
        """Stage ``record`` after checking it against the session's disks.

        Raises:
            RemoteProtocolError: unknown disk, a write beyond its end, too much staged.
        """
        if record.disk >= len(specs):
            raise RemoteProtocolError(f"disk record for disk {record.disk}; the session has {len(specs)}")
        spec = specs[record.disk]
        if isinstance(record, DiskDigest):
            if record.size != spec.size:
                raise RemoteProtocolError(f"disk {spec.path}: digest of {record.size} bytes, disk has {spec.size}")
            self.digests[record.disk] = record
            return
        if record.offset + len(record.data) > spec.size:
            raise RemoteProtocolError(f"disk {spec.path}: write at {record.offset} beyond its {spec.size} bytes")
        self.nbytes += len(record.data)
        if self.nbytes > MAX_STAGED_DISK_BYTES:
            raise RemoteProtocolError(f"a checkpoint's disk writes exceed {MAX_STAGED_DISK_BYTES >> 20} MiB")
        self.writes.append(record)


def replica_path(spec: DiskSpec, root: str = "") -> str:
    """Where the backup keeps ``spec``'s replica: the same path, under ``root`` if given."""
    return os.path.join(root, spec.path.lstrip("/")) if root else spec.path


class ReplicaSet:
    """The replicas of one session's disks (see the module docstring)."""

    def __init__(self, specs: Sequence[DiskSpec], root: str = "") -> None:
        """Open (or create with the right size) every replica.

        Raises:
            DiskError: a replica cannot be created or has another size.
        """
        self.specs = list(specs)
        self.paths = [replica_path(spec, root) for spec in self.specs]
        for path in self.paths if root else ():
            os.makedirs(os.path.dirname(path), exist_ok=True)
        self.fds: list[int] = []
        self.created: list[bool] = []
        self.broken = False
        self.applied_seq = 0
        try:
            for spec, path in zip(self.specs, self.paths):
                fd, created = _open_replica(path, spec.size)
                self.fds.append(fd)
                self.created.append(created)
        except BaseException:
            self.close()
            raise

    @classmethod
    def from_session(cls, info: Mapping[str, Any], root: str = "") -> Optional["ReplicaSet"]:
        """The replicas a SESSION record asks for, None if it names no disks."""
        disks = info.get("disks")
        if not disks:
            return None
        return cls(DiskSpec.parse_all(disks), root)

    def hashes(self) -> list[DiskHashes]:
        """DISK_HASHES of every replica, for the primary's first synchronisation.

        A replica created just now is all zeros: its hashes are computed without reading it.
        """
        records: list[DiskHashes] = []
        for index, (spec, fd, created) in enumerate(zip(self.specs, self.fds, self.created)):
            if created:
                full, tail = divmod(spec.size, EXTENT_BYTES)
                hashes = [extent_hash(bytes(EXTENT_BYTES))] * full + ([extent_hash(bytes(tail))] if tail else [])
            else:
                hashes = fd_extent_hashes(fd, spec.size)
            records += hash_records(index, hashes)
        return records

    def stage(self, staging: DiskStaging, record: DiskWrite | DiskDigest) -> None:
        """Stage ``record`` for its checkpoint's commit.

        Until the first checkpoint commits, writes go to the replica at once
        instead: before that commit there is nothing to fail over to, so the
        replica's contents do not matter yet, and the first checkpoint (the
        whole disk) is never held in memory.

        Raises:
            RemoteProtocolError: the record does not fit the session's disks.
            DiskError: a write-through failed (the set is broken from now on).
        """
        staging.add(record, self.specs)
        if self.applied_seq == 0 and isinstance(record, DiskWrite):
            staging.writes.pop()
            staging.nbytes -= len(record.data)
            try:
                _pwrite_all(self.fds[record.disk], record.data, record.offset)
            except OSError as exc:
                self.broken = True
                raise DiskError(f"writing the first checkpoint to the disk replicas failed: {exc}") from None

    def apply(self, seq: int, staging: DiskStaging) -> None:
        """Write checkpoint ``seq``'s staged writes, in order, then check its digests.

        Raises:
            DiskError: writing failed (the set is broken from now on).
            RemoteProtocolError: a replica does not match the primary's digest.
        """
        if self.broken:
            raise DiskError("the disk replicas are broken by an earlier failed apply")
        try:
            for write in staging.writes:
                _pwrite_all(self.fds[write.disk], write.data, write.offset)
        except OSError as exc:
            self.broken = True
            raise DiskError(f"applying checkpoint {seq} to the disk replicas failed: {exc}") from None
        self.applied_seq = seq
        for index, expected in staging.digests.items():
            if file_digest(self.paths[index]) != expected.digest:
                self.broken = True
                raise RemoteProtocolError(
                    f"disk replica {self.paths[index]} differs from the primary's disk at checkpoint {seq}"
                )

    def handover(self) -> dict[str, Any]:
        """Failover: the replicas, synced and closed, go to the domain; what to report.

        Raises:
            DiskError: the set is broken (a replica may be between two checkpoints),
                or syncing it failed.
        """
        if self.broken:
            self.close()
            raise DiskError("refusing to hand over disk replicas left between two checkpoints")
        self.close()
        if self.broken:
            raise DiskError("syncing the disk replicas failed; refusing to hand them over")
        return {"disks": list(self.paths), "disk_seq": self.applied_seq}

    def path_map(self) -> dict[str, str]:
        """Primary's path -> replica's path, for the disks kept elsewhere (``root``)."""
        return {spec.path: path for spec, path in zip(self.specs, self.paths) if spec.path != path}

    def close(self) -> None:
        """Sync (fdatasync) and close the replicas; idempotent.  They stay as they are."""
        for fd in self.fds:
            try:
                os.fdatasync(fd)
            except OSError as exc:
                log.error("syncing a disk replica failed: %s", exc)
                self.broken = True
            os.close(fd)
        self.fds = []


def retarget_config(libxl_config: str, path_map: Mapping[str, str]) -> str:
    """A Xen domain's libxl configuration (JSON) with its disks' ``pdev_path`` moved to the
    replicas (for a backup that keeps them under ``--disk-root``); unchanged if nothing moves.

    Raises:
        DiskError: the configuration is not JSON.
    """
    if not path_map:
        return libxl_config
    try:
        config = json.loads(libxl_config)
    except ValueError as exc:
        raise DiskError(f"the domain's libxl configuration is not JSON: {exc}") from None
    for disk in config.get("disks", []) if isinstance(config, dict) else []:
        if isinstance(disk, dict) and disk.get("pdev_path") in path_map:
            disk["pdev_path"] = path_map[disk["pdev_path"]]
    return json.dumps(config)


def _open_replica(path: str, size: int) -> tuple[int, bool]:
    """(fd, True if it was created now)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise DiskError(f"cannot open disk replica {path}: {exc.strerror}") from None
    current = os.fstat(fd).st_size
    if current == 0:
        os.ftruncate(fd, size)
        log.info("created disk replica %s (%d bytes)", path, size)
        return fd, True
    if current != size:
        os.close(fd)
        raise DiskError(
            f"disk replica {path} has {current} bytes, the primary's disk {size}: "
            "remove or resize it on the backup"
        )
    return fd, False


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done

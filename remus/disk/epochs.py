"""Which writes belong to which checkpoint, on the primary.  Sans I/O except ``RecordingImage``.

Theory of operation.  Writes reach the local image at once: the guest never
waits for the network.  Until protection starts, nothing is recorded.  From
``start()`` on, every completed write is appended to the *open epoch*.
``mark_boundary()``, called by the disk's ``postsuspend`` while the guest is
suspended for checkpoint N, closes the open epoch as epoch N and opens
epoch N+1.  ``records()`` turns the closed epoch into ``DiskWrite`` records
(each at most ``DISK_WRITE_MAX_BYTES``) that travel in checkpoint N before
its COMMIT.

The epoch rule (what happens to requests in flight at a suspend):

* a write is in epoch N if the server *completed* it (the data is in the
  image and recorded) before the boundary of checkpoint N;
* the server records a write before it sends the reply, so every write the
  guest saw acknowledged before it was suspended is in epoch N or earlier;
* a write the server had not completed at the boundary is completed and
  counted in epoch N+1.  The guest's memory at checkpoint N still shows it
  as outstanding, so after a failover to checkpoint N blkfront reissues it
  (it reissues every request without a response after a restore); writing
  the same data twice is harmless;
* a write completed before the boundary but acknowledged after it is in
  epoch N and is reissued after a failover too: also harmless.

``RecordingImage`` makes "completed" and "recorded" one atomic step: the
pwrite and the append happen under one lock that ``mark_boundary`` takes as
well, so the image at the boundary holds exactly epochs 1..N.  That is the
disk the backup holds once checkpoint N commits.

The first checkpoint after ``start`` carries the whole disk instead of its
epoch: the backup's replica then equals the image at the first boundary
whatever it held before.  When the backup already holds a replica it sends
the hashes of its extents (``DiskHashes``, before it accepts the session);
given those (``peer_hashes``), the first checkpoint carries only the extents
whose hashes differ.
"""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Optional

from remus.disk.server import ImageFile
from remus.errors import DiskError
from remus.stream.records import (
    DISK_HASH_BYTES,
    DISK_HASHES_MAX,
    DISK_WRITE_MAX_BYTES,
    DiskDigest,
    DiskHashes,
    DiskWrite,
    Record,
)

#: An epoch holding more than this is refused (the checkpoint fails, naming the cure).
DEFAULT_MAX_EPOCH_BYTES = 512 << 20
#: Bytes read at a time when the whole disk is read (full synchronisation, digests);
#: also the extent size of the first synchronisation's hashes.
READ_CHUNK = 1 << 20
EXTENT_BYTES = READ_CHUNK

#: Extent index -> hash of the backup's replica (``remus.disk.epochs.extent_hash``).
ExtentHashes = dict[int, bytes]


def extent_hash(data: bytes) -> bytes:
    """The hash DISK_HASHES carries for one extent (BLAKE2b-128)."""
    return hashlib.blake2b(data, digest_size=DISK_HASH_BYTES).digest()


def hash_records(disk: int, hashes: list[bytes]) -> list[DiskHashes]:
    """``hashes`` (extent 0 on) as DISK_HASHES records of at most ``DISK_HASHES_MAX`` each."""
    return [
        DiskHashes(disk, EXTENT_BYTES, first, tuple(hashes[first : first + DISK_HASHES_MAX]))
        for first in range(0, len(hashes), DISK_HASHES_MAX)
    ]


def collect_hashes(records: Iterable[DiskHashes], disk: int) -> ExtentHashes:
    """The extent hashes the backup sent for ``disk`` (records of another extent size ignored)."""
    out: ExtentHashes = {}
    for record in records:
        if record.disk == disk and record.extent_bytes == EXTENT_BYTES:
            out.update((record.first + i, h) for i, h in enumerate(record.hashes))
    return out


@dataclass
class Epoch:
    """The writes of one epoch, in the order they completed."""

    writes: list[tuple[int, bytes]] = field(default_factory=list)
    nbytes: int = 0


class EpochLog:
    """Per-epoch write log of one disk (see the module docstring).  Not thread-safe by itself."""

    def __init__(self, max_epoch_bytes: int = DEFAULT_MAX_EPOCH_BYTES) -> None:
        self.max_epoch_bytes = max_epoch_bytes
        self.protecting = False
        self.open = Epoch()
        self.closed: Optional[Epoch] = None
        self.overflowed = False
        self.epochs_closed = 0

    def start(self) -> None:
        """Protection starts: record from now on."""
        self.protecting = True
        self.open = Epoch()
        self.overflowed = False

    def stop(self) -> None:
        """Protection ends: writes pass through unrecorded again."""
        self.protecting = False
        self.open = Epoch()
        self.closed = None

    def record(self, offset: int, data: bytes) -> None:
        """A write completed; it belongs to the open epoch (if protecting)."""
        if not self.protecting:
            return
        if self.open.nbytes + len(data) > self.max_epoch_bytes:
            self.overflowed = True  # keep the image right; the checkpoint will be refused
            return
        self.open.writes.append((offset, bytes(data)))
        self.open.nbytes += len(data)

    def mark_boundary(self) -> Epoch:
        """Close the open epoch (returned, also kept as ``closed``) and open the next.

        Raises:
            DiskError: the epoch outgrew ``max_epoch_bytes`` (its writes are lost).
        """
        closed, self.open = self.open, Epoch()
        self.epochs_closed += 1
        if self.overflowed:
            self.overflowed = False
            raise DiskError(
                f"a disk epoch exceeded {self.max_epoch_bytes >> 20} MiB of writes; "
                "checkpoint more often (-i) or raise the disk's epoch limit"
            )
        self.closed = closed
        return closed


def write_records(disk: int, writes: list[tuple[int, bytes]]) -> list[Record]:
    """``DiskWrite`` records for ``writes``, in order, each at most ``DISK_WRITE_MAX_BYTES``."""
    records: list[Record] = []
    for offset, data in writes:
        for start in range(0, len(data), DISK_WRITE_MAX_BYTES):
            records.append(DiskWrite(disk, offset + start, data[start : start + DISK_WRITE_MAX_BYTES]))
    return records


class RecordingImage:
    """An ``ImageFile`` whose writes are also recorded in an ``EpochLog``, atomically.

    This is the ``BlockTarget`` the primary's NBD server serves.  Reads and
    flushes go straight to the image.
    """

    def __init__(self, image: ImageFile, log: Optional[EpochLog] = None) -> None:
        self.image = image
        self.log = log if log is not None else EpochLog()
        self.lock = threading.Lock()
        self.full_sync_pending = False
        #: Called at the first boundary: the backup's extent hashes (empty: send everything).
        self.peer_hashes: Callable[[], ExtentHashes] = dict
        self.synced_extents = 0
        self.skipped_extents = 0

    @property
    def size(self) -> int:
        return self.image.size

    def read(self, offset: int, length: int) -> bytes:
        return self.image.read(offset, length)

    def write(self, offset: int, data: bytes, fua: bool) -> None:
        with self.lock:
            self.image.write(offset, data, fua)
            self.log.record(offset, data)

    def flush(self) -> None:
        self.image.flush()

    def start(self) -> None:
        """Protection starts; the first epoch will carry the whole disk."""
        with self.lock:
            self.log.start()
            self.full_sync_pending = True

    def stop(self) -> None:
        with self.lock:
            self.log.stop()
            self.full_sync_pending = False

    def boundary(self, disk: int, digest: bool = False) -> list[Record]:
        """Close the epoch (the guest is suspended) and return its records.

        The first boundary after ``start`` returns the whole disk instead.
        With ``digest``, a ``DiskDigest`` of the image at the boundary follows.

        Raises:
            DiskError: the epoch overflowed, or the image cannot be read.
        """
        with self.lock:
            epoch = self.log.mark_boundary()
            try:
                records: list[Record]
                if self.full_sync_pending:
                    records = self._first_sync(disk)
                    self.full_sync_pending = False
                else:
                    records = write_records(disk, epoch.writes)
                if digest:
                    records.append(DiskDigest(disk, self.size, self._digest()))
            except OSError as exc:
                raise DiskError(f"reading disk {self.image.path}: {exc}") from None
            return records

    def _first_sync(self, disk: int) -> list[Record]:
        """Every extent, except those the backup's replica already holds (same hash)."""
        theirs = self.peer_hashes()
        records: list[Record] = []
        for offset, data in self._chunks():
            if theirs.get(offset // EXTENT_BYTES) == extent_hash(data):
                self.skipped_extents += 1
                continue
            self.synced_extents += 1
            records.append(DiskWrite(disk, offset, data))
        return records

    def _chunks(self) -> Iterator[tuple[int, bytes]]:
        for offset in range(0, self.size, READ_CHUNK):
            yield offset, self.image.read(offset, min(READ_CHUNK, self.size - offset))

    def _digest(self) -> bytes:
        h = hashlib.blake2b(digest_size=32)
        for _offset, data in self._chunks():
            h.update(data)
        return h.digest()


def fd_extent_hashes(fd: int, size: int) -> list[bytes]:
    """The extent hashes of a replica open on ``fd`` (what the backup sends)."""
    return [extent_hash(os.pread(fd, min(EXTENT_BYTES, size - off), off)) for off in range(0, size, EXTENT_BYTES)]


def file_digest(path: str) -> bytes:
    """BLAKE2b-256 of a whole file, as ``DiskDigest`` carries it."""
    h = hashlib.blake2b(digest_size=32)
    with open(path, "rb") as f:
        while chunk := f.read(READ_CHUNK):
            h.update(chunk)
    return h.digest()

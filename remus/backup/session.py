"""The backup's side of one replication session, sans I/O.

``BackupSession`` is fed the bytes the primary sent (``receive_data``) and
answers with what happened (a list of ``Output`` values): records to send
back (acks), the session being opened or refused, checkpoints committed, and
the primary closing the session in order.  It never touches a socket, a
clock or a guest; ``remus.backup.server`` does.

Theory of operation.  The state machine (``_ALLOWED``) is::

    HEADER --StreamHeader--> SESSION --Session--> OPEN --Close--> CLOSED

In OPEN, domain records (DomainHeader, PAGE_DATA, page batches, state
records, CHECKPOINT) are *staged*; a COMMIT whose sequence number, record
count and CRC-32 match what was staged folds the staging into the committed
``Image`` and produces an ACK.  Anything else (a record out of place, a
mismatching COMMIT, a page beyond the domain's memory, a corrupt batch)
raises ``RemoteProtocolError`` and leaves the committed image exactly as it
was: whatever happens to the stream, the image is always the last checkpoint
that was acknowledged (or empty before the first).

Once the primary has hung up (``primary_hung_up``: its FIN arrived, so what is
still unread is the last of its stream), no further checkpoint is committed:
a primary sends its FIN only once it is done with the connection (closed, or
shut both ways by its death watch), so that ACK could never reach it, none of
the checkpoint's output was released, and nothing is lost by failing over from
the one before.  The rest of the stream is then only read for a CLOSE,
without staging its pages.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Union

from remus.backup.activation import XEN_PFN_SPACE, check_capacity, pfn_bound
from remus.backup.image import Image, PageStore, Staging
from remus.disk.replica import ReplicaSet
from remus.errors import RemoteProtocolError, RemusError
from remus.stream.codec import EndOfStream, StreamDecoder, padded_length
from remus.stream.compression import PageDecompressor
from remus.stream.records import (
    Ack,
    Checkpoint,
    Close,
    CloseReason,
    Commit,
    DiskDigest,
    DiskWrite,
    DomainHeader,
    Heartbeat,
    PageBatch,
    PageData,
    Record,
    Session,
    SimVcpu,
    StreamHeader,
    XenRecord,
    page_type_has_data,
)


class State(enum.Enum):
    HEADER = "awaiting the stream header"
    SESSION = "awaiting the session record"
    OPEN = "receiving checkpoints"
    CLOSED = "closed by the primary"


_DOMAIN_RECORDS = (DomainHeader, PageData, PageBatch, SimVcpu, Checkpoint, XenRecord, DiskWrite, DiskDigest)

#: Which events each state accepts; anything else is a protocol error.
_ALLOWED: dict[State, tuple[type, ...]] = {
    State.HEADER: (StreamHeader,),
    State.SESSION: (Session,),
    State.OPEN: _DOMAIN_RECORDS + (Commit, Heartbeat, Close),
    State.CLOSED: (),
}


@dataclass(frozen=True)
class SendBack:
    """A record to send to the primary."""

    record: Record


@dataclass(frozen=True)
class Opened:
    """The primary opened a session for this domain."""

    info: Mapping[str, Any]


@dataclass(frozen=True)
class Refused:
    """The session cannot be taken (the reason is also sent back in a CLOSE)."""

    reason: str


@dataclass(frozen=True)
class Committed:
    """Checkpoint ``seq`` is complete and now the image; an ACK is on its way.

    ``changed_pfns`` are the pages it brought; ``captured_unix`` is the
    primary's wall-clock time of its suspend (0.0 when the primary did not say).
    """

    seq: int
    changed_pfns: frozenset[int] = frozenset()
    captured_unix: float = 0.0


@dataclass(frozen=True)
class ClosedByPrimary:
    """The primary ended the session in order (it keeps running the domain)."""

    reason: int
    message: str


@dataclass(frozen=True)
class StreamEnded:
    """EOF.  ``partial_bytes`` > 0 means it cut a record in half."""

    partial_bytes: int


Output = Union[SendBack, Opened, Refused, Committed, ClosedByPrimary, StreamEnded]


class BackupSession:
    """One session's state machine (see the module docstring)."""

    def __init__(self, max_memory: Optional[int] = None, disk_root: str = "") -> None:
        #: Guest memory (bytes) a session may declare; None: no bound but the kind's own.
        self.max_memory = max_memory
        #: Keep disk replicas under this directory instead of at their own paths.
        self.disk_root = disk_root
        #: The session's disk replicas (``remus.disk.replica``), None if it replicates no disk.
        self.disks: Optional[ReplicaSet] = None
        self.state = State.HEADER
        self.decoder = StreamDecoder()
        self.image = Image()
        self.info: Mapping[str, Any] = {}
        self.kind = ""
        self.max_pages = XEN_PFN_SPACE  # until the session says
        self._staging: Optional[Staging] = None
        self._decompressor = PageDecompressor()
        self._hung_up = False
        #: Checkpoints that arrived whole after the primary hung up, and were not taken.
        self.not_taken = 0

    @property
    def receiving(self) -> bool:
        """True while part of a checkpoint has arrived but not its COMMIT."""
        return self._staging is not None

    def primary_hung_up(self) -> None:
        """The primary has ended its stream (its FIN is in), whatever it still had in flight.

        From here no checkpoint is committed or acknowledged: the primary can no longer read
        an ACK, so it released none of that checkpoint's output, and failing over from the
        last committed checkpoint loses nothing.  A checkpoint partly staged is dropped now;
        later records are read only for a CLOSE (an orderly end stays orderly).  Never undoes
        a commit.
        """
        if self.state is State.OPEN and not self._hung_up:
            self._hung_up = True
            self._staging = None

    def receive_data(self, data: bytes) -> list[Output]:
        """Feed bytes from the primary (``b""`` for EOF); return what they caused.

        Raises:
            RemoteProtocolError: the stream is invalid; the session is over,
                and ``image`` is still the last committed checkpoint.
        """
        self.decoder.receive_data(data)
        outputs: list[Output] = []
        for event in self.decoder.events():
            if isinstance(event, EndOfStream):
                self._staging = None
                outputs.append(StreamEnded(event.partial_bytes))
                return outputs
            if self._hung_up and not isinstance(event, Close):
                self.not_taken += isinstance(event, Commit)
                continue
            allowed = _ALLOWED[self.state]
            if not isinstance(event, allowed):
                raise RemoteProtocolError(f"{type(event).__name__} record while {self.state.value}")
            outputs.extend(self._handle(event))
            if self.state is State.CLOSED:
                return outputs  # whatever follows a CLOSE is not read: the session is over
        return outputs

    # -- events ------------------------------------------------------------------------
    def _handle(self, event: object) -> list[Output]:
        if isinstance(event, StreamHeader):
            self.state = State.SESSION
            return []
        if isinstance(event, Session):
            return self._open(event)
        if isinstance(event, Heartbeat):
            return []
        if isinstance(event, Close):
            self.state = State.CLOSED
            self._staging = None
            return [ClosedByPrimary(event.reason, event.message)]
        if isinstance(event, Commit):
            return self._commit(event)
        self._stage(event)
        return []

    def _open(self, session: Session) -> list[Output]:
        info = session.info
        kind = info["kind"]
        try:
            if kind == "xen":
                from remus.xen.savefile import DomainConfig

                info = dict(info)
                if "max_memkb" not in info:
                    info.setdefault("max_pages", XEN_PFN_SPACE)  # an older primary: its size unknown
                DomainConfig.parse(info.get("libxl_config"))  # without it, no failover
            if self.max_memory is not None:
                check_capacity(info, self.max_memory)
            self.max_pages = pfn_bound(info)
            self.disks = ReplicaSet.from_session(info, self.disk_root)
        except RemusError as exc:  # the reason goes back to the primary
            reason = f"cannot take domain {info.get('domain')!r}: {exc}"
            self.state = State.CLOSED
            return [SendBack(Close(CloseReason.REFUSED, reason)), Refused(reason)]
        self.info = info
        self.kind = kind
        self.state = State.OPEN
        hashes = [SendBack(r) for r in self.disks.hashes()] if self.disks is not None else []
        return [Opened(info), *hashes, SendBack(Ack(0))]

    def _stage(self, record: object) -> None:
        if self._staging is None:
            # The first checkpoint (all of memory) is staged in a PageStore the image then adopts;
            # later ones are a few pages each, cheaper in a dict.
            self._staging = Staging(self.max_pages, PageStore() if self.image.seq == 0 else {})
        staging = self._staging
        if isinstance(record, (DiskWrite, DiskDigest)):  # after the domain's CHECKPOINT, before COMMIT
            if self.disks is None:
                raise RemoteProtocolError("disk record in a session that replicates no disk")
            self.disks.stage(staging.disk, record)
            return
        if staging.checkpoint_seen:
            raise RemoteProtocolError(f"{type(record).__name__} after CHECKPOINT, before COMMIT")
        if isinstance(record, DomainHeader):
            if self.image.seq or staging.header or staging.pages or staging.records:
                raise RemoteProtocolError("domain header anywhere but at the very start")
            staging.header = record
        elif isinstance(record, PageData):
            for word, page in _pages_of(record):
                staging.add_page(word, page)
        elif isinstance(record, PageBatch):

            def lookup(pfn: int) -> Optional[bytes]:
                staged = staging.page(pfn)
                return staged if staged is not None else self.image.page(pfn)

            for word, page in self._decompressor.decompress(record, lookup):
                staging.add_page(word, page)
        elif isinstance(record, Checkpoint):
            staging.checkpoint_seen = True
        else:
            assert isinstance(record, (SimVcpu, XenRecord))
            staging.add_record(record, 8 + padded_length(len(record.encode_body())))

    def _commit(self, commit: Commit) -> list[Output]:
        count, crc = self.decoder.take_commit_digest()
        staging = self._staging
        expected = self.image.seq + 1
        if commit.seq != expected:
            raise RemoteProtocolError(f"COMMIT {commit.seq} where {expected} was due")
        if (commit.records, commit.crc32) != (count, crc):
            raise RemoteProtocolError(
                f"checkpoint {commit.seq} does not match its COMMIT "
                f"({count} records, crc {crc:#010x}; COMMIT says {commit.records}, {commit.crc32:#010x})"
            )
        if staging is None or not staging.checkpoint_seen:
            raise RemoteProtocolError(f"COMMIT {commit.seq} without a CHECKPOINT record")
        if self.image.seq == 0 and staging.header is None:
            raise RemoteProtocolError("the first checkpoint has no domain header")
        if self.kind == "sim" and not any(isinstance(r, SimVcpu) for r in staging.records):
            raise RemoteProtocolError(f"checkpoint {commit.seq} of a simulated domain has no vCPU record")
        if self.disks is not None:
            self.disks.apply(commit.seq, staging.disk)  # the disk of checkpoint seq, whole, or nothing
        changed = frozenset(staging.pages)
        self.image.commit(commit.seq, staging)
        self._staging = None
        return [Committed(commit.seq, changed, commit.captured_unix_ms / 1000.0), SendBack(Ack(commit.seq))]


def _pages_of(record: PageData) -> list[tuple[int, Optional[bytes]]]:
    pages = iter(record.pages)
    return [(word, next(pages) if page_type_has_data(word) else None) for word in record.pfns]

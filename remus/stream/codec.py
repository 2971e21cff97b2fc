"""Bytes to records and records to bytes: the replication stream's framing, sans I/O.

No sockets, no clocks, no threads.  A ``StreamDecoder`` is fed whatever
bytes arrived (``receive_data``) and hands out what they complete
(``next_event``), in the style of h11: the stream header first, then one
record at a time, ``NEED_DATA`` while a record is incomplete, and
``EndOfStream`` once EOF was fed and the buffer is drained.

Theory of operation: the buffer is a ``bytearray`` plus a read offset, so
feeding one byte at a time stays linear.  A record header is read only once
all 8 of its bytes are present; its length is checked against
``max_record_bytes`` *before* the body is awaited, so a hostile length can
never make the decoder hold more than ``max_record_bytes`` plus one
``receive_data`` call's bytes.  Padding must be zero.
"""

from __future__ import annotations

import enum
import struct
import zlib
from dataclasses import dataclass
from typing import Iterator, Union

from remus.errors import RemoteProtocolError
from remus.stream.records import (
    REC_ALIGN,
    STREAM_HEADER_SIZE,
    DomainHeader,
    RemusRecType,
    Record,
    StreamHeader,
    decode_record,
    record_type,
)

#: Default bound on one record's body.  The largest legitimate records are a
#: full PAGE_DATA or page batch (1024 pages, a little over 4 MiB); libxc's own
#: REC_LENGTH_MAX is 128 MiB, which this project never needs.
DEFAULT_MAX_RECORD_BYTES = 16 * 1024 * 1024

_RHDR = struct.Struct("<II")


class _Sentinel(enum.Enum):
    NEED_DATA = "NEED_DATA"


#: Returned by ``next_event`` while the buffered bytes do not complete an event.
NEED_DATA = _Sentinel.NEED_DATA


@dataclass(frozen=True)
class EndOfStream:
    """EOF was fed and every complete event has been handed out.

    ``partial_bytes`` counts the bytes of an incomplete record (or header)
    left over: 0 means the stream ended on a record boundary.
    """

    partial_bytes: int


Event = Union[StreamHeader, Record, EndOfStream]


def padded_length(length: int) -> int:
    """``length`` rounded up to the 8-octet record alignment."""
    return length + (-length % REC_ALIGN)


def encode_record(record: Record) -> bytes:
    """Frame ``record``: header, body and zero padding."""
    body = record.encode_body()
    return _RHDR.pack(record_type(record), len(body)) + body + b"\0" * (-len(body) % REC_ALIGN)


#: Records that are not part of a checkpoint's content (they open the session,
#: may be interleaved with a checkpoint by another thread, or close it).
_OUTSIDE_CHECKPOINT = frozenset(
    (RemusRecType.SESSION, RemusRecType.COMMIT, RemusRecType.HEARTBEAT, RemusRecType.ACK, RemusRecType.CLOSE,
     RemusRecType.ACCEPT)
)


def counts_toward_commit(rtype: int) -> bool:
    """True if a record of this type is covered by the next COMMIT's count and CRC-32."""
    return rtype not in _OUTSIDE_CHECKPOINT


class CommitDigest:
    """The sender's side of a COMMIT: counts and checksums framed records."""

    def __init__(self) -> None:
        self.records = 0
        self.crc = 0

    def add(self, rtype: int, wire: bytes) -> None:
        """Account for one framed record of type ``rtype``."""
        if counts_toward_commit(rtype):
            self.records += 1
            self.crc = zlib.crc32(wire, self.crc)

    def take(self) -> tuple[int, int]:
        """(record count, CRC-32) so far; resets both."""
        digest = (self.records, self.crc & 0xFFFFFFFF)
        self.records = 0
        self.crc = 0
        return digest


class StreamDecoder:
    """Incremental decoder for one direction of a replication connection.

    ``max_record_bytes`` bounds a single record body (see the module docstring).
    With ``libxc=True`` it reads a plain libxc v2 stream instead (as written by
    ``xc_domain_save``): its 40-byte image and domain headers come out as one
    ``DomainHeader`` event, then its records.
    The decoder also keeps the running count and CRC-32 of the checkpoint
    records it handed out since the last ``take_commit_digest`` call, for the
    caller that verifies COMMIT records (see ``counts_toward_commit``).
    """

    def __init__(self, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES, *, libxc: bool = False) -> None:
        self._libxc = libxc
        self._buf = bytearray()
        self._pos = 0
        self._eof = False
        self._header_seen = False
        self._max = max_record_bytes
        self._digest_records = 0
        self._digest_crc = 0
        self.bytes_received = 0

    def receive_data(self, data: bytes) -> None:
        """Add bytes that arrived; ``b""`` means the peer closed its side.

        Raises:
            RuntimeError: data fed after EOF (a bug in the caller).
        """
        if self._eof:
            if data:
                raise RuntimeError("receive_data after EOF")
            return
        if not data:
            self._eof = True
            return
        self.bytes_received += len(data)
        if self._pos and self._pos > len(self._buf) // 2:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes received but not yet handed out as events."""
        return len(self._buf) - self._pos

    def next_event(self) -> Union[Event, _Sentinel]:
        """The next complete event, ``NEED_DATA``, or ``EndOfStream``.

        Raises:
            RemoteProtocolError: the bytes are not a valid stream.  The decoder
                is unusable afterwards.
        """
        if not self._header_seen:
            size = DomainHeader.SIZE if self._libxc else STREAM_HEADER_SIZE
            if self.buffered < size:
                return self._need()
            raw = bytes(self._buf[self._pos : self._pos + size])
            header: Event = DomainHeader.parse_libxc(raw) if self._libxc else StreamHeader.decode(raw)
            self._pos += size
            self._header_seen = True
            return header
        if self.buffered < _RHDR.size:
            return self._need()
        rtype, length = _RHDR.unpack_from(self._buf, self._pos)
        if length > self._max:
            raise RemoteProtocolError(
                f"record of type {rtype:#x} claims {length} bytes, over the {self._max}-byte bound"
            )
        total = _RHDR.size + padded_length(length)
        if self.buffered < total:
            return self._need()
        start = self._pos + _RHDR.size
        body = bytes(self._buf[start : start + length])
        if any(self._buf[start + length : self._pos + total]):
            raise RemoteProtocolError(f"record of type {rtype:#x} has non-zero padding")
        record = decode_record(rtype, body)
        if counts_toward_commit(rtype):
            with memoryview(self._buf) as view:
                self._digest_crc = zlib.crc32(view[self._pos : self._pos + total], self._digest_crc)
            self._digest_records += 1
        self._pos += total
        return record

    def take_commit_digest(self) -> tuple[int, int]:
        """(record count, CRC-32) of the checkpoint records since the last call; resets both."""
        digest = (self._digest_records, self._digest_crc & 0xFFFFFFFF)
        self._digest_records = 0
        self._digest_crc = 0
        return digest

    def events(self) -> Iterator[Event]:
        """Every event the buffered bytes complete, in order, ending with
        ``EndOfStream`` once EOF was fed (``next_event`` until ``NEED_DATA``).

        Raises:
            RemoteProtocolError: as ``next_event``.
        """
        while True:
            event = self.next_event()
            if event is NEED_DATA:
                return
            assert not isinstance(event, _Sentinel)
            yield event
            if isinstance(event, EndOfStream):
                return

    def _need(self) -> Union[_Sentinel, EndOfStream]:
        if self._eof:
            return EndOfStream(self.buffered)
        return NEED_DATA

"""The primary's side of the stream format: captures in, framed bytes out, sans I/O.

``CheckpointEncoder`` opens a session (stream header + SESSION record) and
turns each ``Capture`` into the records that go on the wire: the domain's
records as they are, except that each run of PAGE_DATA records becomes page
batches when compression is on, followed by a COMMIT carrying the sequence
number, record count and CRC-32.  It also reports how many bytes the
checkpoint would have taken uncompressed, for the statistics.

No sockets, no clocks: ``remus.transport`` writes what this returns.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, List, Mapping, Optional, Sequence

from remus.stream.codec import CommitDigest, encode_record
from remus.stream.compression import DEFAULT_CACHE_PAGES, PageCompressor
from remus.stream.records import (
    PAGE_SIZE,
    Commit,
    PageData,
    Record,
    Session,
    StreamHeader,
    record_type,
)

#: Wire chunks are cut at record boundaries once they reach this size, so a
#: heartbeat written by another thread never waits behind a whole checkpoint.
CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class EncodedCheckpoint:
    """One checkpoint, framed: ``chunks`` end with its COMMIT record."""

    seq: int
    chunks: Sequence[bytes]
    raw_bytes: int
    wire_bytes: int


def session_header(info: Mapping[str, Any]) -> bytes:
    """The bytes that open a primary's stream: stream header + SESSION."""
    return StreamHeader().encode() + encode_record(Session(dict(info, page_size=PAGE_SIZE)))


class CheckpointEncoder:
    """Frames (and, with ``compression``, compresses) successive checkpoints of one session."""

    def __init__(self, compression: bool, cache_pages: int = DEFAULT_CACHE_PAGES) -> None:
        self.compression = compression
        self._compressor = PageCompressor(cache_pages) if compression else None
        self._digest = CommitDigest()

    def encode(self, seq: int, records: Sequence[Record], captured_unix: Optional[float] = None) -> EncodedCheckpoint:
        """Frame checkpoint ``seq``; ``captured_unix`` is the wall-clock time of its suspend
        (default: now), which the COMMIT carries."""
        raw_bytes = 0
        wire_bytes = 0
        chunks: List[bytes] = []
        pending: List[bytes] = []
        pending_size = 0
        for record, raw_size in self._wire_records(records):
            wire = encode_record(record)
            self._digest.add(record_type(record), wire)
            raw_bytes += raw_size
            wire_bytes += len(wire)
            pending.append(wire)
            pending_size += len(wire)
            if pending_size >= CHUNK_BYTES:
                chunks.append(b"".join(pending))
                pending, pending_size = [], 0
        count, crc = self._digest.take()
        captured = time.time() if captured_unix is None else captured_unix
        commit = encode_record(Commit(seq, count, crc, int(captured * 1000)))
        pending.append(commit)
        chunks.append(b"".join(pending))
        return EncodedCheckpoint(seq, chunks, raw_bytes + len(commit), wire_bytes + len(commit))

    def _wire_records(self, records: Sequence[Record]) -> Iterator[tuple[Record, int]]:
        """(record to send, framed size it would have uncompressed)."""
        run: List[PageData] = []
        for record in records:
            if self._compressor is not None and isinstance(record, PageData):
                run.append(record)
                continue
            if run:
                yield from self._compressed(run)
                run = []
            yield record, _framed_size(record)
        if run:
            yield from self._compressed(run)

    def _compressed(self, run: Iterable[PageData]) -> Iterator[tuple[Record, int]]:
        assert self._compressor is not None
        run = list(run)
        raw = sum(_framed_size(r) for r in run)
        batches = list(self._compressor.compress(run))
        # Attribute the uncompressed size to the first batch; only totals matter.
        for i, batch in enumerate(batches):
            yield batch, raw if i == 0 else 0


def _framed_size(record: Record) -> int:
    if isinstance(record, PageData):
        body = 8 + 8 * len(record.pfns) + record.data_bytes
    else:
        body = len(record.encode_body())
    return 8 + body + (-body % 8)

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
from typing import Any, Iterable, Iterator, List, Mapping, Optional, Sequence, Union

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
#: A streamed checkpoint's chunks are smaller: the backup starts decoding sooner.
STREAM_CHUNK_BYTES = 32 << 10
#: A COMMIT record's framed size (header, seq, count, CRC, capture time).
_COMMIT_BYTES = len(encode_record(Commit(0, 0, 0, 0)))


@dataclass(frozen=True)
class EncodedCheckpoint:
    """One checkpoint, framed: ``chunks`` end with its COMMIT record."""

    seq: int
    chunks: Sequence[bytes]
    raw_bytes: int
    wire_bytes: int


class StreamedCheckpoint:
    """One checkpoint framed as it is sent: each chunk is encoded when the channel asks for it.

    So the channel writes chunk k (and the backup decodes it) while chunk k+1 is
    being compressed: the checkpoint reaches the backup in about the time of its
    slowest stage, not of their sum.  ``chunks`` can be iterated once; it ends with
    the COMMIT.  ``raw_bytes`` is known at once; ``raw_done`` grows as chunks are
    made, and ``wire_bytes`` is final once ``chunks`` is exhausted.  An iteration
    abandoned half way leaves the encoder unusable (the session is over then).
    """

    def __init__(self, seq: int, raw_bytes: int, make: "Iterator[bytes]") -> None:
        self.seq = seq
        self.raw_bytes = raw_bytes
        self.raw_done = 0
        self.wire_bytes = 0
        self._make = make
        self._taken = False

    @property
    def chunks(self) -> Iterator[bytes]:
        if self._taken:
            raise RuntimeError(f"checkpoint {self.seq} was already sent")
        self._taken = True
        return self._make


#: What a channel sends: a checkpoint framed at once, or framed as it is sent.
FramedCheckpoint = Union[EncodedCheckpoint, StreamedCheckpoint]


def session_header(info: Mapping[str, Any]) -> bytes:
    """The bytes that open a primary's stream: stream header + SESSION."""
    return StreamHeader().encode() + encode_record(Session(dict(info, page_size=PAGE_SIZE)))


class CheckpointEncoder:
    """Frames (and, with ``compression``, compresses) successive checkpoints of one session."""

    def __init__(self, compression: bool, cache_pages: int = DEFAULT_CACHE_PAGES) -> None:
        self.compression = compression
        self._compressor = PageCompressor(cache_pages) if compression else None
        self._digest = CommitDigest()

    def unmap_cache(self) -> None:
        """Unmap the compression cache's pages, keeping their contents (``PageCache.unmap``);
        between checkpoints only."""
        if self._compressor is not None:
            self._compressor.cache.unmap()

    def encode(self, seq: int, records: Sequence[Record], captured_unix: Optional[float] = None) -> EncodedCheckpoint:
        """Frame checkpoint ``seq`` at once; ``captured_unix`` is the wall-clock time of its
        suspend (default: now), which the COMMIT carries."""
        streamed = self.stream(seq, records, captured_unix, chunk_bytes=CHUNK_BYTES)
        chunks = list(streamed.chunks)
        return EncodedCheckpoint(seq, chunks, streamed.raw_bytes, streamed.wire_bytes)

    def stream(self, seq: int, records: Sequence[Record], captured_unix: Optional[float] = None,
               chunk_bytes: int = STREAM_CHUNK_BYTES) -> StreamedCheckpoint:
        """Checkpoint ``seq``, to be framed as it is sent (see ``StreamedCheckpoint``).

        The checkpoints of a session must be sent whole and in order: the cache and
        the commit digest advance as the chunks are made.
        """
        captured = time.time() if captured_unix is None else captured_unix
        raw = sum(_framed_size(r) for r in records) + _COMMIT_BYTES
        checkpoint = StreamedCheckpoint(seq, raw, iter(()))
        checkpoint._make = self._chunks(checkpoint, records, captured, chunk_bytes)
        return checkpoint

    def _chunks(self, checkpoint: StreamedCheckpoint, records: Sequence[Record], captured: float,
                chunk_bytes: int) -> Iterator[bytes]:
        pending: List[bytes] = []
        pending_size = 0
        for record, raw_size in self._wire_records(records):
            wire = encode_record(record)
            self._digest.add(record_type(record), wire)
            checkpoint.raw_done += raw_size
            checkpoint.wire_bytes += len(wire)
            pending.append(wire)
            pending_size += len(wire)
            if pending_size >= chunk_bytes:
                yield b"".join(pending)
                pending, pending_size = [], 0
        count, crc = self._digest.take()
        commit = encode_record(Commit(checkpoint.seq, count, crc, int(captured * 1000)))
        assert len(commit) == _COMMIT_BYTES
        pending.append(commit)
        checkpoint.raw_done = checkpoint.raw_bytes
        checkpoint.wire_bytes += len(commit)
        yield b"".join(pending)

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
        left = sum(_framed_size(r) for r in run)
        # Each batch as soon as it is made (a streamed checkpoint sends it at once), with its
        # share of the uncompressed size by pages: only the progress shown reads these shares
        # (the checkpoint's total is counted before), so what rounding leaves out is not carried.
        per_page = left // max(1, sum(len(r.pfns) for r in run))
        for batch in self._compressor.compress(run):
            share = min(left, per_page * len(batch.pfns))
            left -= share
            yield batch, share


def _framed_size(record: Record) -> int:
    if isinstance(record, PageData):
        body = 8 + 8 * len(record.pfns) + record.data_bytes
    else:
        body = len(record.encode_body())
    return 8 + body + (-body % 8)

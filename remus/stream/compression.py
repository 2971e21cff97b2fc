"""Checkpoint compression: XOR against the last sent page, then zstd, per batch.

Sans I/O.  The sender keeps a bounded cache of the version of each page it
last sent (``PageCache``); a dirty page found in the cache travels as its XOR
with that version (mostly zeros when a guest rewrote a few words), a page not
in the cache travels whole.  All payloads of up to ``MAX_BATCH_PAGES`` entries
are then compressed with one zstd call (measured against one call per page in
``tests/bench/compression.py``: see docs/performance.md).  The receiver needs
no cache of its own: the XOR base is its own copy of the page, which equals
the sender's cached one because every page the sender caches was sent to it.

Theory of operation: the cache is one preallocated buffer of ``capacity``
page slots (a "slab") plus a PFN-to-slot map in LRU order; no page is ever a
Python object of its own.  A batch's data pages are joined into one buffer;
the XOR of every cached page against its slot and the copy of every page
into its slot are each done for the whole batch at once: with numpy when it
is installed (``pip install 'remus[fast]'`` or Debian's python3-numpy), else
page by page through Python integers.  Both paths produce the same bytes (a
test compares them on the wire).  A PFN that occurs twice in one batch
splits it there, so its second copy is XORed against its first.

Cache policy: a page is admitted while the cache has free slots; once it is
full, a page is admitted (evicting the least recently sent one) only if it
was sent before: the first checkpoint, which carries the whole memory, and
pages written once in a long while can no longer evict the pages a guest
rewrites all the time.  ``policy="lru"`` admits every page, as the xm-era
compression did with its 8192-page (32 MiB) cache.  The default holds
``DEFAULT_CACHE_PAGES`` pages (64 MiB).

Never compresses libxc's other records, and never sees a socket.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import zstandard

np: Any
try:
    import numpy as np
except ImportError:  # the pure-Python path is used
    np = None

from remus.errors import RemoteProtocolError
from remus.stream.records import (
    MAX_BATCH_PAGES,
    PAGE_DATA_PFN_MASK,
    PAGE_SIZE,
    PageBatch,
    PageData,
    PageKind,
    page_type_has_data,
)

#: Default sender cache: 16384 pages = 64 MiB.
DEFAULT_CACHE_PAGES = 16384
#: zstd level: 1 is the fastest of the real levels and already removes the
#: zeros XOR leaves; higher levels cost pause-free CPU for a few % of bytes.
DEFAULT_LEVEL = 1


#: True when numpy is importable: batches are XORed and cached as arrays.
VECTORISED = np is not None
#: Admission policies of ``PageCache`` (see the module docstring).
POLICIES = ("second", "lru")
#: PFNs below this are remembered in a bitmap (one bit each, 128 MiB at most), others in a set.
_BITMAP_PFNS = 1 << 30
_WORDS_PER_PAGE = PAGE_SIZE // 8


def xor_pages(a: "bytes | memoryview", b: "bytes | memoryview") -> bytes:
    """Byte-wise XOR of two equal-length buffers (the pure-Python path)."""
    n = len(a)
    return (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(n, "little")


class _PfnSet:
    """PFNs seen at least once: a growing bitmap, with a set for PFNs beyond ``_BITMAP_PFNS``."""

    def __init__(self) -> None:
        self._bits = bytearray()
        self._far: set[int] = set()

    def add(self, pfn: int) -> bool:
        """Remember ``pfn``; True if it was already there."""
        if pfn >= _BITMAP_PFNS:
            seen = pfn in self._far
            self._far.add(pfn)
            return seen
        byte, bit = pfn >> 3, 1 << (pfn & 7)
        if byte >= len(self._bits):
            self._bits.extend(bytes(max(byte + 1, 2 * len(self._bits)) - len(self._bits)))
        seen = bool(self._bits[byte] & bit)
        self._bits[byte] |= bit
        return seen


class PageCache:
    """Last sent version of up to ``capacity`` pages, in one slab (see the module docstring)."""

    def __init__(self, capacity: int = DEFAULT_CACHE_PAGES, policy: str = "second") -> None:
        if capacity < 0:
            raise ValueError("cache capacity must be >= 0")
        if policy not in POLICIES:
            raise ValueError(f"cache policy must be one of {', '.join(POLICIES)}")
        self.capacity = capacity
        self.policy = policy
        # calloc'ed: the system backs a slot only once a page is written into it.
        self.slab = bytearray(capacity * PAGE_SIZE)
        self._slots: "OrderedDict[int, int]" = OrderedDict()
        self._free = list(range(capacity - 1, -1, -1))
        self._seen = _PfnSet()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, pfn: int) -> bool:
        return pfn in self._slots

    def place(self, pfn: int) -> tuple[Optional[int], Optional[int]]:
        """Account for sending ``pfn`` now: (slot of its last sent version or None,
        slot its new version must be copied to or None).  The caller reads the
        first slot before it writes any slot of the same batch."""
        slot = self._slots.get(pfn)
        if slot is not None:
            self._slots.move_to_end(pfn)
            self.hits += 1
            return slot, slot
        self.misses += 1
        sent_before = self._seen.add(pfn)
        if self._free:
            slot = self._free.pop()
        elif self.capacity and (sent_before or self.policy == "lru"):
            _evicted, slot = self._slots.popitem(last=False)
        else:
            return None, None
        self._slots[pfn] = slot
        return None, slot

    def swap(self, pfn: int, page: "bytes | memoryview") -> Optional[bytes]:
        """Record ``page`` as the last sent version of ``pfn``; return the previous one."""
        read, write = self.place(pfn)
        old = None if read is None else bytes(self.slab[read * PAGE_SIZE : (read + 1) * PAGE_SIZE])
        if write is not None:
            self.slab[write * PAGE_SIZE : (write + 1) * PAGE_SIZE] = page
        return old


class _Segment:
    """Data pages of one batch that hold no PFN twice: their slots, then one bulk XOR and copy."""

    def __init__(self) -> None:
        self.pfns: set[int] = set()
        self.pages: list["bytes | memoryview"] = []
        self.xor_rows: list[int] = []
        self.xor_slots: list[int] = []
        self.write_rows: list[int] = []
        self.write_slots: list[int] = []

    def add(self, pfn: int, page: "bytes | memoryview", read: Optional[int], write: Optional[int]) -> None:
        row = len(self.pages)
        self.pfns.add(pfn)
        self.pages.append(page)
        if read is not None:
            self.xor_rows.append(row)
            self.xor_slots.append(read)
        if write is not None:
            self.write_rows.append(row)
            self.write_slots.append(write)

    def payload(self, slab: bytearray, vectorised: bool) -> bytes:
        """The segment's payloads (FULL or XOR), joined; then the pages copied into their slots."""
        if not self.pages:
            return b""
        if vectorised:
            return self._payload_numpy(slab)
        view = memoryview(slab)
        out = list(self.pages)
        for row, slot in zip(self.xor_rows, self.xor_slots):
            out[row] = xor_pages(self.pages[row], view[slot * PAGE_SIZE : (slot + 1) * PAGE_SIZE])
        joined = b"".join(out)
        for row, slot in self._last_writes():
            view[slot * PAGE_SIZE : (slot + 1) * PAGE_SIZE] = self.pages[row]
        view.release()
        return joined

    def _payload_numpy(self, slab: bytearray) -> bytes:
        new = np.frombuffer(b"".join(self.pages), dtype=np.uint64).reshape(-1, _WORDS_PER_PAGE)
        cache = np.frombuffer(slab, dtype=np.uint64).reshape(-1, _WORDS_PER_PAGE)
        if self.xor_rows:
            out = new.copy()
            out[self.xor_rows] ^= cache[self.xor_slots]
        else:
            out = new
        writes = self._last_writes()
        if writes:
            rows, slots = zip(*writes)
            cache[list(slots)] = new[list(rows)]
        return bytes(out.data)

    def _last_writes(self) -> list[tuple[int, int]]:
        """(row, slot) to copy; where a slot was handed on within the segment, its last owner only."""
        if len(set(self.write_slots)) == len(self.write_slots):
            return list(zip(self.write_rows, self.write_slots))
        last = {slot: row for row, slot in zip(self.write_rows, self.write_slots)}
        return [(row, slot) for slot, row in last.items()]


class PageCompressor:
    """Sender side: PAGE_DATA records in, ``PageBatch`` records out.

    ``vectorised`` chooses the numpy path (default: when numpy is installed);
    ``policy`` is the cache's admission policy.  The bytes produced are the
    same either way for the same ``policy``.
    """

    def __init__(self, cache_pages: int = DEFAULT_CACHE_PAGES, level: int = DEFAULT_LEVEL,
                 *, vectorised: Optional[bool] = None, policy: str = "second") -> None:
        if vectorised and np is None:
            raise ValueError("vectorised compression needs numpy (pip install 'remus[fast]')")
        self.cache = PageCache(cache_pages, policy)
        self.vectorised = VECTORISED if vectorised is None else vectorised
        self._cctx = zstandard.ZstdCompressor(level=level, write_content_size=True)

    def compress(self, records: Iterable[PageData]) -> Iterator[PageBatch]:
        """Batches carrying exactly the pages of ``records``, in the same order."""
        pfns: list[int] = []
        kinds: list[int] = []
        pieces: list[bytes] = []
        segment = _Segment()
        for record in records:
            page_iter = iter(record.pages)
            for word in record.pfns:
                if page_type_has_data(word):
                    page = next(page_iter)
                    pfn = word & PAGE_DATA_PFN_MASK
                    if pfn in segment.pfns:  # its base is the copy earlier in this batch
                        pieces.append(segment.payload(self.cache.slab, self.vectorised))
                        segment = _Segment()
                    read, write = self.cache.place(pfn)
                    segment.add(pfn, page, read, write)
                    kinds.append(PageKind.FULL if read is None else PageKind.XOR)
                else:
                    kinds.append(PageKind.NO_DATA)
                pfns.append(word)
                if len(pfns) == MAX_BATCH_PAGES:
                    pieces.append(segment.payload(self.cache.slab, self.vectorised))
                    yield self._batch(pfns, kinds, pieces)
                    pfns, kinds, pieces, segment = [], [], [], _Segment()
        if pfns:
            pieces.append(segment.payload(self.cache.slab, self.vectorised))
            yield self._batch(pfns, kinds, pieces)

    def _batch(self, pfns: Sequence[int], kinds: Sequence[int], pieces: Sequence[bytes]) -> PageBatch:
        frame = self._cctx.compress(pieces[0] if len(pieces) == 1 else b"".join(pieces))
        return PageBatch(tuple(pfns), tuple(kinds), frame)


#: Returns the receiver's current copy of a PFN's page (staged or committed), or None.
PageLookup = Callable[[int], Optional[bytes]]


class PageDecompressor:
    """Receiver side: a ``PageBatch`` back into the exact pages that were sent.

    XOR pages are restored a segment at a time (a run of the batch with no
    PFN twice), with numpy when ``vectorised`` (default: when installed).
    """

    def __init__(self, *, vectorised: Optional[bool] = None) -> None:
        if vectorised and np is None:
            raise ValueError("vectorised decompression needs numpy (pip install 'remus[fast]')")
        self.vectorised = VECTORISED if vectorised is None else vectorised
        self._dctx = zstandard.ZstdDecompressor()

    def decompress(self, batch: PageBatch, lookup: PageLookup) -> Iterator[tuple[int, Optional[bytes]]]:
        """Yield ``(pfn_word, page or None)`` in batch order.

        ``lookup`` must reflect every page yielded before: a batch can carry
        the same PFN twice, the second as an XOR against the first.

        Raises:
            RemoteProtocolError: the frame is corrupt, its size is not what the
                header says, or an XOR page has no base copy here.
        """
        raw = self._frame(batch)
        segment: list[tuple[int, int]] = []  # (entry index, payload offset)
        pfns_in_segment: set[int] = set()
        offset = 0
        for index, (word, kind) in enumerate(zip(batch.pfns, batch.kinds)):
            if kind == PageKind.NO_DATA:
                continue
            pfn = word & PAGE_DATA_PFN_MASK
            if pfn in pfns_in_segment:
                yield from self._restore(batch, raw, segment, lookup)
                segment, pfns_in_segment = [], set()
            segment.append((index, offset))
            pfns_in_segment.add(pfn)
            offset += PAGE_SIZE
        yield from self._restore(batch, raw, segment, lookup)
        last = segment[-1][0] + 1 if segment else 0
        for word in batch.pfns[last:]:
            yield word, None

    def _frame(self, batch: PageBatch) -> bytes:
        expected = batch.data_pages * PAGE_SIZE
        try:
            # A frame states its own size: refuse a lying one before zstd allocates for it.
            claimed = zstandard.frame_content_size(batch.frame)
            if claimed != expected:
                raise RemoteProtocolError(
                    f"page batch: frame claims {claimed} bytes, header says {expected}"
                )
            raw = self._dctx.decompress(batch.frame, max_output_size=expected)
        except zstandard.ZstdError as exc:
            raise RemoteProtocolError(f"page batch: corrupt zstd frame ({exc})") from None
        if len(raw) != expected:
            raise RemoteProtocolError(
                f"page batch: frame holds {len(raw)} bytes, header says {expected}"
            )
        return raw

    def _restore(self, batch: PageBatch, raw: bytes, segment: list[tuple[int, int]],
                 lookup: PageLookup) -> Iterator[tuple[int, Optional[bytes]]]:
        """The pages of one segment, preceded by the NO_DATA entries before each."""
        if not segment:
            return
        first = segment[0][1]
        end = segment[-1][1] + PAGE_SIZE
        xor_rows: list[int] = []
        bases: list[bytes] = []
        for row, (index, _offset) in enumerate(segment):
            if batch.kinds[index] == PageKind.XOR:
                pfn = batch.pfns[index] & PAGE_DATA_PFN_MASK
                base = lookup(pfn)
                if base is None:
                    raise RemoteProtocolError(
                        f"page batch: XOR page for pfn {pfn:#x} but no earlier copy of it was received"
                    )
                xor_rows.append(row)
                bases.append(base)
        pages = self._apply(raw[first:end], xor_rows, bases)
        index = self._segment_start(batch, segment)
        for row, (entry, _offset) in enumerate(segment):
            while index < entry:  # NO_DATA entries between data pages
                yield batch.pfns[index], None
                index += 1
            yield batch.pfns[entry], pages[row * PAGE_SIZE : (row + 1) * PAGE_SIZE]
            index = entry + 1

    @staticmethod
    def _segment_start(batch: PageBatch, segment: list[tuple[int, int]]) -> int:
        """Index of the first entry this segment must yield (NO_DATA entries before it included)."""
        index = segment[0][0]
        while index > 0 and batch.kinds[index - 1] == PageKind.NO_DATA:
            index -= 1
        return index

    def _apply(self, payload: bytes, xor_rows: list[int], bases: list[bytes]) -> bytes:
        if not xor_rows:
            return payload
        if self.vectorised:
            out = np.frombuffer(payload, dtype=np.uint64).reshape(-1, _WORDS_PER_PAGE).copy()
            out[xor_rows] ^= np.frombuffer(b"".join(bases), dtype=np.uint64).reshape(-1, _WORDS_PER_PAGE)
            return bytes(out.data)
        view = memoryview(payload)
        pieces: list["bytes | memoryview"] = [view[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]
                                              for i in range(len(payload) // PAGE_SIZE)]
        for row, base in zip(xor_rows, bases):
            pieces[row] = xor_pages(pieces[row], base)
        return b"".join(pieces)

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
page slots (a "slab") plus a PFN-to-slot map with a last-sent order (numpy
arrays of slots and stamps, or an ``OrderedDict`` without numpy; both take
the same decisions, see ``PageCache``); no page is ever a Python object of
its own.  A batch's data pages are copied into one work buffer;
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

import mmap
from collections import OrderedDict
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import zstandard

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

try:
    import numpy as np
except ImportError:  # the pure-Python path is used
    np = None  # type: ignore[assignment,unused-ignore]

#: Default sender cache: 16384 pages = 64 MiB.
DEFAULT_CACHE_PAGES = 16384
#: zstd level: 1 is the fastest of the real levels and already removes the
#: zeros XOR leaves; higher levels cost pause-free CPU for a few % of bytes.
DEFAULT_LEVEL = 1


#: True when numpy is importable: batches are XORed and cached as arrays.
VECTORISED = np is not None
#: Admission policies of ``PageCache`` (see the module docstring).
POLICIES = ("second", "lru")
#: Pages of PFNs at or above this (4 TiB of guest) are never cached: always sent whole.
CACHED_PFNS = 1 << 30
_WORDS_PER_PAGE = PAGE_SIZE // 8
_NO_SLOT = -1


def xor_pages(a: "bytes | memoryview", b: "bytes | memoryview") -> bytes:
    """Byte-wise XOR of two equal-length buffers (the pure-Python path)."""
    n = len(a)
    return (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(n, "little")


class PageCache:
    """Last sent version of up to ``capacity`` pages, in one slab (see the module docstring).

    ``place(pfns)`` accounts for sending a *segment* (PFNs all different) and
    says, per PFN, which slot holds its last sent version (to XOR against)
    and which slot its new version goes to.  The rule, identical in both
    representations: hits first, in order (they become the most recently
    sent); then each miss in order takes a never-used slot while there is
    one, else, if admitted (policy ``lru``, or sent before), the slot of the
    least recently sent page not touched by this segment; a miss that gets
    no slot is not cached.  With ``vectorised`` the state is numpy arrays
    indexed by PFN and slot (last-sent stamps instead of a linked order),
    else an ``OrderedDict`` and a bitmap.
    """

    def __init__(self, capacity: int = DEFAULT_CACHE_PAGES, policy: str = "second",
                 vectorised: bool = False) -> None:
        if capacity < 0:
            raise ValueError("cache capacity must be >= 0")
        if policy not in POLICIES:
            raise ValueError(f"cache policy must be one of {', '.join(POLICIES)}")
        if vectorised and np is None:
            raise ValueError("a vectorised cache needs numpy (pip install 'remus[fast]')")
        self.capacity = capacity
        self.policy = policy
        self.vectorised = vectorised
        # Private anonymous memory, mapped zero-filled: a slot costs memory only once a page
        # is written into it (``bytearray(n)`` would write, and so back, all of it at once).
        self.slab: "mmap.mmap | bytearray" = (
            mmap.mmap(-1, capacity * PAGE_SIZE, flags=mmap.MAP_PRIVATE) if capacity else bytearray())
        self._next_free = 0
        self.hits = 0
        self.misses = 0
        if vectorised:
            self._slot_of = np.full(0, _NO_SLOT, dtype=np.int64)
            self._seen_np = np.zeros(0, dtype=np.bool_)
            self._pfn_of = np.full(capacity, -1, dtype=np.int64)
            self._stamp = np.zeros(capacity, dtype=np.int64)
            self._clock = 1
        else:
            self._slots: "OrderedDict[int, int]" = OrderedDict()
            self._seen = bytearray()

    def __len__(self) -> int:
        if self.vectorised:
            return int((self._pfn_of >= 0).sum())
        return len(self._slots)

    def __contains__(self, pfn: int) -> bool:
        if self.vectorised:
            return bool(pfn < len(self._slot_of) and self._slot_of[pfn] >= 0)
        return pfn in self._slots

    def place(self, pfns: Sequence[int]) -> tuple[list[int], list[int]]:
        """(read slot or -1, write slot or -1) per PFN of a segment (see the class docstring)."""
        if self.vectorised:
            read, write = self._place_numpy(np.array(pfns, dtype=np.int64))
            return read.tolist(), write.tolist()
        return self._place_python(pfns)

    def swap(self, pfn: int, page: "bytes | memoryview") -> Optional[bytes]:
        """Record ``page`` as the last sent version of ``pfn``; return the previous one."""
        (read,), (write,) = self.place([pfn])
        old = None if read < 0 else bytes(self.slab[read * PAGE_SIZE : (read + 1) * PAGE_SIZE])
        if write >= 0:
            self.slab[write * PAGE_SIZE : (write + 1) * PAGE_SIZE] = page
        return old

    # -- pure Python ---------------------------------------------------------------------
    def _place_python(self, pfns: Sequence[int]) -> tuple[list[int], list[int]]:
        slots = self._slots
        read = [slots.get(pfn, _NO_SLOT) for pfn in pfns]
        touched = set()
        for pfn, slot in zip(pfns, read):
            if slot >= 0:
                slots.move_to_end(pfn)
                touched.add(pfn)
        write = list(read)
        for row, pfn in enumerate(pfns):
            if read[row] >= 0 or pfn >= CACHED_PFNS:
                continue
            sent_before = self._seen_add(pfn)
            if self._next_free < self.capacity:
                slot = self._next_free
                self._next_free += 1
            elif self.capacity and (sent_before or self.policy == "lru"):
                oldest = next(iter(slots))
                if oldest in touched:
                    continue
                slot = slots.pop(oldest)
            else:
                continue
            slots[pfn] = slot
            touched.add(pfn)
            write[row] = slot
        hits = sum(1 for slot in read if slot >= 0)
        self.hits += hits
        self.misses += len(pfns) - hits
        return read, write

    def _seen_add(self, pfn: int) -> bool:
        byte, bit = pfn >> 3, 1 << (pfn & 7)
        if byte >= len(self._seen):
            self._seen.extend(bytes(max(byte + 1, 2 * len(self._seen)) - len(self._seen)))
        seen = bool(self._seen[byte] & bit)
        self._seen[byte] |= bit
        return seen

    # -- numpy -----------------------------------------------------------------------------
    def _place_numpy(self, pfns: Any) -> tuple[Any, Any]:
        n = len(pfns)
        cacheable = pfns < CACHED_PFNS
        index = np.where(cacheable, pfns, 0)
        top = int(index.max()) + 1 if n else 0
        if top > len(self._slot_of):
            grow = max(top, 2 * len(self._slot_of)) - len(self._slot_of)
            self._slot_of = np.concatenate([self._slot_of, np.full(grow, _NO_SLOT, dtype=np.int64)])
            self._seen_np = np.concatenate([self._seen_np, np.zeros(grow, dtype=np.bool_)])
        read = np.where(cacheable, self._slot_of[index], _NO_SLOT)
        hit = read >= 0
        clock = self._clock
        self._stamp[read[hit]] = clock + np.flatnonzero(hit)
        write = read.copy()
        misses = np.flatnonzero(~hit & cacheable)
        if len(misses) and self.capacity:
            self._admit_numpy(pfns, misses, write, clock, clock + n)
        self._seen_np[index[cacheable]] = True
        self._clock = clock + 2 * n
        hits = int(hit.sum())
        self.hits += hits
        self.misses += n - hits
        return read, write

    def _admit_numpy(self, pfns: Any, misses: Any, write: Any, clock: int, stamp_base: int) -> None:
        """Give slots to the missed rows ``misses`` (in order): never-used ones, then victims
        (slots whose stamp is below ``clock``: not touched by this segment), oldest first."""
        seen_before = self._seen_np[pfns[misses]]
        free = min(self.capacity - self._next_free, len(misses))
        if free:
            self._take(pfns, write, misses[:free],
                       np.arange(self._next_free, self._next_free + free, dtype=np.int64), stamp_base)
            self._next_free += free
        rest = misses[free:]
        if self.policy != "lru":
            rest = rest[seen_before[free:]]
        if not len(rest):
            return
        k = min(len(rest), int((self._stamp < clock).sum()))
        if not k:
            return
        candidates = np.argpartition(self._stamp, k - 1)[:k] if k < self.capacity else np.arange(self.capacity)
        victims = candidates[np.argsort(self._stamp[candidates], kind="stable")].astype(np.int64)
        self._slot_of[self._pfn_of[victims]] = _NO_SLOT
        self._take(pfns, write, rest[:k], victims, stamp_base)

    def _take(self, pfns: Any, write: Any, rows: Any, slots: Any, stamp_base: int) -> None:
        write[rows] = slots
        self._slot_of[pfns[rows]] = slots
        self._pfn_of[slots] = pfns[rows]
        self._stamp[slots] = stamp_base + rows


def _xor_rows(pages: Any, rows: Any, bases: Any) -> Any:
    """``pages`` (an array of page rows) with ``rows`` XORed with ``bases``' rows.

    ``bases`` is a writable array the caller gives away (it may become the
    result).  Gather, XOR, then one scatter: numpy's in-place ``a[rows] ^= b``
    is ten times slower.
    """
    if len(rows) == len(pages):  # every page XORed: the common case of a warm cache
        np.bitwise_xor(bases, pages, out=bases)
        return bases
    out = pages.copy()
    if len(rows):
        index = np.asarray(rows, dtype=np.intp)
        out[index] = pages[index] ^ bases
    return out


def _segments(pfns: list[int]) -> list[tuple[int, int]]:
    """(start, end) of runs of ``pfns`` that hold no PFN twice, in order."""
    if len(set(pfns)) == len(pfns):
        return [(0, len(pfns))]
    out = []
    start = 0
    seen: set[int] = set()
    for i, pfn in enumerate(pfns):
        if pfn in seen:
            out.append((start, i))
            start, seen = i, set()
        seen.add(pfn)
    out.append((start, len(pfns)))
    return out


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
        self.vectorised = VECTORISED if vectorised is None else vectorised
        self.cache = PageCache(cache_pages, policy, self.vectorised)
        self._work: Any = None
        self._cctx = zstandard.ZstdCompressor(level=level, write_content_size=True)

    def compress(self, records: Iterable[PageData]) -> Iterator[PageBatch]:
        """Batches carrying exactly the pages of ``records``, in the same order."""
        words: list[int] = []
        pages: list["bytes | memoryview"] = []
        for record in records:
            words.extend(record.pfns)
            pages.extend(record.pages)
            while len(words) >= MAX_BATCH_PAGES:
                count = sum(map(page_type_has_data, words[:MAX_BATCH_PAGES]))
                yield self._batch(words[:MAX_BATCH_PAGES], pages[:count])
                del words[:MAX_BATCH_PAGES], pages[:count]
        if words:
            yield self._batch(words, pages)

    def _batch(self, words: list[int], pages: list["bytes | memoryview"]) -> PageBatch:
        has_data = list(map(page_type_has_data, words))
        pfns = [w & PAGE_DATA_PFN_MASK for w, d in zip(words, has_data) if d]
        kinds_of_data: list[int] = []
        pieces: list["bytes | memoryview"] = []
        segments = _segments(pfns)
        for start, end in segments:
            read, write = self.cache.place(pfns[start:end])
            # One segment (the usual case): zstd reads the work buffer itself, no copy.
            pieces.append(self._payload(pages[start:end], read, write, copy=len(segments) > 1))
            kinds_of_data.extend(PageKind.FULL if r < 0 else PageKind.XOR for r in read)
        data_kinds = iter(kinds_of_data)
        kinds = tuple(int(next(data_kinds)) if d else int(PageKind.NO_DATA) for d in has_data)
        frame = self._cctx.compress(pieces[0] if len(pieces) == 1 else b"".join(pieces))
        return PageBatch(tuple(words), kinds, frame)

    def _payload_numpy(self, pages: Sequence["bytes | memoryview"], read: list[int], xor_rows: list[int],
                       writes: list[tuple[int, int]], copy: bool) -> "bytes | memoryview":
        # Work buffers are allocated once: a fresh 4 MiB buffer per batch costs a page fault
        # per 4 KiB, which on a busy virtual machine is more than the XOR itself.
        n = len(pages)
        if self._work is None:
            self._work = np.zeros((2, MAX_BATCH_PAGES, _WORDS_PER_PAGE), dtype=np.uint64)
        new, out = self._work[0, :n], self._work[1, :n]
        flat = memoryview(new.reshape(-1).view(np.uint8))
        for row, page in enumerate(pages):
            flat[row * PAGE_SIZE : (row + 1) * PAGE_SIZE] = page
        flat.release()
        cache = np.frombuffer(self.cache.slab, dtype=np.uint64).reshape(-1, _WORDS_PER_PAGE)
        if len(xor_rows) == n:  # a warm cache: every page is XORed
            # mode="clip": with out= and the default mode, numpy gathers through a temporary
            # (three times slower here); slots are in range by construction.
            np.take(cache, np.array(read, dtype=np.intp), axis=0, out=out, mode="clip")
            np.bitwise_xor(out, new, out=out)
        else:
            out[:] = new
            if xor_rows:
                index = np.array(xor_rows, dtype=np.intp)
                out[index] = new[index] ^ cache[np.array([read[r] for r in xor_rows], dtype=np.intp)]
        if len(writes) == n:
            cache[np.array([slot for _row, slot in writes], dtype=np.intp)] = new
        elif writes:
            rows, slots = zip(*writes)
            cache[np.array(slots, dtype=np.intp)] = new[np.array(rows, dtype=np.intp)]
        flat_out = memoryview(out.reshape(-1).view(np.uint8))
        return bytes(flat_out) if copy else flat_out

    def _payload(self, pages: Sequence["bytes | memoryview"], read: list[int], write: list[int],
                 copy: bool = True) -> "bytes | memoryview":
        """The payloads (FULL or XOR) of one segment, joined; then its pages copied into their slots."""
        if not pages:
            return b""
        xor_rows = [row for row, slot in enumerate(read) if slot >= 0]
        writes = [(row, slot) for row, slot in enumerate(write) if slot >= 0]
        if self.vectorised:
            return self._payload_numpy(pages, read, xor_rows, writes, copy)
        view = memoryview(self.cache.slab)
        out_pages = list(pages)
        for row in xor_rows:
            slot = read[row]
            out_pages[row] = xor_pages(pages[row], view[slot * PAGE_SIZE : (slot + 1) * PAGE_SIZE])
        joined = b"".join(out_pages)
        for row, slot in writes:
            view[slot * PAGE_SIZE : (slot + 1) * PAGE_SIZE] = pages[row]
        view.release()
        return joined


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
            pages = np.frombuffer(payload, dtype=np.uint64).reshape(-1, _WORDS_PER_PAGE)
            joined = bytearray(b"".join(bases))
            out = _xor_rows(pages, xor_rows, np.frombuffer(joined, dtype=np.uint64).reshape(-1, _WORDS_PER_PAGE))
            return bytes(out.data)
        view = memoryview(payload)
        pieces: list["bytes | memoryview"] = [view[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]
                                              for i in range(len(payload) // PAGE_SIZE)]
        for row, base in zip(xor_rows, bases):
            pieces[row] = xor_pages(pieces[row], base)
        return b"".join(pieces)

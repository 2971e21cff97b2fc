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
its own.  A batch's data pages are joined into one buffer (one C-level
``join``); the XOR of every cached page against its slot and the copy of
every page into its slot are done for the whole batch at once: in one pass
by the C helper ``remus.stream._pages`` where it was built at install (a C
compiler and python3-dev), else with numpy when it is installed (``pip
install 'remus[fast]'`` or Debian's python3-numpy), else page by page through
Python integers.  Every combination produces the same bytes (a test compares
them on the wire).  A PFN that occurs twice in one batch splits it there, so
its second copy is XORed against its first.  A batch at least half XOR pages
is compressed at ``DEFAULT_DELTA_LEVEL``, which is faster on mostly-zero
deltas for the same bytes; other batches at ``DEFAULT_LEVEL``.

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

import array
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

try:
    from remus.stream._pages import ffi as _ffi, lib as _lib  # type: ignore[import-not-found,unused-ignore]
except ImportError:  # not built (no compiler or no Python headers at install): numpy or Python
    _ffi = _lib = None

#: Default sender cache: 16384 pages = 64 MiB.
DEFAULT_CACHE_PAGES = 16384
#: zstd level of a batch of mostly whole pages: 1 is the fastest of the real levels;
#: the fast levels below it send 15 % more bytes of real binaries (docs/performance.md).
DEFAULT_LEVEL = 1
#: zstd level of a batch at least half XOR pages: -1 sends the same bytes of mostly-zero
#: deltas as level 1 (within 1 %), 1.2 to 1.5 times as fast.
DEFAULT_DELTA_LEVEL = -1


#: True when numpy is importable: the cache's bookkeeping is done over arrays.
VECTORISED = np is not None
#: True when the C helper ``remus.stream._pages`` was built at install: it moves a batch's
#: bytes (XOR, copies into the cache) in one pass, whichever bookkeeping is used.
NATIVE = _lib is not None
#: Admission policies of ``PageCache`` (see the module docstring).
POLICIES = ("second", "lru")
#: Pages of PFNs at or above this (4 TiB of guest) are never cached: always sent whole.
CACHED_PFNS = 1 << 30
_WORDS_PER_PAGE = PAGE_SIZE // 8
#: A PAGE_DATA word's top nibble is its XEN_DOMCTL_PFINFO_* type; BROKEN (0xD), XALLOC (0xE)
#: and XTAB (0xF) carry no page (``page_type_has_data``, over arrays).
_FIRST_NO_DATA_NIBBLE = 0xD
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
        # Anonymous memory, mapped zero-filled: a slot costs memory only once a page is written
        # into it (``bytearray(n)`` would write, and so back, all of it at once).  Shared, not
        # private: when the process is killed, the kernel frees shared memory only after it has
        # closed the process's sockets, private memory before, so the backup learns of a killed
        # primary sooner (measured in the Xen lab: docs/standby.md, runs 17 to 20).
        self.slab: "mmap.mmap | bytearray" = (
            mmap.mmap(-1, capacity * PAGE_SIZE, flags=mmap.MAP_SHARED) if capacity else bytearray())
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

    def unmap(self) -> None:
        """Drop the slab's page-table entries; its contents stay, and the next access maps them back.

        The pages live on in the shared mapping's memory, so nothing cached is lost; what
        goes is the per-page mapping a killed process must tear down before its sockets
        close (docs/standby.md).  Never frees a cached page, and does nothing for a
        zero-capacity cache.
        """
        if isinstance(self.slab, mmap.mmap):
            self.slab.madvise(mmap.MADV_DONTNEED)

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


def _int64s(values: Any) -> Any:
    """A C ``int64_t[]`` over ``values`` (a numpy int64 array or a list of ints), no copy of an array."""
    if np is not None and isinstance(values, np.ndarray):
        return _ffi.from_buffer("int64_t[]", np.ascontiguousarray(values, dtype=np.int64))
    return _ffi.from_buffer("int64_t[]", array.array("q", values))


def _encode_native(pages: "bytes | memoryview", first: int, read: Any, write: Any,
                   slab: "mmap.mmap | bytearray", out: Any) -> None:
    """The C helper's one pass over a segment: pages ``first`` on of ``pages`` XORed with
    (or copied past) their read slots into ``out``, then copied into their write slots."""
    count = len(read)
    if len(write) != count or memoryview(pages).nbytes < (first + count) * PAGE_SIZE \
            or memoryview(out).nbytes < count * PAGE_SIZE:
        raise ValueError("pages, slots and output of a segment do not match")
    source = _ffi.from_buffer("uint8_t[]", pages)  # kept: it holds ``pages`` for the call
    slots = len(slab) // PAGE_SIZE
    if _lib.remus_encode_pages(source + first * PAGE_SIZE, count, _int64s(read), _int64s(write),
                               _ffi.from_buffer("uint8_t[]", slab, require_writable=True), slots,
                               _ffi.from_buffer("uint8_t[]", out, require_writable=True)) != 0:
        raise AssertionError("page cache slot out of range")  # PageCache gives slots below capacity


def _entries_numpy(words: list[int]) -> tuple[Any, Any]:
    """PAGE_DATA words as a uint64 array, and which of them are followed by a page
    (``page_type_has_data`` over the array)."""
    entries = np.array(words, dtype=np.uint64)
    return entries, (entries >> np.uint64(60)) < _FIRST_NO_DATA_NIBBLE


def _segments_numpy(pfns: Any) -> list[tuple[int, int]]:
    """``_segments`` of an array (one sort to see that no PFN repeats, the usual case)."""
    if len(pfns) < 2 or bool((np.diff(np.sort(pfns)) != 0).all()):
        return [(0, len(pfns))]
    return _segments(pfns.tolist())


class PageCompressor:
    """Sender side: PAGE_DATA records in, ``PageBatch`` records out.

    ``vectorised`` chooses numpy bookkeeping (default: when numpy is installed),
    ``native`` the C helper for moving the bytes (default: when it was built);
    ``policy`` is the cache's admission policy; ``level`` and ``delta_level``
    are zstd's for batches of mostly whole pages and of mostly XOR pages.  The
    bytes produced are the same in every combination for the same settings.
    """

    def __init__(self, cache_pages: int = DEFAULT_CACHE_PAGES, level: int = DEFAULT_LEVEL,
                 *, vectorised: Optional[bool] = None, policy: str = "second",
                 delta_level: int = DEFAULT_DELTA_LEVEL, native: Optional[bool] = None) -> None:
        if vectorised and np is None:
            raise ValueError("vectorised compression needs numpy (pip install 'remus[fast]')")
        if native and _lib is None:
            raise ValueError("native compression needs the C helper remus.stream._pages, built at "
                             "install where a C compiler and Python's headers are (python3-dev)")
        self.vectorised = VECTORISED if vectorised is None else vectorised
        self.native = NATIVE if native is None else native
        self.cache = PageCache(cache_pages, policy, self.vectorised)
        self._work: Any = None
        self._cctx = zstandard.ZstdCompressor(level=level, write_content_size=True)
        self._delta_cctx = zstandard.ZstdCompressor(level=delta_level, write_content_size=True)

    def compress(self, records: Iterable[PageData]) -> Iterator[PageBatch]:
        """Batches carrying exactly the pages of ``records``, in the same order."""
        words: list[int] = []
        pages: list["bytes | memoryview"] = []
        batch = self._batch_numpy if self.vectorised else self._batch
        for record in records:
            words.extend(record.pfns)
            pages.extend(record.pages)
            while len(words) >= MAX_BATCH_PAGES:
                count = self._data_pages(words[:MAX_BATCH_PAGES])
                yield batch(words[:MAX_BATCH_PAGES], pages[:count])
                del words[:MAX_BATCH_PAGES], pages[:count]
        if words:
            yield batch(words, pages)

    def _data_pages(self, words: list[int]) -> int:
        """How many of these PAGE_DATA words are followed by a page."""
        if self.vectorised:
            return int(np.count_nonzero(_entries_numpy(words)[1]))
        return sum(map(page_type_has_data, words))

    def _compress(self, payload: "bytes | bytearray | memoryview", xor_pages: int, data_pages: int) -> bytes:
        """The zstd frame of a batch's payloads: ``delta_level`` when at least half are XOR."""
        cctx = self._delta_cctx if 2 * xor_pages >= data_pages > 0 else self._cctx
        return cctx.compress(payload)

    def _batch(self, words: list[int], pages: list["bytes | memoryview"]) -> PageBatch:
        has_data = list(map(page_type_has_data, words))
        pfns = [w & PAGE_DATA_PFN_MASK for w, d in zip(words, has_data) if d]
        kinds_of_data: list[int] = []
        pieces: list["bytes | bytearray"] = []
        for start, end in _segments(pfns):
            read, write = self.cache.place(pfns[start:end])
            pieces.append(self._payload(pages[start:end], read, write))
            kinds_of_data.extend(PageKind.FULL if r < 0 else PageKind.XOR for r in read)
        data_kinds = iter(kinds_of_data)
        kinds = tuple(int(next(data_kinds)) if d else int(PageKind.NO_DATA) for d in has_data)
        xored = kinds_of_data.count(PageKind.XOR)
        frame = self._compress(pieces[0] if len(pieces) == 1 else b"".join(pieces), xored, len(pfns))
        return PageBatch(tuple(words), kinds, frame)

    def _batch_numpy(self, words: list[int], pages: list["bytes | memoryview"]) -> PageBatch:
        """``_batch`` over arrays: the same decisions and bytes, no per-page Python work
        beyond one ``join`` of the pages (a C loop) into the batch's input."""
        entries, has_data = _entries_numpy(words)
        every = bool(has_data.all())
        pfns = (entries & np.uint64(PAGE_DATA_PFN_MASK)).astype(np.int64)
        if not every:
            pfns = pfns[has_data]
        n = len(pfns)
        # Work buffer allocated once: a fresh 4 MiB buffer per batch costs a page fault per
        # 4 KiB, which on a busy virtual machine is more than the XOR itself.
        if self._work is None:
            self._work = np.zeros((MAX_BATCH_PAGES, _WORDS_PER_PAGE), dtype=np.uint64)
        joined = b"".join(pages)
        new_all = np.frombuffer(joined, dtype=np.uint64).reshape(-1, _WORDS_PER_PAGE)
        out_all = self._work[:n]
        cache = np.frombuffer(self.cache.slab, dtype=np.uint64).reshape(-1, _WORDS_PER_PAGE)
        kinds_of_data = np.empty(n, dtype=np.uint8)
        for start, end in _segments_numpy(pfns):
            # Segments are disjoint rows of one output; the cache is updated between them,
            # so a PFN's second copy is XORed against its first.
            read, write = self.cache._place_numpy(pfns[start:end])
            new, out = new_all[start:end], out_all[start:end]
            hit = read >= 0
            kinds_of_data[start:end] = np.where(hit, np.uint8(PageKind.XOR), np.uint8(PageKind.FULL))
            if self.native:
                _encode_native(joined, start, read, write, self.cache.slab, out)
                continue
            if hit.all():  # a warm cache: every page is XORed
                # mode="clip": with out= and the default mode, numpy gathers through a
                # temporary (three times slower here); slots are in range by construction.
                np.take(cache, read, axis=0, out=out, mode="clip")
                np.bitwise_xor(out, new, out=out)
            else:
                out[:] = new
                rows = np.flatnonzero(hit)
                if len(rows):
                    out[rows] = new[rows] ^ cache[read[rows]]
            written = write >= 0
            if written.all():
                cache[write] = new
            elif written.any():
                cache[write[written]] = new[written]
        if every:
            kinds = kinds_of_data
        else:
            kinds = np.zeros(len(words), dtype=np.uint8)  # PageKind.NO_DATA
            kinds[has_data] = kinds_of_data
        xored = int(np.count_nonzero(kinds_of_data == PageKind.XOR))
        frame = self._compress(memoryview(out_all.reshape(-1).view(np.uint8)), xored, n)
        return PageBatch(tuple(words), tuple(kinds.tolist()), frame)

    def _payload(self, pages: Sequence["bytes | memoryview"], read: list[int],
                 write: list[int]) -> "bytes | bytearray":
        """The payloads (FULL or XOR) of one segment, joined; then its pages copied into their slots."""
        if self.native:
            out = bytearray(len(pages) * PAGE_SIZE)
            _encode_native(b"".join(pages), 0, read, write, self.cache.slab, out)
            return out
        view = memoryview(self.cache.slab)
        out_pages = list(pages)
        for row, slot in enumerate(read):
            if slot >= 0:
                out_pages[row] = xor_pages(pages[row], view[slot * PAGE_SIZE : (slot + 1) * PAGE_SIZE])
        joined = b"".join(out_pages)
        for row, slot in enumerate(write):
            if slot >= 0:
                view[slot * PAGE_SIZE : (slot + 1) * PAGE_SIZE] = pages[row]
        view.release()
        return joined


#: Returns the receiver's current copy of a PFN's page (staged or committed), or None.
PageLookup = Callable[[int], Optional[bytes]]


class PageDecompressor:
    """Receiver side: a ``PageBatch`` back into the exact pages that were sent.

    XOR pages are restored a segment at a time (a run of the batch with no
    PFN twice): with the C helper when ``native`` (default: when built), else
    with numpy when ``vectorised`` (default: when installed), else in Python.
    """

    def __init__(self, *, vectorised: Optional[bool] = None, native: Optional[bool] = None) -> None:
        if vectorised and np is None:
            raise ValueError("vectorised decompression needs numpy (pip install 'remus[fast]')")
        if native and _lib is None:
            raise ValueError("native decompression needs the C helper remus.stream._pages (see PageCompressor)")
        self.vectorised = VECTORISED if vectorised is None else vectorised
        self.native = NATIVE if native is None else native
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
        if self.native:
            base_pages = b"".join(bases)
            if len(base_pages) != len(bases) * PAGE_SIZE:
                raise ValueError("XOR base copies must be whole pages")  # the receiver stores pages
            restored = bytearray(payload)
            if _lib.remus_xor_rows(_ffi.from_buffer("uint8_t[]", restored, require_writable=True),
                                   len(restored) // PAGE_SIZE, _int64s(xor_rows), len(xor_rows),
                                   _ffi.from_buffer("uint8_t[]", base_pages)) != 0:
                raise AssertionError("XOR row out of range")  # rows index this payload by construction
            return bytes(restored)
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

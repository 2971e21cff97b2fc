"""Checkpoint compression: XOR against the last sent page, then zstd, per batch.

Sans I/O.  The sender keeps a bounded cache of the version of each page it
last sent (``PageCache``); a dirty page found in the cache travels as its XOR
with that version (mostly zeros when a guest rewrote a few bytes), a page not
in the cache travels whole.  All payloads of up to ``MAX_BATCH_PAGES`` entries
are then compressed with one zstd call (one call per page is far too slow at
tens of checkpoints a second).  The receiver needs no cache of its own: the
XOR base is its own copy of the page, which equals the sender's cached one
because every page the sender caches was sent to it.

Cache policy: least recently *sent* is evicted first; the default holds
``DEFAULT_CACHE_PAGES`` pages (64 MiB), enough for the working set of most
guests at a 200 ms interval.  The original xm-era compression used an 8192-page
(32 MiB) LRU.

Never compresses libxc's other records, and never sees a socket.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Iterable, Iterator, Optional, Sequence

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

#: Default sender cache: 16384 pages = 64 MiB.
DEFAULT_CACHE_PAGES = 16384
#: zstd level: 1 is the fastest of the real levels and already removes the
#: zeros XOR leaves; higher levels cost pause-free CPU for a few % of bytes.
DEFAULT_LEVEL = 1


_XOR_CHUNK = 512
_ZERO_CHUNK = bytes(_XOR_CHUNK)


def xor_pages(a: bytes, b: bytes) -> bytes:
    """Byte-wise XOR of two equal-length buffers (pages).

    Guests mostly rewrite a few bytes of a page, so only the 512-byte chunks
    that differ are XORed (through Python integers, the fastest pure-Python
    XOR); a page that changed almost everywhere is XORed in one go.
    """
    n = len(a)
    if a == b:
        return bytes(n)
    if n % _XOR_CHUNK:
        return (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(n, "little")
    chunks = range(0, n, _XOR_CHUNK)
    differ = [off for off in chunks if a[off : off + _XOR_CHUNK] != b[off : off + _XOR_CHUNK]]
    if len(differ) * 2 > len(chunks):
        return (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(n, "little")
    parts = []
    for off in chunks:
        if off in differ:
            x = int.from_bytes(a[off : off + _XOR_CHUNK], "little") ^ int.from_bytes(
                b[off : off + _XOR_CHUNK], "little"
            )
            parts.append(x.to_bytes(_XOR_CHUNK, "little"))
        else:
            parts.append(_ZERO_CHUNK)
    return b"".join(parts)


class PageCache:
    """Last sent version of up to ``capacity`` pages, keyed by PFN, LRU-evicted."""

    def __init__(self, capacity: int = DEFAULT_CACHE_PAGES) -> None:
        if capacity < 0:
            raise ValueError("cache capacity must be >= 0")
        self.capacity = capacity
        self._pages: "OrderedDict[int, bytes]" = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._pages)

    def swap(self, pfn: int, page: bytes) -> Optional[bytes]:
        """Record ``page`` as the last sent version of ``pfn``; return the previous one."""
        old = self._pages.pop(pfn, None)
        if old is None:
            self.misses += 1
        else:
            self.hits += 1
        if self.capacity:
            self._pages[pfn] = page
            if len(self._pages) > self.capacity:
                self._pages.popitem(last=False)
        return old


class PageCompressor:
    """Sender side: PAGE_DATA records in, ``PageBatch`` records out."""

    def __init__(self, cache_pages: int = DEFAULT_CACHE_PAGES, level: int = DEFAULT_LEVEL) -> None:
        self.cache = PageCache(cache_pages)
        self._cctx = zstandard.ZstdCompressor(level=level, write_content_size=True)

    def compress(self, records: Iterable[PageData]) -> Iterator[PageBatch]:
        """Batches carrying exactly the pages of ``records``, in the same order."""
        pfns: list[int] = []
        kinds: list[int] = []
        payloads: list[bytes] = []
        for record in records:
            page_iter = iter(record.pages)
            for word in record.pfns:
                if page_type_has_data(word):
                    page = next(page_iter)
                    old = self.cache.swap(word & PAGE_DATA_PFN_MASK, page)
                    if old is None:
                        kinds.append(PageKind.FULL)
                        payloads.append(page)
                    else:
                        kinds.append(PageKind.XOR)
                        payloads.append(xor_pages(page, old))
                else:
                    kinds.append(PageKind.NO_DATA)
                pfns.append(word)
                if len(pfns) == MAX_BATCH_PAGES:
                    yield self._batch(pfns, kinds, payloads)
                    pfns, kinds, payloads = [], [], []
        if pfns:
            yield self._batch(pfns, kinds, payloads)

    def _batch(self, pfns: Sequence[int], kinds: Sequence[int], payloads: Sequence[bytes]) -> PageBatch:
        frame = self._cctx.compress(b"".join(payloads))
        return PageBatch(tuple(pfns), tuple(int(k) for k in kinds), frame)


#: Returns the receiver's current copy of a PFN's page (staged or committed), or None.
PageLookup = Callable[[int], Optional[bytes]]


class PageDecompressor:
    """Receiver side: a ``PageBatch`` back into the exact pages that were sent."""

    def __init__(self) -> None:
        self._dctx = zstandard.ZstdDecompressor()

    def decompress(self, batch: PageBatch, lookup: PageLookup) -> Iterator[tuple[int, Optional[bytes]]]:
        """Yield ``(pfn_word, page or None)`` in batch order.

        ``lookup`` must reflect every page yielded before: a batch can carry
        the same PFN twice, the second as an XOR against the first.

        Raises:
            RemoteProtocolError: the frame is corrupt, its size is not what the
                header says, or an XOR page has no base copy here.
        """
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
        view = memoryview(raw)
        offset = 0
        for word, kind in zip(batch.pfns, batch.kinds):
            if kind == PageKind.NO_DATA:
                yield word, None
                continue
            payload = bytes(view[offset : offset + PAGE_SIZE])
            offset += PAGE_SIZE
            if kind == PageKind.FULL:
                yield word, payload
            else:
                base = lookup(word & PAGE_DATA_PFN_MASK)
                if base is None:
                    raise RemoteProtocolError(
                        f"page batch: XOR page for pfn {word & PAGE_DATA_PFN_MASK:#x} "
                        "but no earlier copy of it was received"
                    )
                yield word, xor_pages(payload, base)

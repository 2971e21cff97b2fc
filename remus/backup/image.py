"""What the backup holds: the last committed domain image, and one checkpoint being received.

An ``Image`` is the state of a domain as of one checkpoint: every page ever
sent (latest version, keyed by PFN, with its PAGE_DATA type word, held in a
``PageStore``: one buffer indexed by PFN, not an object per page), the
domain's header, the non-page records of its first checkpoint and those of
its latest one (vCPU and other state), and how many of the first checkpoint's
records came before its first page: libxc's static records, which a restore
needs ahead of the pages (``static_records`` / ``state_records``).  ``Staging``
collects a checkpoint as it arrives; ``Image.commit`` folds it in only when
its COMMIT has been verified, so a partial checkpoint never touches the
image.  Pure data: no sockets, no clocks.
"""

from __future__ import annotations

import mmap
import struct
import threading
from dataclasses import dataclass, field
from typing import Iterator, Mapping, MutableMapping, Optional

from remus.disk.replica import DiskStaging
from remus.errors import RemoteProtocolError
from remus.stream.records import (
    PAGE_DATA_PFN_MASK,
    PAGE_SIZE,
    DomainHeader,
    Record,
    SimVcpu,
    page_type_has_data,
)

#: Bound on the non-page records of one checkpoint held in memory.
MAX_STAGED_RECORD_BYTES = 64 * 1024 * 1024


@dataclass
class Staging:
    """One checkpoint being received (at most one at a time)."""

    max_pages: int
    # A PageStore for the first checkpoint, so that all of memory becomes the image without a
    # copy; a dict for the later, small ones.
    pages: MutableMapping[int, "PageEntry"] = field(default_factory=lambda: PageStore())
    records: list[Record] = field(default_factory=list)
    header: Optional[DomainHeader] = None
    record_bytes: int = 0
    checkpoint_seen: bool = False
    #: How many of ``records`` had arrived when the first page did (None: no page yet).
    records_before_pages: Optional[int] = None
    #: The checkpoint's disk writes, applied to the replicas at its commit (``remus.disk.replica``).
    disk: DiskStaging = field(default_factory=DiskStaging)

    def add_page(self, word: int, data: Optional[bytes]) -> None:
        pfn = word & PAGE_DATA_PFN_MASK
        if pfn >= self.max_pages:
            raise RemoteProtocolError(
                f"page {pfn:#x} is beyond the domain's {self.max_pages} pages"
            )
        if data is not None and len(data) != PAGE_SIZE:
            raise RemoteProtocolError("page of the wrong size")
        if self.records_before_pages is None:
            self.records_before_pages = len(self.records)
        self.pages[pfn] = (word, data)

    def add_record(self, record: Record, size: int) -> None:
        self.record_bytes += size
        if self.record_bytes > MAX_STAGED_RECORD_BYTES:
            raise RemoteProtocolError(
                f"a checkpoint's state records exceed {MAX_STAGED_RECORD_BYTES} bytes"
            )
        self.records.append(record)

    def page(self, pfn: int) -> Optional[bytes]:
        if isinstance(self.pages, PageStore):
            return self.pages.page(pfn)
        entry = self.pages.get(pfn)
        return None if entry is None else entry[1]


PageEntry = tuple[int, Optional[bytes]]
_WORD = struct.Struct("<Q")
# Private: a shared anonymous mapping cannot grow (its pages beyond the first size raise SIGBUS).
_PRIVATE = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS


class PageStore(MutableMapping[int, PageEntry]):
    """PFN to (PAGE_DATA type word, page or None), stored compactly.

    Two anonymous mappings indexed by PFN hold the pages (4096 bytes each)
    and the type words (8 bytes each), a ``bytearray`` which PFNs are present
    (1 byte each): nothing per page is a Python object, so the backup holds
    the guest's size plus a constant.  The mappings grow in place (``mremap``)
    up to the highest PFN stored; PFNs never stored below it cost address
    space, not memory.  Reads return copies (``bytes``): a commit rewrites
    the mappings in place.
    """

    def __init__(self) -> None:
        self._data: Optional[mmap.mmap] = None
        self._words: Optional[mmap.mmap] = None
        self._present = bytearray()
        self._count = 0

    def reserve(self, pfns: int) -> None:
        """Make room for PFNs below ``pfns`` (a caller that knows the highest one saves regrowth)."""
        if pfns <= len(self._present):
            return
        if self._data is None or self._words is None:
            self._data = mmap.mmap(-1, pfns * PAGE_SIZE, flags=_PRIVATE)
            self._words = mmap.mmap(-1, pfns * _WORD.size, flags=_PRIVATE)
        else:
            self._data.resize(pfns * PAGE_SIZE)
            self._words.resize(pfns * _WORD.size)
        self._present += bytes(pfns - len(self._present))

    def _grow(self, pfn: int) -> None:
        if pfn >= len(self._present):
            self.reserve(max(pfn + 1, len(self._present) + len(self._present) // 4, 256))

    def _word(self, pfn: int) -> int:
        assert self._words is not None
        word: int = _WORD.unpack_from(self._words, pfn * _WORD.size)[0]
        return word

    def __getitem__(self, pfn: int) -> PageEntry:
        if not 0 <= pfn < len(self._present) or not self._present[pfn]:
            raise KeyError(pfn)
        word = self._word(pfn)
        if not page_type_has_data(word):
            return word, None
        assert self._data is not None
        return word, self._data[pfn * PAGE_SIZE : (pfn + 1) * PAGE_SIZE]

    def __setitem__(self, pfn: int, entry: PageEntry) -> None:
        word, data = entry
        if pfn < 0:
            raise KeyError(pfn)
        self._grow(pfn)
        if not self._present[pfn]:
            self._present[pfn] = 1
            self._count += 1
        assert self._data is not None and self._words is not None
        _WORD.pack_into(self._words, pfn * _WORD.size, word)
        if data is not None:
            if len(data) != PAGE_SIZE:
                raise ValueError("a page must be 4096 bytes")
            self._data[pfn * PAGE_SIZE : (pfn + 1) * PAGE_SIZE] = data

    def put_many(self, entries: Mapping[int, PageEntry]) -> None:
        """``self[pfn] = entry`` for every item, in one pass (a checkpoint's commit)."""
        if not entries:
            return
        self.reserve(max(entries) + 1)
        assert self._data is not None and self._words is not None
        data_map, present = self._data, self._present
        added = 0
        with memoryview(self._words) as raw, raw.cast("Q") as words:
            for pfn, (word, data) in entries.items():
                if pfn < 0:
                    raise KeyError(pfn)
                if not present[pfn]:
                    present[pfn] = 1
                    added += 1
                words[pfn] = word
                if data is not None:
                    if len(data) != PAGE_SIZE:
                        raise ValueError("a page must be 4096 bytes")
                    data_map[pfn * PAGE_SIZE : (pfn + 1) * PAGE_SIZE] = data
        self._count += added

    def __delitem__(self, pfn: int) -> None:
        if not 0 <= pfn < len(self._present) or not self._present[pfn]:
            raise KeyError(pfn)
        self._present[pfn] = 0
        self._count -= 1

    def __iter__(self) -> Iterator[int]:
        """Present PFNs in ascending order."""
        present = self._present
        start = present.find(1)
        while start >= 0:
            yield start
            start = present.find(1, start + 1)

    def __len__(self) -> int:
        return self._count

    def page(self, pfn: int) -> Optional[bytes]:
        """The page's contents, or None (absent, or a type without data)."""
        if not 0 <= pfn < len(self._present) or not self._present[pfn]:
            return None
        if not page_type_has_data(self._word(pfn)):
            return None
        assert self._data is not None
        return self._data[pfn * PAGE_SIZE : (pfn + 1) * PAGE_SIZE]

    def memory(self, pages: int) -> bytes:
        """``pages`` pages from PFN 0 (absent pages and pages without data are zero)."""
        buf = bytearray(pages * PAGE_SIZE)
        have = min(pages, len(self._present))
        if self._data is not None:
            with memoryview(self._data) as view:
                buf[: have * PAGE_SIZE] = view[: have * PAGE_SIZE]
        for pfn in range(have):  # a page once sent, then sent without data, reads as zeros
            if self._present[pfn] and not page_type_has_data(self._word(pfn)):
                buf[pfn * PAGE_SIZE : (pfn + 1) * PAGE_SIZE] = bytes(PAGE_SIZE)
        return bytes(buf)


@dataclass
class Image:
    """The last committed checkpoint (see the module docstring)."""

    seq: int = 0
    header: Optional[DomainHeader] = None
    pages: MutableMapping[int, PageEntry] = field(default_factory=PageStore)
    first_records: list[Record] = field(default_factory=list)
    latest_records: list[Record] = field(default_factory=list)
    #: How many of ``first_records`` came before the first checkpoint's first page.
    static_count: int = 0
    #: Held by ``commit``; a reader in another thread (the hot standby's feeder) holds it per read.
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def page(self, pfn: int) -> Optional[bytes]:
        if isinstance(self.pages, PageStore):
            return self.pages.page(pfn)
        entry = self.pages.get(pfn)
        return None if entry is None else entry[1]

    def commit(self, seq: int, staged: Staging) -> None:
        """Fold a complete, verified checkpoint in."""
        with self.lock:
            self._commit(seq, staged)

    def _commit(self, seq: int, staged: Staging) -> None:
        if self.seq == 0:
            self.header = staged.header
            self.first_records = list(staged.records)
            before = staged.records_before_pages
            self.static_count = len(staged.records) if before is None else before
        if isinstance(self.pages, PageStore) and not self.pages and isinstance(staged.pages, PageStore):
            self.pages = staged.pages  # the first checkpoint: adopted, not copied
        elif isinstance(self.pages, PageStore):
            self.pages.put_many(staged.pages)
        else:
            self.pages.update(staged.pages)
        self.latest_records = list(staged.records)
        self.seq = seq

    def static_records(self) -> list[Record]:
        """The records that opened the stream before any page (libxc: X86_PV_INFO ...
        STATIC_DATA_END, X86_PV_P2M_FRAMES), in order."""
        return self.first_records[: self.static_count]

    def state_records(self) -> list[Record]:
        """The latest checkpoint's records other than the static ones (libxc: the TSC,
        shared-info and vCPU records that follow its pages), in order."""
        if self.seq <= 1:
            return self.first_records[self.static_count :]
        return list(self.latest_records)

    def sim_vcpu(self) -> Optional[SimVcpu]:
        for record in reversed(self.latest_records):
            if isinstance(record, SimVcpu):
                return record
        return None

    def memory(self, pages: int) -> bytes:
        """Guest memory as one buffer of ``pages`` pages (pages never sent are zero)."""
        if isinstance(self.pages, PageStore):
            return self.pages.memory(pages)
        buf = bytearray(pages * PAGE_SIZE)
        for pfn, (_word, data) in self.pages.items():
            if data is not None and pfn < pages:
                buf[pfn * PAGE_SIZE : (pfn + 1) * PAGE_SIZE] = data
        return bytes(buf)

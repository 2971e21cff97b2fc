"""What the backup holds: the last committed domain image, and one checkpoint being received.

An ``Image`` is the state of a domain as of one checkpoint: every page ever
sent (latest version, keyed by PFN, with its PAGE_DATA type word), the
domain's header, the non-page records of its first checkpoint and those of
its latest one (vCPU and other state), and how many of the first checkpoint's
records came before its first page: libxc's static records, which a restore
needs ahead of the pages (``static_records`` / ``state_records``).  ``Staging``
collects a checkpoint as it arrives; ``Image.commit`` folds it in only when
its COMMIT has been verified, so a partial checkpoint never touches the
image.  Pure data: no sockets, no clocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from remus.errors import RemoteProtocolError
from remus.stream.records import PAGE_DATA_PFN_MASK, PAGE_SIZE, DomainHeader, Record, SimVcpu

#: Bound on the non-page records of one checkpoint held in memory.
MAX_STAGED_RECORD_BYTES = 64 * 1024 * 1024


@dataclass
class Staging:
    """One checkpoint being received (at most one at a time)."""

    max_pages: int
    pages: dict[int, tuple[int, Optional[bytes]]] = field(default_factory=dict)
    records: list[Record] = field(default_factory=list)
    header: Optional[DomainHeader] = None
    record_bytes: int = 0
    checkpoint_seen: bool = False
    #: How many of ``records`` had arrived when the first page did (None: no page yet).
    records_before_pages: Optional[int] = None

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
        entry = self.pages.get(pfn)
        return None if entry is None else entry[1]


@dataclass
class Image:
    """The last committed checkpoint (see the module docstring)."""

    seq: int = 0
    header: Optional[DomainHeader] = None
    pages: dict[int, tuple[int, Optional[bytes]]] = field(default_factory=dict)
    first_records: list[Record] = field(default_factory=list)
    latest_records: list[Record] = field(default_factory=list)
    #: How many of ``first_records`` came before the first checkpoint's first page.
    static_count: int = 0

    def page(self, pfn: int) -> Optional[bytes]:
        entry = self.pages.get(pfn)
        return None if entry is None else entry[1]

    def commit(self, seq: int, staged: Staging) -> None:
        """Fold a complete, verified checkpoint in."""
        if self.seq == 0:
            self.header = staged.header
            self.first_records = list(staged.records)
            before = staged.records_before_pages
            self.static_count = len(staged.records) if before is None else before
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
        buf = bytearray(pages * PAGE_SIZE)
        for pfn, (_word, data) in self.pages.items():
            if data is not None and pfn < pages:
                buf[pfn * PAGE_SIZE : (pfn + 1) * PAGE_SIZE] = data
        return bytes(buf)

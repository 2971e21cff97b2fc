"""What the backup holds: the last committed domain image, and one checkpoint being received.

An ``Image`` is the state of a domain as of one checkpoint: every page ever
sent (latest version, keyed by PFN, with its PAGE_DATA type word), the
domain's header, the non-page records of its first checkpoint (libxc's static
records) and those of its latest one (vCPU and other state).  ``Staging``
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

    def add_page(self, word: int, data: Optional[bytes]) -> None:
        pfn = word & PAGE_DATA_PFN_MASK
        if pfn >= self.max_pages:
            raise RemoteProtocolError(
                f"page {pfn:#x} is beyond the domain's {self.max_pages} pages"
            )
        if data is not None and len(data) != PAGE_SIZE:
            raise RemoteProtocolError("page of the wrong size")
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

    def page(self, pfn: int) -> Optional[bytes]:
        entry = self.pages.get(pfn)
        return None if entry is None else entry[1]

    def commit(self, seq: int, staged: Staging) -> None:
        """Fold a complete, verified checkpoint in."""
        if self.seq == 0:
            self.header = staged.header
            self.first_records = list(staged.records)
        self.pages.update(staged.pages)
        self.latest_records = list(staged.records)
        self.seq = seq

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

"""The simulated guest's memory: one shared file mapping, laid out like a tiny machine.

Layout of the memfd both processes map::

    [0, 4096)                    control block (vCPU state, see ``VCPU``;
                                 ``u64`` dirty-log length at ``LOG_COUNT_OFFSET``)
    [4096, 4096 + B)             log-dirty map: one byte per page, 1 = dirty
    [4096 + B, ... + L)          dirty log: ``u32`` PFN of each page dirtied
                                 since the last capture, in the order dirtied
    [4096 + B + L, ... pages*4K) guest pages

(B is the page count and L four times the page count, each rounded up to 4
KiB.)  The guest process sets a page's dirty byte *before* it writes the
page, and the first time it sets it (0 to 1) it also appends the PFN to the
dirty log; it only ever stops between two whole writes, so a suspended
guest's memory, dirty map and log are always consistent.  The primary reads
the log and clears exactly those bytes at each capture, as Xen's log-dirty
CLEAN does: the cost is proportional to the dirty pages, never to memory.

The vCPU state is ``u64 counter`` (bumped by every guest step, never moves
back), ``u64 rng_state`` (the guest's splitmix64 generator) and ``u64
writes``.  The memory digest (``MemoryDigest``) is a sum of per-page hashes
(see its docstring), kept up to date over the dirty pages only.  No
processes or pipes here.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import struct
from array import array
from typing import Iterable, Optional, Sequence

from remus.stream.records import PAGE_SIZE

try:
    import numpy as np
except ImportError:  # dirty pages are then cleared and copied with Python loops
    np = None  # type: ignore[assignment,unused-ignore]

CTRL_SIZE = 4096
VCPU = struct.Struct("<QQQ")  # counter, rng_state, writes
_MAGIC = struct.Struct("<8s")
MAGIC = b"remusSIM"
VCPU_OFFSET = 8
LOG_COUNT = struct.Struct("<Q")
LOG_COUNT_OFFSET = 64
LOG_ENTRY = struct.Struct("<I")
PAGE_HASH_SIZE = 32
#: Pages copied per call into C by ``GuestMemory.snapshot`` (4 MiB: about a millisecond).
SNAPSHOT_CHUNK_PAGES = 1024


def _round_up(n: int, to: int) -> int:
    return n + (-n % to)


class GuestMemory:
    """A mapped guest memory file (the memfd is shared with the guest process)."""

    def __init__(self, pages: int, fd: Optional[int] = None) -> None:
        self.pages = pages
        self.dirty_offset = CTRL_SIZE
        self.log_offset = CTRL_SIZE + _round_up(pages, PAGE_SIZE)
        self.mem_offset = self.log_offset + _round_up(pages * LOG_ENTRY.size, PAGE_SIZE)
        self.size = self.mem_offset + pages * PAGE_SIZE
        if fd is None:
            fd = os.memfd_create("remus-sim-guest", os.MFD_CLOEXEC)
            os.ftruncate(fd, self.size)
            self.owner = True
        else:
            self.owner = False
        self.fd = fd
        self.map = mmap.mmap(fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        if self.owner:
            self.map[0:8] = MAGIC
        elif self.map[0:8] != MAGIC:
            raise ValueError("not a simulated guest memory file")

    # -- vCPU ------------------------------------------------------------------------
    def read_vcpu(self) -> tuple[int, int, int]:
        """(counter, rng_state, writes)."""
        counter, rng, writes = VCPU.unpack_from(self.map, VCPU_OFFSET)
        return counter, rng, writes

    def write_vcpu(self, counter: int, rng_state: int, writes: int) -> None:
        # Packed aside, then copied in one go: ``pack_into`` zeroes the fields before filling
        # them, so a reader in the other process could see a counter of 0 for a moment.
        self.map[VCPU_OFFSET : VCPU_OFFSET + VCPU.size] = VCPU.pack(counter, rng_state, writes)

    # -- pages -----------------------------------------------------------------------
    def page(self, pfn: int) -> bytes:
        off = self.mem_offset + pfn * PAGE_SIZE
        return self.map[off : off + PAGE_SIZE]

    def set_page(self, pfn: int, data: bytes) -> None:
        off = self.mem_offset + pfn * PAGE_SIZE
        self.map[off : off + PAGE_SIZE] = data

    def fill(self, data: bytes) -> None:
        """Overwrite all of guest memory (``len(data)`` must be the memory size)."""
        if len(data) != self.pages * PAGE_SIZE:
            raise ValueError("memory image has the wrong size")
        self.map[self.mem_offset : self.size] = data

    def write_at(self, offset: int, data: bytes) -> None:
        """Overwrite guest memory from byte ``offset`` on (for filling it in chunks)."""
        if offset < 0 or offset + len(data) > self.pages * PAGE_SIZE:
            raise ValueError("write beyond guest memory")
        self.map[self.mem_offset + offset : self.mem_offset + offset + len(data)] = data

    def memory_bytes(self) -> bytes:
        return self.map[self.mem_offset : self.size]

    def memory_digest(self) -> "MemoryDigest":
        """The digest of all of guest memory, read in place (O(memory))."""
        with memoryview(self.map) as whole, whole[self.mem_offset : self.size] as view:
            return MemoryDigest.of(view)

    # -- log-dirty ---------------------------------------------------------------------
    def mark_dirty(self, pfn: int) -> None:
        """Mark ``pfn`` dirty (the guest's side: call *before* writing the page)."""
        buf = self.map
        if not buf[self.dirty_offset + pfn]:
            buf[self.dirty_offset + pfn] = 1
            (count,) = LOG_COUNT.unpack_from(buf, LOG_COUNT_OFFSET)
            LOG_ENTRY.pack_into(buf, self.log_offset + count * LOG_ENTRY.size, pfn)
            # One aligned 8-byte store: a reader never sees half a count.
            buf[LOG_COUNT_OFFSET : LOG_COUNT_OFFSET + 8] = LOG_COUNT.pack(count + 1)

    def mark_all_dirty(self) -> None:
        """Every page dirty (before the first capture; costs O(pages) once)."""
        self.map[self.dirty_offset : self.dirty_offset + self.pages] = b"\x01" * self.pages
        log = array("I", range(self.pages))
        self.map[self.log_offset : self.log_offset + self.pages * 4] = log.tobytes()
        self.map[LOG_COUNT_OFFSET : LOG_COUNT_OFFSET + 8] = LOG_COUNT.pack(self.pages)

    def take_dirty(self) -> list[int]:
        """The dirty PFNs, in order, and clear them (log-dirty CLEAN); O(dirty pages)."""
        buf = self.map
        (count,) = LOG_COUNT.unpack_from(buf, LOG_COUNT_OFFSET)
        raw = buf[self.log_offset : self.log_offset + count * LOG_ENTRY.size]
        buf[LOG_COUNT_OFFSET : LOG_COUNT_OFFSET + 8] = LOG_COUNT.pack(0)
        if count == self.pages:
            buf[self.dirty_offset : self.dirty_offset + self.pages] = bytes(self.pages)
            return list(range(self.pages))
        if np is not None:
            pfns = np.sort(np.frombuffer(raw, dtype="<u4"))
            dirty_map = np.frombuffer(buf, dtype=np.uint8, count=self.pages, offset=self.dirty_offset)
            dirty_map[pfns] = 0
            del dirty_map  # (an array over the map would keep it from closing)
            result: list[int] = pfns.tolist()
            return result
        log = array("I")
        log.frombytes(raw)
        base = self.dirty_offset
        for pfn in log:
            buf[base + pfn] = 0
        return sorted(log)

    def snapshot(self, pfns: Sequence[int]) -> bytearray:
        """A copy of these pages (sorted PFNs), one after the other, in one buffer.

        Copied at most ``SNAPSHOT_CHUNK_PAGES`` pages per call into C, so that
        other threads (the heartbeats) run between chunks even when the copy
        is the whole memory.
        """
        out = bytearray(len(pfns) * PAGE_SIZE)
        if not pfns:
            return out
        if np is not None:
            memory = np.frombuffer(self.map, dtype=np.uint8, count=self.pages * PAGE_SIZE,
                                   offset=self.mem_offset).reshape(self.pages, PAGE_SIZE)
            target = np.frombuffer(out, dtype=np.uint8).reshape(len(pfns), PAGE_SIZE)
            index = np.array(pfns, dtype=np.intp)
            if int(index.min()) < 0 or int(index.max()) >= self.pages:
                raise IndexError(f"page number out of range 0..{self.pages - 1}")
            for start in range(0, len(pfns), SNAPSHOT_CHUNK_PAGES):
                end = min(start + SNAPSHOT_CHUNK_PAGES, len(pfns))
                # mode="clip" (the range is checked above): with out= and the default mode,
                # numpy gathers through a temporary, three times slower.
                np.take(memory, index[start:end], axis=0, out=target[start:end], mode="clip")
            del memory, target  # (arrays over the map would keep it from closing)
            return out
        with memoryview(self.map) as source:
            index = 0
            while index < len(pfns):  # runs of adjacent pages in one copy each
                end = index + 1
                while (end < len(pfns) and end - index < SNAPSHOT_CHUNK_PAGES
                       and pfns[end] == pfns[end - 1] + 1):
                    end += 1
                src = self.mem_offset + pfns[index] * PAGE_SIZE
                out[index * PAGE_SIZE : end * PAGE_SIZE] = source[src : src + (end - index) * PAGE_SIZE]
                index = end
        return out

    def close(self) -> None:
        self.map.close()
        if self.owner:
            os.close(self.fd)


_ZERO_PAGE = bytes(PAGE_SIZE)
_ZERO_TERM = bytes(PAGE_HASH_SIZE)
_DIGEST_MODULUS = 1 << (8 * PAGE_HASH_SIZE)


def page_element(pfn: int, data: "bytes | memoryview") -> bytes:
    """One page's term of the memory digest: SHA-256 of (PFN, page), or zero for a zero page
    (so a fresh guest's table is all zeros and costs no hashing).  SHA-256, not BLAKE2b: with
    the CPU's SHA extensions (OpenSSL uses them) it is about 3x faster on a page."""
    if data == _ZERO_PAGE:
        return _ZERO_TERM
    term = hashlib.sha256(pfn.to_bytes(8, "little"))
    term.update(data)
    return term.digest()


class MemoryDigest:
    """Digest of a whole guest memory, updated over the pages that changed.

    The digest is the sum, modulo 2**256, of one term per page
    (``page_element``: a hash of the page's PFN and contents), then hashed
    once more with the page count.  A change of any byte, or two pages
    swapping places, changes it; replacing one page's term costs one page
    hash, so updating it after a checkpoint costs only the dirty pages and
    ``digest()`` costs nothing that grows with memory.  The table of terms
    (32 bytes a page, 1/128 of guest memory) is what makes the update possible.
    It proves replication, not authenticity: the link is authenticated elsewhere.
    """

    def __init__(self, pages: int) -> None:
        self.pages = pages
        self.table = bytearray(pages * PAGE_HASH_SIZE)  # every page zero: every term zero
        self._sum = 0

    @classmethod
    def of(cls, memory: "bytes | bytearray | memoryview | mmap.mmap") -> "MemoryDigest":
        """The digest of a whole memory image (O(memory): for the first checkpoint and failover)."""
        pages = len(memory) // PAGE_SIZE
        digest = cls(pages)
        with memoryview(memory) as view:
            digest.update((pfn, view[pfn * PAGE_SIZE : (pfn + 1) * PAGE_SIZE]) for pfn in range(pages)
                          if view[pfn * PAGE_SIZE : (pfn + 1) * PAGE_SIZE] != _ZERO_PAGE)
        return digest

    def update(self, pages: Iterable[tuple[int, "bytes | memoryview"]]) -> None:
        """Replace the terms of these pages by those of their new contents."""
        table = self.table
        total = self._sum
        for pfn, data in pages:
            off = pfn * PAGE_HASH_SIZE
            new = page_element(pfn, data)
            total += int.from_bytes(new, "little") - int.from_bytes(table[off : off + PAGE_HASH_SIZE], "little")
            table[off : off + PAGE_HASH_SIZE] = new
        self._sum = total % _DIGEST_MODULUS

    def digest(self) -> bytes:
        """32 bytes; O(1)."""
        return hashlib.blake2b(self._sum.to_bytes(PAGE_HASH_SIZE, "little")
                               + self.pages.to_bytes(8, "little"), digest_size=32).digest()


# -- the guest's pseudo-random generator (splitmix64), shared so it can be replicated -------
_MASK64 = (1 << 64) - 1


def splitmix64(state: int) -> tuple[int, int]:
    """(new_state, output) of one splitmix64 step."""
    state = (state + 0x9E3779B97F4A7C15) & _MASK64
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return state, z ^ (z >> 31)

"""The simulated guest's memory: one shared file mapping, laid out like a tiny machine.

Layout of the memfd both processes map::

    [0, 4096)                    control block (vCPU state, see ``VCPU``)
    [4096, 4096 + B)             log-dirty map: one byte per page, 1 = dirty
    [4096 + B, ... + pages*4K)   guest pages

(B is the page count rounded up to 4 KiB.)  The guest process sets a page's
dirty byte *before* it writes the page, and only ever stops between two whole
writes, so a suspended guest's memory and dirty map are always consistent;
the primary clears the map at each capture, as Xen's log-dirty CLEAN does.

The vCPU state is ``u64 counter`` (bumped by every guest step, never moves
back), ``u64 rng_state`` (the guest's splitmix64 generator) and ``u64
writes``.  The memory digest (``MemoryDigest``) is BLAKE2b over the
per-page BLAKE2b-128 hashes, kept up to date incrementally by whoever copies
dirty pages.  No processes or pipes here.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import re
import struct
from typing import Iterable, Optional

from remus.stream.records import PAGE_SIZE

CTRL_SIZE = 4096
VCPU = struct.Struct("<QQQ")  # counter, rng_state, writes
_MAGIC = struct.Struct("<8s")
MAGIC = b"remusSIM"
VCPU_OFFSET = 8
_DIRTY_RE = re.compile(b"[^\x00]")
PAGE_HASH_SIZE = 16


def _round_up(n: int, to: int) -> int:
    return n + (-n % to)


class GuestMemory:
    """A mapped guest memory file (the memfd is shared with the guest process)."""

    def __init__(self, pages: int, fd: Optional[int] = None) -> None:
        self.pages = pages
        self.dirty_offset = CTRL_SIZE
        self.mem_offset = CTRL_SIZE + _round_up(pages, PAGE_SIZE)
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

    def memory_bytes(self) -> bytes:
        return self.map[self.mem_offset : self.size]

    # -- log-dirty ---------------------------------------------------------------------
    def mark_all_dirty(self) -> None:
        self.map[self.dirty_offset : self.dirty_offset + self.pages] = b"\x01" * self.pages

    def take_dirty(self) -> list[int]:
        """The dirty PFNs, in order, and clear the map (log-dirty CLEAN)."""
        end = self.dirty_offset + self.pages
        snapshot = self.map[self.dirty_offset : end]
        self.map[self.dirty_offset : end] = bytes(self.pages)
        return [m.start() for m in _DIRTY_RE.finditer(snapshot)]

    def close(self) -> None:
        self.map.close()
        if self.owner:
            os.close(self.fd)


class MemoryDigest:
    """Digest of a whole guest memory, updated page by page.

    ``digest()`` is BLAKE2b-256 of the concatenated BLAKE2b-128 hashes of every
    page in PFN order, so a change of any byte changes it, and updating it after
    a checkpoint costs only the dirty pages.
    """

    def __init__(self, pages: int) -> None:
        self.table = bytearray(pages * PAGE_HASH_SIZE)

    @classmethod
    def of(cls, memory: bytes) -> "MemoryDigest":
        pages = len(memory) // PAGE_SIZE
        digest = cls(pages)
        view = memoryview(memory)
        digest.update((pfn, view[pfn * PAGE_SIZE : (pfn + 1) * PAGE_SIZE]) for pfn in range(pages))
        return digest

    def update(self, pages: Iterable[tuple[int, "bytes | memoryview"]]) -> None:
        table = self.table
        for pfn, data in pages:
            off = pfn * PAGE_HASH_SIZE
            table[off : off + PAGE_HASH_SIZE] = hashlib.blake2b(data, digest_size=PAGE_HASH_SIZE).digest()

    def digest(self) -> bytes:
        return hashlib.blake2b(self.table, digest_size=32).digest()


# -- the guest's pseudo-random generator (splitmix64), shared so it can be replicated -------
_MASK64 = (1 << 64) - 1


def splitmix64(state: int) -> tuple[int, int]:
    """(new_state, output) of one splitmix64 step."""
    state = (state + 0x9E3779B97F4A7C15) & _MASK64
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return state, z ^ (z >> 31)

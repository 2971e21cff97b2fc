"""Page streams for the codec benchmarks, captured from the simulated guest's own write model.

``capture(pattern, ...)`` boots a guest memory in this process (no guest
process, no clock), lets the guest model (``remus.sim.guest.Guest``) write
``dirty_per_checkpoint`` pages, takes the dirty pages as a capture would,
and repeats: the same pages, in the same order, that the engine would send
at that dirty rate, for the ``random`` or the ``words`` pattern.  Seeded:
the same arguments give the same stream.  Never asserts, never times.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from remus.sim.domain import initial_chunks
from remus.sim.guest import Guest
from remus.sim.memory import LOG_COUNT, LOG_COUNT_OFFSET, GuestMemory
from remus.sim.spec import SimSpec
from remus.stream.records import MAX_BATCH_PAGES, PAGE_SIZE, PageData


@dataclass
class Stream:
    """The first checkpoint (all of memory) and the following ones, as the engine sends them."""

    pattern: str
    pages: int
    first: list[PageData]
    checkpoints: list[list[PageData]]

    @property
    def dirty_pages(self) -> int:
        return sum(len(r.pfns) for c in self.checkpoints for r in c)


def _records(mem: GuestMemory, pfns: list[int]) -> list[PageData]:
    out = []
    for start in range(0, len(pfns), MAX_BATCH_PAGES):
        chunk = pfns[start : start + MAX_BATCH_PAGES]
        out.append(PageData(tuple(chunk), tuple(mem.page(p) for p in chunk)))
    return out


def capture(pattern: str, memory: int = 64 << 20, checkpoints: int = 40,
            dirty_per_checkpoint: int = 1000, locality: float = 0.9, seed: int = 1) -> Stream:
    """A seeded stream of ``checkpoints`` captures after the first (see the module docstring)."""
    spec = SimSpec("bench", memory=memory, seed=seed, pattern=pattern, locality=locality)
    mem = GuestMemory(spec.pages)
    try:
        for offset, data in initial_chunks(spec):
            mem.write_at(offset, data)
        mem.write_vcpu(0, seed, 0)
        mem.mark_all_dirty()
        _r, w = os.pipe()
        guest = Guest(mem, bell=-1, ack=-1, net=w, dirty_rate=0, locality=locality,
                      packet_rate=0, pattern=pattern)
        first = _records(mem, mem.take_dirty())
        rounds = []
        for _ in range(checkpoints):
            # Writes land on fewer distinct pages than writes: write until enough pages are dirty.
            while True:
                guest.write_pages(max(1, dirty_per_checkpoint // 4))
                if LOG_COUNT.unpack_from(mem.map, LOG_COUNT_OFFSET)[0] >= dirty_per_checkpoint:
                    break
            rounds.append(_records(mem, mem.take_dirty()))
        os.close(_r)
        os.close(w)
        return Stream(pattern, spec.pages, first, rounds)
    finally:
        mem.close()


def raw_bytes(records: list[PageData]) -> int:
    return sum(len(r.pages) * PAGE_SIZE for r in records)

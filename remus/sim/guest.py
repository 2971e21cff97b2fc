"""The simulated guest's "vCPU": a separate process that writes memory and sends packets.

Started by ``remus.sim.domain`` as ``python -m remus.sim.guest FD_MEM FD_BELL
FD_ACK FD_NET PAGES DIRTY_RATE LOCALITY PACKET_RATE PATTERN``.  It runs until told to
quit or until its doorbell pipe reaches EOF (its host process is gone, as a
guest dies with its host).

Each *step* is one whole instruction of this machine: either a page write
(mark the page dirty, then change it: with pattern ``random`` overwrite 64
bytes of it with pseudo-random data; with pattern ``words`` change one to
four aligned words, each either a 64-bit counter incremented in place, a
64-bit kernel-style pointer to another page, or a small 32-bit integer) or a
packet (the current counter, as a decimal line, written to the NIC pipe).  The counter
goes up by one per step.  The doorbell carries one-byte commands, read only
between steps:

* ``s``: suspend.  The guest answers ``S`` on the ack pipe and then blocks
  reading the doorbell: it executes nothing until ``r`` (answered ``R``) or
  ``q``.
* ``q``: quit.

Pace: ``dirty_rate`` writes and ``packet_rate`` packets per second of running
time (time suspended does not count), with ``locality`` of the writes landing
in the first 1/16 of memory.  Given the same seed and the same sequence of
suspends the guest computes exactly the same memory.
"""

from __future__ import annotations

import os
import select
import signal
import struct
import sys
import time

from remus.sim.memory import GuestMemory, splitmix64
from remus.stream.records import PAGE_SIZE

WRITE_SIZE = 64
_SLOTS = PAGE_SIZE // WRITE_SIZE
_MAX_BURST_S = 0.05  # after a long pause, catch up at most this much work at once
_CHUNK = struct.Struct("<8Q")
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_STEPS_PER_LOOK = 256
_WORD_SLOTS = PAGE_SIZE // 8
#: The direct map of a 64-bit Linux kernel: where the ``words`` pattern's pointers point.
_POINTER_BASE = 0xFFFF888000000000


class Guest:
    """The guest loop; holds no state outside the shared memory's vCPU block."""

    def __init__(
        self,
        mem: GuestMemory,
        bell: int,
        ack: int,
        net: int,
        dirty_rate: float,
        locality: float,
        packet_rate: float,
        pattern: str = "random",
    ) -> None:
        self.mem = mem
        self.pattern = pattern
        self.bell, self.ack, self.net = bell, ack, net
        self.dirty_rate = dirty_rate
        self.locality_threshold = int(locality * (1 << 64))
        self.packet_rate = packet_rate
        self.hot_pages = max(1, mem.pages // 16)

    def run(self) -> int:
        """Step at the configured pace until told to quit; the exit status."""
        write_tokens = 0.0
        packet_tokens = 0.0
        last = time.monotonic()
        while True:
            rate = self.dirty_rate + self.packet_rate
            due = 1.0 if rate == 0 else max(0.0, (1.0 - max(write_tokens, packet_tokens)) / rate)
            readable, _, _ = select.select([self.bell], [], [], min(due, 0.5))
            if readable:
                command = os.read(self.bell, 1)
                if command in (b"", b"q"):
                    return 0
                if command == b"s":
                    os.write(self.ack, b"S")
                    if not self._wait_resume():
                        return 0
                    last = time.monotonic()
                continue
            now = time.monotonic()
            elapsed = min(now - last, _MAX_BURST_S)
            last = now
            write_tokens += elapsed * self.dirty_rate
            packet_tokens += elapsed * self.packet_rate
            # Look at the doorbell at least every _STEPS_PER_LOOK steps.
            packets_now = min(int(packet_tokens), _STEPS_PER_LOOK)
            writes_now = min(int(write_tokens), _STEPS_PER_LOOK)
            write_tokens -= writes_now
            packet_tokens -= packets_now
            self.write_pages(writes_now)
            self.send_packets(packets_now)

    def write_pages(self, n: int) -> None:
        """Execute ``n`` page writes: mark the page dirty, then change it (see the module docstring)."""
        mem = self.mem
        buf = mem.map
        words = self.pattern == "words"
        counter, rng, writes = mem.read_vcpu()
        for _ in range(n):
            rng, r = splitmix64(rng)
            pfn = r % self.hot_pages if r < self.locality_threshold else r % mem.pages
            counter += 1
            writes += 1
            mem.mark_dirty(pfn)
            page = mem.mem_offset + pfn * PAGE_SIZE
            if words:
                self._change_words(page, r, counter)
            else:
                off = page + ((r >> 20) % _SLOTS) * WRITE_SIZE
                word = r ^ counter
                buf[off : off + WRITE_SIZE] = _CHUNK.pack(
                    word, ~word & 0xFFFFFFFFFFFFFFFF, counter, r, word >> 1, r >> 3, writes, pfn
                )
            mem.write_vcpu(counter, rng, writes)

    def _change_words(self, page: int, r: int, counter: int) -> None:
        """One to four aligned words of the page at byte ``page``, chosen by the bits of ``r``."""
        buf = self.mem.map
        for i in range(1 + (r & 3)):
            bits = r >> (2 + 15 * i)
            off = page + (bits % _WORD_SLOTS) * 8
            kind = (bits >> 9) & 3
            if kind <= 1:  # a counter: incremented where it is
                (value,) = _U64.unpack_from(buf, off)
                _U64.pack_into(buf, off, (value + 1) & 0xFFFFFFFFFFFFFFFF)
            elif kind == 2:  # a pointer into the direct map, to a 64-byte aligned object
                target = (counter * 0x9E3779B1 + bits) % self.mem.pages
                _U64.pack_into(buf, off, _POINTER_BASE + target * PAGE_SIZE + (bits & 0xFC0))
            else:  # a small 32-bit integer (a length, an index, a flag set)
                _U32.pack_into(buf, off, (bits >> 11) & 0xFFF)

    def send_packets(self, n: int) -> None:
        """Execute ``n`` packet sends, each carrying the counter at its emission."""
        mem = self.mem
        counter, rng, writes = mem.read_vcpu()
        for _ in range(n):
            counter += 1
            mem.write_vcpu(counter, rng, writes)
            os.write(self.net, b"%d\n" % counter)

    def _wait_resume(self) -> bool:
        while True:
            command = os.read(self.bell, 1)
            if command == b"r":
                os.write(self.ack, b"R")
                return True
            if command in (b"", b"q"):
                return False


def main(argv: list[str]) -> int:
    # Ctrl-C on the terminal is for remus, which resumes and then stops this guest itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    fd_mem, bell, ack, net, pages = (int(a) for a in argv[:5])
    dirty_rate, locality, packet_rate = float(argv[5]), float(argv[6]), float(argv[7])
    pattern = argv[8] if len(argv) > 8 else "random"
    mem = GuestMemory(pages, fd=fd_mem)
    try:
        return Guest(mem, bell, ack, net, dirty_rate, locality, packet_rate, pattern).run()
    except BrokenPipeError:
        return 0  # the host went away while we were talking to it


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

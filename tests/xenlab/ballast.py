"""Lab helper (dom0, an experiment): a process shaped like remus's primary, to die beside `xl remus`.

    python3 ballast.py READY PRIVATE_MIB SHARED_MIB

Touches PRIVATE_MIB of private anonymous memory (one write per page) and SHARED_MIB of a shared
anonymous mapping, whose page-table entries it then drops (``MADV_DONTNEED``: the pages stay in
the mapping's memory, as the primary's compression cache does after each trim), writes READY,
and waits to be killed.  The failover job (``REMUS_LAB_BALLAST``) freezes it and SIGKILLs it at
the same moment as `xl remus`'s primary, so that `xl remus`'s failover runs beside the same
teardown as remus's does on one dom0: whether that teardown is what makes remus's slower.
Never touches another process, a file other than READY, or the network.
"""

from __future__ import annotations

import mmap
import signal
import sys

MIB = 1 << 20


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: ballast.py READY PRIVATE_MIB SHARED_MIB", file=sys.stderr)
        return 2
    ready, private_mib, shared_mib = argv[0], int(argv[1]), int(argv[2])
    private = bytearray(private_mib * MIB)
    private[:: mmap.PAGESIZE] = b"\1" * len(range(0, len(private), mmap.PAGESIZE))
    shared = mmap.mmap(-1, max(shared_mib, 1) * MIB, flags=mmap.MAP_SHARED)
    for offset in range(0, len(shared), mmap.PAGESIZE):
        shared[offset] = 1
    shared.madvise(mmap.MADV_DONTNEED)
    with open(ready, "w", encoding="ascii") as out:
        out.write("ready\n")
    while True:
        signal.pause()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

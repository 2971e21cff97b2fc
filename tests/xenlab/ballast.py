"""Lab helper (dom0, an experiment): a process shaped like remus's primary, to die beside `xl remus`.

    python3 ballast.py READY PRIVATE_MIB SHARED_MIB [DOMID MFN]

Touches PRIVATE_MIB of private anonymous memory (one write per page) and SHARED_MIB of a shared
anonymous mapping, whose page-table entries it then drops (``MADV_DONTNEED``: the pages stay in
the mapping's memory, as the primary's compression cache does after each trim).  Given DOMID and
MFN, it maps that page of the domain read-only (libxenforeignmemory), as a saving primary holds
pages of its domain through libxc: the domain, once destroyed, then stays dying until this
process's teardown lets go of it.  It writes to READY what it holds, and waits to be killed.  The
failover job (``REMUS_LAB_BALLAST``) freezes it and SIGKILLs it at the same moment as `xl remus`'s
primary, so that `xl remus`'s failover runs beside the same teardown as remus's does on one dom0:
whether that teardown is what makes remus's slower.  Never touches another process, a file other
than READY, or the network; never writes to the domain's page.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import signal
import sys

MIB = 1 << 20


def hold_page(domid: int, mfn: int) -> None:
    """Map one page of ``domid`` read-only and never unmap it (the process's exit does)."""
    lib = ctypes.CDLL("libxenforeignmemory.so.1", use_errno=True)
    lib.xenforeignmemory_open.restype = ctypes.c_void_p
    lib.xenforeignmemory_map.restype = ctypes.c_void_p
    lib.xenforeignmemory_map.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_size_t,
                                         ctypes.POINTER(ctypes.c_ulong), ctypes.POINTER(ctypes.c_int)]
    handle = lib.xenforeignmemory_open(None, 0)
    if not handle:
        raise OSError(ctypes.get_errno(), "xenforeignmemory_open failed")
    frames, errors = (ctypes.c_ulong * 1)(mfn), (ctypes.c_int * 1)()
    if not lib.xenforeignmemory_map(handle, domid, mmap.PROT_READ, 1, frames, errors) or errors[0]:
        raise OSError(ctypes.get_errno() or -errors[0], f"mapping page {mfn:#x} of domain {domid} failed")


def touch(memory: "bytearray | mmap.mmap") -> None:
    """Write one byte of every page of ``memory``, so that each page is really allocated."""
    for offset in range(0, len(memory), mmap.PAGESIZE):
        memory[offset] = 1


def main(argv: list[str]) -> int:
    if len(argv) not in (3, 5):
        print("usage: ballast.py READY PRIVATE_MIB SHARED_MIB [DOMID MFN]", file=sys.stderr)
        return 2
    ready, private_mib, shared_mib = argv[0], int(argv[1]), int(argv[2])
    held = "no page of a domain held"
    if len(argv) == 5:
        try:
            hold_page(int(argv[3]), int(argv[4]))
            held = f"holding page {int(argv[4]):#x} of domain {argv[3]}"
        except OSError as exc:
            held = f"no page held ({exc})"
    private = bytearray(private_mib * MIB)
    touch(private)
    shared = mmap.mmap(-1, max(shared_mib, 1) * MIB, flags=mmap.MAP_SHARED)
    touch(shared)
    shared.madvise(mmap.MADV_DONTNEED)
    with open(ready + ".tmp", "w", encoding="ascii") as out:  # READY appears whole, never half-written
        out.write(f"{held}\n")
    os.replace(ready + ".tmp", ready)
    while True:
        signal.pause()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

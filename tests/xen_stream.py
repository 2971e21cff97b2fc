"""A synthetic Remus stream of a Xen PV guest, shaped like ``xc_domain_save(XC_STREAM_REMUS)``'s.

Checkpoint 1 is what Xen 4.17 writes (xg_sr_save.c ``save()``): the headers, the
static records (X86_PV_INFO, CPUID and MSR policy, STATIC_DATA_END), the
start-of-stream X86_PV_P2M_FRAMES, two live rounds of PAGE_DATA (the second
re-sending pages the guest wrote meanwhile), then the end-of-checkpoint records
(X86_TSC_INFO, SHARED_INFO, X86_PV_VCPU_*) and CHECKPOINT.  Later checkpoints
are dirty PAGE_DATA + the same end-of-checkpoint records + CHECKPOINT.  Record
bodies are tagged with their checkpoint so tests can tell versions apart;
``memory`` is the guest's pages as of the last checkpoint built.
"""

from __future__ import annotations

import json
import random
import struct
from typing import Optional

from remus.stream.records import (
    DHDR_TYPE_X86_PV,
    PAGE_SIZE,
    XEN_DOMCTL_PFINFO_XTAB,
    Checkpoint,
    DiskWrite,
    DomainHeader,
    PageData,
    Record,
    XenRecord,
    XenRecType,
)
from remus.stream.sender import CheckpointEncoder, session_header

PAGES = 64
#: PAGE_DATA type words (XEN_DOMCTL_PFINFO_* shifted up by 32): an L1 page table, a hole.
L1TAB = (0x1 << 28) << 32
XTAB = XEN_DOMCTL_PFINFO_XTAB << 32
PAGE_TABLE_PFN = 3
HOLE_PFN = 7

STATIC_TYPES = [XenRecType.X86_PV_INFO, XenRecType.X86_CPUID_POLICY, XenRecType.X86_MSR_POLICY,
                XenRecType.STATIC_DATA_END, XenRecType.X86_PV_P2M_FRAMES]
STATE_TYPES = [XenRecType.X86_TSC_INFO, XenRecType.SHARED_INFO, XenRecType.X86_PV_VCPU_BASIC,
               XenRecType.X86_PV_VCPU_EXTENDED]
CONFIG = json.dumps({"c_info": {"type": "pv", "name": "domu", "domid": 4},
                     "b_info": {"max_memkb": PAGES * 4, "type.pv": {"kernel": "/boot/vmlinuz"}}})


def tagged(rtype: int, seq: int) -> XenRecord:
    return XenRecord(rtype, struct.pack("<II", rtype, seq) + b"body" * (rtype % 3))


class SyntheticXenGuest:
    """Builds the checkpoints of one guest, in order (see the module docstring)."""

    def __init__(self, seed: int = 3) -> None:
        self.rng = random.Random(seed)
        self.seq = 0
        #: pfn -> (PAGE_DATA word, contents or None), as of the last checkpoint built
        self.memory: dict[int, tuple[int, object]] = {}

    def _word(self, pfn: int) -> int:
        if pfn == HOLE_PFN:
            return XTAB | pfn
        return (L1TAB | pfn) if pfn == PAGE_TABLE_PFN else pfn

    def _pages(self, pfns: list[int]) -> PageData:
        words = tuple(self._word(p) for p in pfns)
        datas = []
        for pfn in pfns:
            data = None if pfn == HOLE_PFN else self.rng.randbytes(PAGE_SIZE)
            self.memory[pfn] = (self._word(pfn), data)
            if data is not None:
                datas.append(data)
        return PageData(words, tuple(datas))

    def checkpoint(self) -> list[Record]:
        self.seq += 1
        seq = self.seq
        records: list[Record] = []
        if seq == 1:
            records.append(DomainHeader(DHDR_TYPE_X86_PV, 4, 17))
            records += [tagged(t, seq) for t in STATIC_TYPES]
            records.append(self._pages(list(range(PAGES))))
            records.append(self._pages(sorted(self.rng.sample(range(PAGES), 9))))  # second live round
        else:
            records.append(self._pages(sorted(self.rng.sample(range(PAGES), 5))))
        records += [tagged(t, seq) for t in STATE_TYPES]
        records.append(Checkpoint())
        return records


def xen_session(checkpoints: int, config: object = CONFIG, compression: bool = True,
                disk: Optional[str] = None) -> tuple[bytes, SyntheticXenGuest]:
    """A primary's whole stream (session opening + ``checkpoints`` committed checkpoints).

    With ``disk`` (a path) the session replicates a 64 KiB disk there, and checkpoint n
    writes 512 bytes of n at offset 512 * n.
    """
    guest = SyntheticXenGuest()
    info: dict[str, object] = {"domain": "domu", "kind": "xen", "max_pages": PAGES, "domid": 4}
    if config is not None:
        info["libxl_config"] = config
    if disk is not None:
        info["disks"] = [{"path": disk, "size": 65536}]
    stream = bytearray(session_header(info))
    encoder = CheckpointEncoder(compression, cache_pages=16)
    for _ in range(checkpoints):
        records = guest.checkpoint()
        if disk is not None:
            records = [*records, DiskWrite(0, 512 * guest.seq, bytes([guest.seq]) * 512)]
        for chunk in encoder.encode(guest.seq, records, captured_unix=1_700_000_000.0 + guest.seq).chunks:
            stream += chunk
    return bytes(stream), guest

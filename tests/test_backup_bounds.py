"""What a primary with the key can make the backup hold: bounded by the guest size it declared.

The stated bound (docs/security.md): the committed image holds at most the declared memory,
and the one checkpoint being received at most the declared memory again, plus a constant for
bookkeeping; pages beyond the declared size and sessions larger than ``--max-memory`` are refused.
"""

from __future__ import annotations

import tracemalloc

import pytest

from remus.backup.session import BackupSession, Refused
from remus.errors import RemoteProtocolError
from remus.sim.domain import SIM_DHDR_TYPE
from remus.sim.spec import SimSpec
from remus.stream.codec import encode_record
from remus.stream.records import PAGE_SIZE, DomainHeader, PageData
from remus.stream.sender import session_header

MEMORY = 16 << 20
PAGES = MEMORY // PAGE_SIZE
RECORD_PAGES = 256


def opened() -> BackupSession:
    session = BackupSession(max_memory=64 << 20)
    spec = SimSpec("b", memory=MEMORY)
    session.receive_data(session_header({"domain": "b", "kind": "sim", "sim": spec.to_dict()}))
    session.receive_data(encode_record(DomainHeader(SIM_DHDR_TYPE, 0, 0)))
    return session


def distinct_pages(start: int, count: int) -> bytes:
    pfns = tuple(range(start, start + count))
    pages = tuple(pfn.to_bytes(8, "little") * (PAGE_SIZE // 8) for pfn in pfns)
    return encode_record(PageData(pfns, pages))


def test_pages_without_a_commit_are_held_within_the_declared_size() -> None:
    session = opened()
    tracemalloc.start()
    try:
        # Three times the guest's memory in distinct-looking pages, never committed.
        for round_ in range(3):
            for start in range(0, PAGES, RECORD_PAGES):
                session.receive_data(distinct_pages(start, RECORD_PAGES))
        _now, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # The staged pages, plus the record being decoded (its bytes, its body, its pages) and bookkeeping.
    bound = MEMORY + 4 * RECORD_PAGES * PAGE_SIZE + (2 << 20)
    assert peak <= bound, f"peak {peak / 2**20:.1f} MiB for a {MEMORY >> 20} MiB guest"


def test_a_page_beyond_the_declared_memory_is_refused() -> None:
    session = opened()
    with pytest.raises(RemoteProtocolError, match="beyond the domain's 4096 pages"):
        session.receive_data(distinct_pages(PAGES, 1))


@pytest.mark.parametrize("declared", [1 << 30, 16 << 30])
def test_a_session_larger_than_max_memory_is_refused_before_any_page(declared: int) -> None:
    session = BackupSession(max_memory=256 << 20)
    spec = {"name": "huge", "memory": declared}
    outputs = session.receive_data(session_header({"domain": "huge", "kind": "sim", "sim": spec}))
    assert any(isinstance(o, Refused) and "see remus-receiver --max-memory" in o.reason for o in outputs)


def test_a_xen_session_is_bounded_by_the_maximum_memory_remus_sends() -> None:
    import json

    from remus.backup.activation import memory_of, pfn_bound

    info = {"domain": "domu", "kind": "xen", "max_memkb": 128 * 1024,
            "libxl_config": json.dumps({"c_info": {"name": "domu"}})}
    assert memory_of(info) == 128 << 20
    assert pfn_bound(info) == 16 << 20  # the guest's kernel sizes its pfn space (ballooning)
    session = BackupSession(max_memory=256 << 20)
    outputs = session.receive_data(session_header(info))
    assert not any(isinstance(o, Refused) for o in outputs), outputs
    too_big = BackupSession(max_memory=64 << 20)
    outputs = too_big.receive_data(session_header(info))
    assert any(isinstance(o, Refused) and "128M" in o.reason for o in outputs)

"""The xm-era word-RLE model used as the codec benchmark's baseline encodes what Xen 4.4 did."""

from __future__ import annotations

import random

import pytest

from tests.bench.wordrle import CACHE_PAGES, CWordRle, PyWordRle, c_codec, decode

PAGE = 4096


def test_hand_derived_bytes() -> None:
    codec = PyWordRle()
    page = bytes(range(256)) * 16
    assert codec.encode(7, page) == b"\x80" + page  # FULL_PAGE on a miss
    assert codec.encode(7, page) == b"\x00"  # EMPTY_PAGE: nothing changed
    changed = b"ABCD" + page[4:]
    # RUN of 1 word (header 0x01, the new word), then 1023 unchanged words:
    # eight SKIP runs of 127 (0x80|127 = 0xff) and one of 7 (0x87).
    assert codec.encode(7, changed) == b"\x01ABCD" + b"\xff" * 8 + b"\x87"
    last = changed[:-4] + b"WXYZ"
    # 1023 unchanged words then one changed: 8 x SKIP 127, SKIP 7, RUN 1.
    assert codec.encode(7, last) == b"\xff" * 8 + b"\x87" + b"\x01WXYZ"
    whole = bytes(255 - b for b in last)
    encoded = codec.encode(7, whole)  # every word changed: 8 runs of 127 and one of 8, 4105 bytes
    assert len(encoded) == 4096 + 9 and encoded[0] == 127 and encoded[-33] == 8


def test_round_trip_and_lru_eviction() -> None:
    rng = random.Random(5)
    codec = PyWordRle(cache_pages=4)
    receiver = {pfn: bytearray(PAGE) for pfn in range(10)}
    current = {pfn: bytes(PAGE) for pfn in range(10)}
    for _ in range(300):
        pfn = rng.randrange(10)
        page = bytearray(current[pfn])
        for _ in range(rng.randrange(0, 5)):
            off = rng.randrange(0, PAGE, 4)
            page[off : off + 4] = rng.randbytes(4)
        current[pfn] = bytes(page)
        encoded = codec.encode(pfn, current[pfn])
        assert decode(encoded, 0, receiver[pfn]) == len(encoded)
        assert receiver[pfn] == current[pfn]
    assert len(codec.cache) == 4 and CACHE_PAGES == 8192


def test_the_c_version_writes_the_same_bytes_when_a_compiler_is_there() -> None:
    built = c_codec()
    if built is None:
        pytest.skip("no C compiler: the benchmark says so and measures the Python model only")
    rng = random.Random(9)
    py, c = PyWordRle(cache_pages=3), CWordRle(*built, cache_pages=3)
    for _ in range(20):
        pfns = [rng.randrange(6) for _ in range(5)]
        pfns = list(dict.fromkeys(pfns))  # one batch holds a PFN once, as a capture does
        pages = [bytes([rng.choice([0, 1, 2])]) * PAGE if rng.random() < 0.5 else rng.randbytes(PAGE)
                 for _ in pfns]
        expected = b"".join(py.encode(p, d) for p, d in zip(pfns, pages))
        assert c.encode_batch(pfns, b"".join(pages)) == expected

"""Checkpoint compression round-trips exactly, and --no-compression sends raw pages."""

from __future__ import annotations

from typing import Optional

from hypothesis import given, settings
from hypothesis import strategies as st

from remus.stream.codec import StreamDecoder
from remus.stream.compression import PageCache, PageCompressor, PageDecompressor, xor_pages
from remus.stream.records import (
    MAX_BATCH_PAGES,
    PAGE_SIZE,
    Checkpoint,
    PageBatch,
    PageData,
    PageKind,
    StreamHeader,
)
from remus.stream.sender import CheckpointEncoder

XTAB = 0xF << 60


def page_of(seed: int, edits: list[tuple[int, int]]) -> bytes:
    page = bytearray((seed * 7 + i) % 251 for i in range(PAGE_SIZE)) if seed else bytearray(PAGE_SIZE)
    for offset, value in edits:
        page[offset % PAGE_SIZE] = value
    return bytes(page)


# A checkpoint: a list of (pfn, seed, edits) entries; seed -1 means an XTAB (no data) entry.
entries = st.lists(
    st.tuples(st.integers(0, 40), st.integers(-1, 5), st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 255)),
                                                               max_size=4)),
    min_size=1, max_size=60,
)


def to_records(checkpoint: list[tuple[int, int, list[tuple[int, int]]]]) -> list[PageData]:
    words, pages = [], []
    for pfn, seed, edits in checkpoint:
        if seed < 0:
            words.append(XTAB | pfn)
        else:
            words.append(pfn)
            pages.append(page_of(seed, edits))
    return [PageData(tuple(words), tuple(pages))]


@settings(max_examples=150, deadline=None)
@given(st.lists(entries, min_size=1, max_size=5), st.integers(0, 30))
def test_receiver_reconstructs_exactly_what_was_sent(checkpoints: list, cache_pages: int) -> None:
    compressor = PageCompressor(cache_pages=cache_pages)
    decompressor = PageDecompressor()
    receiver: dict[int, bytes] = {}
    for checkpoint in checkpoints:
        records = to_records(checkpoint)
        sent = [(w, p) for r in records for w, p in zip(r.pfns, _data(r))]
        got: list[tuple[int, Optional[bytes]]] = []
        staged: dict[int, bytes] = {}
        for batch in compressor.compress(records):
            # what the receiver sees went through the wire format
            batch = PageBatch.decode_body(batch.encode_body())

            def lookup(pfn: int) -> Optional[bytes]:
                return staged.get(pfn, receiver.get(pfn))

            for word, page in decompressor.decompress(batch, lookup):
                got.append((word, page))
                if page is not None:
                    staged[word & ((1 << 52) - 1)] = page
        assert got == sent
        receiver.update(staged)


def _data(record: PageData) -> list[Optional[bytes]]:
    pages = iter(record.pages)
    return [None if w & XTAB == XTAB else next(pages) for w in record.pfns]


def test_changed_bytes_only_cost_little() -> None:
    compressor = PageCompressor()
    first = [PageData(tuple(range(200)), tuple(page_of(3, []) for _ in range(200)))]
    list(compressor.compress(first))
    second = [PageData(tuple(range(200)), tuple(page_of(3, [(i, 1)]) for i in range(200)))]
    batches = list(compressor.compress(second))
    assert all(k == PageKind.XOR for b in batches for k in b.kinds)
    assert sum(len(b.frame) for b in batches) < 200 * PAGE_SIZE // 50


def test_batches_hold_at_most_max_batch_pages() -> None:
    n = MAX_BATCH_PAGES * 2 + 5
    batches = list(PageCompressor().compress([PageData(tuple(range(n)), tuple(bytes(PAGE_SIZE) for _ in range(n)))]))
    assert [len(b.pfns) for b in batches] == [MAX_BATCH_PAGES, MAX_BATCH_PAGES, 5]


def test_cache_is_lru_and_bounded() -> None:
    cache = PageCache(2)
    assert cache.swap(1, b"a") is None
    assert cache.swap(2, b"b") is None
    assert cache.swap(1, b"a2") == b"a"   # 1 is now the most recent
    assert cache.swap(3, b"c") is None    # evicts 2
    assert cache.swap(2, b"b2") is None
    assert len(cache) == 2 and cache.misses == 4 and cache.hits == 1


def test_xor_is_its_own_inverse() -> None:
    a, b = page_of(1, []), page_of(2, [])
    assert xor_pages(xor_pages(a, b), b) == a


def wire_records(encoder: CheckpointEncoder, records: list) -> list:
    encoded = encoder.encode(1, records)
    decoder = StreamDecoder()
    decoder.receive_data(StreamHeader().encode() + b"".join(encoded.chunks))
    return list(decoder.events())[1:]


def test_no_compression_really_sends_raw_pages() -> None:
    pages = tuple(page_of(i + 1, []) for i in range(3))
    records = [PageData((1, 2, 3), pages), Checkpoint()]
    raw = CheckpointEncoder(compression=False)
    sent = wire_records(raw, records)
    assert sent[0] == records[0]  # the PAGE_DATA record itself, page bytes verbatim
    assert b"".join(pages) in b"".join(raw.encode(2, records).chunks)
    compressed = wire_records(CheckpointEncoder(compression=True), records)
    assert isinstance(compressed[0], PageBatch)
    assert not any(isinstance(r, PageData) for r in compressed)


def test_encoder_reports_sizes_before_and_after_compression() -> None:
    records = [PageData(tuple(range(100)), tuple(bytes(PAGE_SIZE) for _ in range(100))), Checkpoint()]
    plain = CheckpointEncoder(compression=False).encode(1, records)
    packed = CheckpointEncoder(compression=True).encode(1, records)
    assert plain.raw_bytes == plain.wire_bytes == packed.raw_bytes
    assert packed.wire_bytes < plain.wire_bytes // 20


def test_xor_matches_the_plain_definition_for_every_shape_of_change() -> None:
    import random

    rng = random.Random(3)
    base = rng.randbytes(PAGE_SIZE)
    for changed_chunks in range(0, 9):
        page = bytearray(base)
        for chunk in rng.sample(range(8), changed_chunks):
            page[chunk * 512 + rng.randrange(512)] ^= 0xFF
        expected = bytes(x ^ y for x, y in zip(page, base))
        assert xor_pages(bytes(page), base) == expected
    assert xor_pages(b"abc", b"abd") == b"\0\0\x07"

"""Checkpoint compression round-trips exactly, and --no-compression sends raw pages."""

from __future__ import annotations

from typing import Optional

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from remus.stream.codec import StreamDecoder, encode_record
import zstandard

from remus.stream import compression
from remus.stream.compression import (
    NATIVE,
    VECTORISED,
    PageCache,
    PageCompressor,
    PageDecompressor,
    xor_pages,
)
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


needs_numpy = pytest.mark.skipif(not VECTORISED, reason="numpy is not installed (pip install '.[fast]')")
needs_native = pytest.mark.skipif(not NATIVE, reason="the C helper remus.stream._pages is not built "
                                                      "(needs a C compiler and python3-dev at install)")
#: (vectorised, native) of every way of moving the bytes, each where it is available.
PATHS = [(False, False), pytest.param(True, False, marks=needs_numpy),
         pytest.param(False, True, marks=needs_native),
         pytest.param(True, True, marks=[needs_numpy, needs_native])]
#: The same, as a list of those available here, for tests that compare them with each other.
AVAILABLE = [(v, n) for v in (False, True) for n in (False, True)
             if (VECTORISED or not v) and (NATIVE or not n)]
paths = pytest.mark.parametrize("vectorised, native", PATHS)


@paths
@settings(max_examples=150, deadline=None)
@given(checkpoints=st.lists(entries, min_size=1, max_size=5), cache_pages=st.integers(0, 30),
       lru=st.booleans())
def test_receiver_reconstructs_exactly_what_was_sent(checkpoints: list, cache_pages: int, lru: bool,
                                                     vectorised: bool, native: bool) -> None:
    compressor = PageCompressor(cache_pages=cache_pages, vectorised=vectorised, native=native,
                                policy="lru" if lru else "second")
    decompressor = PageDecompressor(vectorised=vectorised, native=native)
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


def test_lru_cache_is_lru_and_bounded() -> None:
    a, a2, b, b2, c = (page_of(i, []) for i in range(1, 6))
    cache = PageCache(2, policy="lru")
    assert cache.swap(1, a) is None
    assert cache.swap(2, b) is None
    assert cache.swap(1, a2) == a   # 1 is now the most recent
    assert cache.swap(3, c) is None    # evicts 2
    assert cache.swap(2, b2) is None
    assert len(cache) == 2 and cache.misses == 4 and cache.hits == 1
    assert 2 in cache and 3 in cache and 1 not in cache


@pytest.mark.parametrize("vectorised", [False, pytest.param(True, marks=needs_numpy)])
def test_full_cache_admits_a_page_only_when_it_is_sent_again(vectorised: bool) -> None:
    pages = [page_of(i, []) for i in range(1, 8)]
    cache = PageCache(2, vectorised=vectorised)
    for pfn in (1, 2, 3, 4):  # a first checkpoint: the cache fills, then takes nothing new
        assert cache.swap(pfn, pages[pfn]) is None
    assert 1 in cache and 2 in cache and 3 not in cache and 4 not in cache
    assert cache.swap(1, pages[5]) == pages[1]  # hot page: hit
    assert cache.swap(3, pages[6]) is None      # sent again: admitted, evicts 2 (least recent)
    assert 3 in cache and 2 not in cache and 1 in cache
    assert cache.swap(3, pages[0]) == pages[6]


def test_the_cache_costs_memory_only_for_the_pages_in_it() -> None:
    """The slab is backed by memory only where pages were written into it."""
    compressor = PageCompressor(cache_pages=4096)
    assert _resident_bytes(compressor.cache.slab) == 0
    n = 100
    list(compressor.compress([PageData(tuple(range(n)), tuple(page_of(i % 7, []) for i in range(n)))]))
    assert len(compressor.cache) == n
    assert _resident_bytes(compressor.cache.slab) == n * PAGE_SIZE


def _resident_bytes(slab: object) -> int:
    """How much of an anonymous mapping is backed by memory (mincore(2))."""
    import ctypes
    import mmap

    assert isinstance(slab, mmap.mmap)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    size = len(slab)
    address = ctypes.addressof(ctypes.c_char.from_buffer(slab))
    vector = ctypes.create_string_buffer((size + mmap.PAGESIZE - 1) // mmap.PAGESIZE)
    assert libc.mincore(address, size, vector) == 0, ctypes.get_errno()
    return sum(b & 1 for b in vector.raw) * mmap.PAGESIZE


def test_unmapping_the_cache_drops_its_mappings_and_keeps_its_pages() -> None:
    """After ``PageCache.unmap`` the slab maps nothing, and the next checkpoint is the same bytes
    as without it: every page is still there to XOR against."""
    kept, unmapped = PageCompressor(cache_pages=4096), PageCompressor(cache_pages=4096)
    n = 100
    first = [PageData(tuple(range(n)), tuple(page_of(i % 7, []) for i in range(n)))]
    again = [PageData(tuple(range(n)), tuple(page_of(i % 7, [(i, 1)]) for i in range(n)))]
    for compressor in (kept, unmapped):
        list(compressor.compress(first))
    assert _mapped_bytes(unmapped.cache.slab) == n * PAGE_SIZE
    unmapped.cache.unmap()
    assert _mapped_bytes(unmapped.cache.slab) == 0
    batches = list(unmapped.compress(again))
    assert batches == list(kept.compress(again))
    assert _mapped_bytes(unmapped.cache.slab) == n * PAGE_SIZE
    assert unmapped.cache.hits == n


def _mapped_bytes(slab: object) -> int:
    """How much of a mapping this process maps (its Rss in /proc/self/smaps)."""
    import ctypes
    import mmap

    assert isinstance(slab, mmap.mmap)
    address = ctypes.addressof(ctypes.c_char.from_buffer(slab))
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                low, high = (int(x, 16) for x in head.split("-"))
                inside = low <= address < high
            elif inside and head == "Rss:":
                return int(line.split()[1]) * 1024
    raise AssertionError("the slab is not mapped")


def test_the_cache_is_shared_memory_so_a_killed_primary_closes_its_socket_first() -> None:
    """A SIGKILLed process's private memory is freed before its sockets close, shared memory
    after (docs/standby.md, measured in the lab); a child's write shows the slab is shared."""
    import os

    cache = PageCache(4)
    pid = os.fork()
    if pid == 0:
        cache.slab[0:5] = b"child"
        os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
    assert cache.slab[0:5] == b"child"


def test_zero_sized_cache_sends_every_page_whole() -> None:
    compressor = PageCompressor(cache_pages=0)
    for _ in range(2):
        batches = list(compressor.compress([PageData((1, 2), (page_of(1, []), page_of(2, [])))]))
        assert [k for b in batches for k in b.kinds] == [PageKind.FULL, PageKind.FULL]


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


def stream(seed: int, checkpoints: int, pages: int, memory: int) -> list[list[PageData]]:
    """Checkpoints of a seeded guest: repeated PFNs, XTAB entries, words and bytes changed."""
    rng = random.Random(seed)
    current = {pfn: rng.randbytes(PAGE_SIZE) for pfn in range(memory)}
    out = []
    for _ in range(checkpoints):
        words, data = [], []
        for _ in range(pages):
            pfn = rng.randrange(memory)
            if rng.random() < 0.05:
                words.append(XTAB | pfn)
                continue
            page = bytearray(current[pfn])
            for _ in range(rng.randrange(1, 4)):
                off = rng.randrange(0, PAGE_SIZE, 8)
                page[off : off + 8] = rng.randbytes(8)
            current[pfn] = bytes(page)
            words.append(pfn)
            data.append(current[pfn])
        out.append([PageData(tuple(words), tuple(data))])
    return out


@pytest.mark.skipif(len(AVAILABLE) < 2, reason="neither numpy nor the C helper is here to compare")
@pytest.mark.parametrize("policy", ["second", "lru"])
def test_every_path_puts_the_same_bytes_on_the_wire(policy: str) -> None:
    checkpoints = stream(seed=11, checkpoints=6, pages=1500, memory=900)
    wire = {}
    for vectorised, native in AVAILABLE:
        compressor = PageCompressor(300, vectorised=vectorised, native=native, policy=policy)
        wire[vectorised, native] = [b"".join(encode_record(b) for b in compressor.compress(records))
                                    for records in checkpoints]
    pure = wire[False, False]
    assert all(sent == pure for sent in wire.values())
    # and every decoder takes those bytes
    sent = [(w, p) for records in checkpoints for r in records for w, p in zip(r.pfns, _data(r))]
    for vectorised, native in AVAILABLE:
        decompressor = PageDecompressor(vectorised=vectorised, native=native)
        receiver: dict[int, bytes] = {}
        decoder = StreamDecoder()
        decoder.receive_data(StreamHeader().encode() + b"".join(pure))
        got = []
        for event in list(decoder.events())[1:]:
            if isinstance(event, PageBatch):
                for word, page in decompressor.decompress(event, receiver.get):
                    if page is not None:
                        receiver[word & ((1 << 52) - 1)] = page
                    got.append((word, page))
        assert got == sent


@pytest.mark.skipif(len(AVAILABLE) < 2, reason="neither numpy nor the C helper is here to compare")
@settings(max_examples=100, deadline=None)
@given(checkpoints=st.lists(entries, min_size=1, max_size=6), cache_pages=st.integers(0, 12), lru=st.booleans())
def test_every_path_makes_the_same_decisions(checkpoints: list, cache_pages: int, lru: bool) -> None:
    policy = "lru" if lru else "second"
    pure, *others = [PageCompressor(cache_pages, vectorised=v, native=n, policy=policy) for v, n in AVAILABLE]
    for checkpoint in checkpoints:
        records = to_records(checkpoint)
        expected = [b.encode_body() for b in pure.compress(records)]
        for other in others:
            assert [b.encode_body() for b in other.compress(records)] == expected
            assert (pure.cache.hits, pure.cache.misses, len(pure.cache)) == (
                other.cache.hits, other.cache.misses, len(other.cache))
            assert all((pfn in pure.cache) == (pfn in other.cache) for pfn in range(42))


def text_like_page(seed: int) -> bytes:
    """A page zstd's levels 1 and 9 compress differently (words drawn from a small vocabulary)."""
    rng = random.Random(seed)
    vocabulary = [rng.randbytes(rng.randrange(3, 9)) for _ in range(64)]
    out = b""
    while len(out) < PAGE_SIZE:
        out += rng.choice(vocabulary)
    return out[:PAGE_SIZE]


def frame(level: int, payload: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=level, write_content_size=True).compress(payload)


@paths
def test_batches_mostly_of_deltas_use_the_delta_level(vectorised: bool, native: bool) -> None:
    """Whole pages at ``level``, batches at least half XOR at ``delta_level`` (zstd states neither
    in its frame, so the test compresses the payloads itself at each level)."""
    compressor = PageCompressor(vectorised=vectorised, native=native, level=1, delta_level=9)
    pages = [text_like_page(seed) for seed in range(8)]
    (first,) = compressor.compress([PageData(tuple(range(8)), tuple(pages))])
    assert first.kinds == (PageKind.FULL,) * 8
    assert first.frame == frame(1, b"".join(pages)) != frame(9, b"".join(pages))
    # 4 pages sent before (XOR) and 4 new (FULL): half XOR is "mostly deltas"
    fresh = [text_like_page(seed) for seed in range(100, 105)]
    (mixed,) = compressor.compress([PageData((4, 5, 6, 7, 100, 101, 102, 103), tuple(fresh[:4] + fresh[:4]))])
    assert mixed.kinds == (PageKind.XOR,) * 4 + (PageKind.FULL,) * 4
    payload = b"".join(xor_pages(new, old) for new, old in zip(fresh[:4], pages[4:])) + b"".join(fresh[:4])
    assert mixed.frame == frame(9, payload) != frame(1, payload)
    # 3 of 7 XOR, just under half: the whole pages' level
    (whole,) = compressor.compress([PageData((0, 1, 2, 200, 201, 202, 203), tuple(pages[:3] + fresh[:4]))])
    assert whole.kinds == (PageKind.XOR,) * 3 + (PageKind.FULL,) * 4
    payload = bytes(3 * PAGE_SIZE) + b"".join(fresh[:4])
    assert whole.frame == frame(1, payload) != frame(9, payload)


@needs_native
def test_the_c_helper_refuses_slots_and_rows_out_of_range() -> None:
    ffi, lib = compression._ffi, compression._lib
    page = page_of(1, [])
    slab = bytearray(2 * PAGE_SIZE)
    out = bytearray(PAGE_SIZE)

    def encode(read: int, write: int) -> int:
        return lib.remus_encode_pages(ffi.from_buffer(page), 1, ffi.new("int64_t[]", [read]),
                                      ffi.new("int64_t[]", [write]), ffi.from_buffer(slab), 2,
                                      ffi.from_buffer(out))

    assert encode(2, -1) == -1 and encode(-1, 2) == -1
    assert slab == bytearray(2 * PAGE_SIZE) and out == bytearray(PAGE_SIZE)  # nothing written
    assert encode(-1, 1) == 0 and out == page and slab[PAGE_SIZE:] == page
    assert encode(1, 1) == 0 and out == bytes(PAGE_SIZE)  # the page XOR itself
    payload = bytearray(page)

    def xor(row: int) -> int:
        return lib.remus_xor_rows(ffi.from_buffer(payload), 1, ffi.new("int64_t[]", [row]), 1,
                                  ffi.from_buffer(page))

    assert xor(1) == -1 and xor(-1) == -1 and payload == page
    assert xor(0) == 0 and payload == bytes(PAGE_SIZE)
    # the Python side checks what C cannot: buffer sizes
    with pytest.raises(ValueError):
        compression._encode_native(page, 1, [-1], [-1], slab, out)  # page 1 of a 1-page buffer
    with pytest.raises(ValueError):
        PageDecompressor(native=True)._apply(page, [0], [page[:100]])


def test_asking_for_a_missing_fast_path_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compression, "_lib", None)
    with pytest.raises(ValueError, match="python3-dev"):
        PageCompressor(native=True)
    with pytest.raises(ValueError, match="C helper"):
        PageDecompressor(native=True)


@pytest.mark.parametrize("compression", [True, False])
def test_a_streamed_checkpoint_is_the_encoded_one_made_as_it_is_sent(compression: bool) -> None:
    """``CheckpointEncoder.stream`` puts the same bytes on the wire as ``encode``, with the same
    sizes, and makes them lazily: the first chunk exists before the last batch was compressed."""
    checkpoints = stream(seed=7, checkpoints=3, pages=3000, memory=4096)
    eager, lazy = CheckpointEncoder(compression), CheckpointEncoder(compression)
    for seq, records in enumerate(checkpoints, 1):
        whole = eager.encode(seq, records, captured_unix=1_700_000_000.0)
        streamed = lazy.stream(seq, records, captured_unix=1_700_000_000.0, chunk_bytes=64 << 10)
        assert streamed.raw_bytes == whole.raw_bytes and streamed.raw_done == 0
        chunks = iter(streamed.chunks)
        first = next(chunks)
        assert 0 < streamed.raw_done < streamed.raw_bytes  # the rest is not framed yet
        rest = list(chunks)
        assert streamed.raw_done == streamed.raw_bytes and streamed.wire_bytes == whole.wire_bytes
        assert first + b"".join(rest) == b"".join(whole.chunks)
        with pytest.raises(RuntimeError):
            list(streamed.chunks)

"""Benchmark: remus's checkpoint codec against the xm-era word-RLE codec and its own variants.

Run: ``python -m tests.bench.compression [--memory 256M] [--dirty 1000] [--checkpoints 40]``.

On page streams captured from the simulated guest's write model (patterns
``random`` and ``words``, ``tests.bench.streams``), every method encodes the
same checkpoints after priming its cache with the first one (all of memory,
untimed).  Printed per method: wire bytes per checkpoint, MB/s of raw page
bytes encoded, and both as ratios against the xm-era word-RLE codec with
its own 8192-page cache, compiled in C in this run (``tests.bench.wordrle``,
a model of Xen 4.4's ``xc_compression.c``).  Also: the same codec with
remus's cache size; remus with its C helper, numpy, both, or neither; zstd's
full-page level on deltas too; plain LRU admission against admission on second sending; one zstd call per page
against one per batch; and the bytes of the first ten checkpoints (cache
warm-up).  Nothing is asserted.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import zstandard

from remus.sim.spec import _parse_size
from remus.stream.compression import (
    DEFAULT_CACHE_PAGES,
    DEFAULT_DELTA_LEVEL,
    DEFAULT_LEVEL,
    NATIVE,
    VECTORISED,
    PageCompressor,
    PageDecompressor,
)
from remus.stream.records import PAGE_DATA_PFN_MASK, PAGE_SIZE, PageData
from tests.bench import wordrle
from tests.bench.streams import Stream, capture, raw_bytes

#: encode(checkpoint) -> wire bytes of it
Encoder = Callable[[list[PageData]], int]


def remus(vectorised: bool, policy: str = "second", cache: int = DEFAULT_CACHE_PAGES, *,
          native: bool = NATIVE, delta_level: int = DEFAULT_DELTA_LEVEL) -> Encoder:
    compressor = PageCompressor(cache, vectorised=vectorised, policy=policy, native=native,
                                delta_level=delta_level)
    return lambda records: sum(len(b.frame) + 16 + 9 * len(b.pfns) for b in compressor.compress(records))


def remus_per_page_zstd(cache: int = DEFAULT_CACHE_PAGES) -> Encoder:
    """XOR with the same cache, then one zstd call per page payload."""
    compressor = PageCompressor(cache, level=1)
    cctx = zstandard.ZstdCompressor(level=1)

    def encode(records: list[PageData]) -> int:
        total = 0
        for batch in compressor.compress(records):
            raw = zstandard.ZstdDecompressor().decompress(batch.frame)
            total += 16 + 9 * len(batch.pfns)
            total += sum(len(cctx.compress(raw[i : i + PAGE_SIZE])) for i in range(0, len(raw), PAGE_SIZE))
        return total
    return encode


def word_rle_c(built: tuple[object, object], cache: int) -> Encoder:
    codec = wordrle.CWordRle(*built, cache_pages=cache)

    def encode(records: list[PageData]) -> int:
        return sum(len(codec.encode_batch([w & PAGE_DATA_PFN_MASK for w in r.pfns], b"".join(r.pages)))
                   + 8 * len(r.pfns) for r in records)
    return encode


def word_rle_py(cache: int) -> Encoder:
    codec = wordrle.PyWordRle(cache)
    return lambda records: sum(len(codec.encode(w & PAGE_DATA_PFN_MASK, p)) + 8
                               for r in records for w, p in zip(r.pfns, r.pages))


def run(make: Callable[[], Encoder], stream: Stream) -> tuple[float, int, int]:
    """(seconds for the steady checkpoints, their wire bytes, wire bytes of the first ten)."""
    encode = make()
    encode(stream.first)
    sizes = []
    start = time.perf_counter()
    for checkpoint in stream.checkpoints:
        sizes.append(encode(checkpoint))
    return time.perf_counter() - start, sum(sizes), sum(sizes[:10])


def decode_rate(stream: Stream, vectorised: bool, native: bool) -> float:
    """MB/s of raw pages the receiver's decompressor restores."""
    compressor = PageCompressor(vectorised=vectorised, native=native)
    decompressor = PageDecompressor(vectorised=vectorised, native=native)
    image: dict[int, bytes] = {}
    for batch in compressor.compress(stream.first):
        for word, page in decompressor.decompress(batch, image.get):
            assert page is not None
            image[word & PAGE_DATA_PFN_MASK] = page
    batches = [list(compressor.compress(c)) for c in stream.checkpoints]
    start = time.perf_counter()
    for checkpoint in batches:
        for batch in checkpoint:
            for word, page in decompressor.decompress(batch, image.get):
                assert page is not None
                image[word & PAGE_DATA_PFN_MASK] = page
    return sum(raw_bytes(c) for c in stream.checkpoints) / (time.perf_counter() - start) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--memory", default="256M")
    parser.add_argument("--dirty", type=int, default=1000, help="dirty pages per checkpoint")
    parser.add_argument("--checkpoints", type=int, default=40)
    parser.add_argument("--patterns", default="random,words")
    args = parser.parse_args()
    built = wordrle.c_codec()
    for pattern in args.patterns.split(","):
        stream = capture(pattern, _parse_size(args.memory), args.checkpoints, args.dirty)
        methods: dict[str, Callable[[], Encoder]] = {}
        if built is not None:
            methods["word-RLE in C, 8192-page cache (baseline)"] = lambda: word_rle_c(built, 8192)
            methods["word-RLE in C, 16384-page cache"] = lambda: word_rle_c(built, DEFAULT_CACHE_PAGES)
        else:
            methods["word-RLE in Python, 8192 pages (baseline; no C compiler)"] = lambda: word_rle_py(8192)
        # The default first: the C helper where it is built, numpy where it is installed.
        default = ", ".join(["C"] * NATIVE + ["numpy"] * VECTORISED) or "pure Python"
        methods[f"remus, {default} (default)"] = lambda: remus(VECTORISED)
        if NATIVE and VECTORISED:
            methods["remus, numpy without C"] = lambda: remus(True, native=False)
        if NATIVE:
            methods["remus, C without numpy"] = lambda: remus(False)
        methods[f"remus, default, zstd {DEFAULT_LEVEL} on deltas too"] = (
            lambda: remus(VECTORISED, delta_level=DEFAULT_LEVEL))
        methods["remus, default, plain LRU"] = lambda: remus(VECTORISED, "lru")
        methods["remus, default, 8192-page cache"] = lambda: remus(VECTORISED, cache=8192)
        if NATIVE or VECTORISED:
            methods["remus, pure Python"] = lambda: remus(False, native=False)
        methods["remus XOR, zstd per page"] = lambda: remus_per_page_zstd()
        results: dict[str, tuple[float, int, int]] = {}
        for name, make in methods.items():
            results[name] = min((run(make, stream) for _ in range(2)), key=lambda r: r[0])
        raw = sum(raw_bytes(c) for c in stream.checkpoints)
        base_s, base_b, base_first = next(iter(results.values()))
        print(f"\npattern={pattern}: guest {args.memory}, {args.checkpoints} checkpoints, "
              f"{stream.dirty_pages / args.checkpoints:.0f} dirty pages each ({raw / 1e6:.0f} MB raw), best of 2")
        print(f"{'method':44} {'KiB/ckpt':>9} {'bytes/base':>10} {'MB/s':>7} {'speed/base':>10} "
              f"{'first 10 /base':>14}")
        for name, (seconds, size, first) in results.items():
            print(f"{name:44} {size / args.checkpoints / 1024:9.1f} {size / base_b:10.3f} "
                  f"{raw / seconds / 1e6:7.0f} {base_s / seconds:10.2f} {first / base_first:14.3f}")
        decoders = [("C", VECTORISED, True)] if NATIVE else []
        decoders += [("numpy", True, False)] if VECTORISED else []
        for label, vectorised, native in decoders + [("pure Python", False, False)]:
            print(f"receiver decode ({label}): {decode_rate(stream, vectorised, native):.0f} MB/s")


if __name__ == "__main__":
    main()

"""Benchmark: checkpoint compression, batched XOR+zstd against the obvious alternatives.

Run: ``python -m tests.bench.compression [--pages N] [--rounds R]``.

Every figure is measured in this run and printed as a ratio against the
baseline "one zstd call per page" (the approach the batch design replaces),
so the numbers mean something on a noisy machine.  Nothing is asserted.
"""

from __future__ import annotations

import argparse
import random
import time
from typing import Callable

import zstandard

from remus.stream.compression import PageCompressor, PageDecompressor, xor_pages
from remus.stream.records import PAGE_SIZE, PageData


def workload(pages: int, rounds: int, seed: int = 1) -> tuple[list[bytes], list[list[tuple[int, bytes]]]]:
    """A guest's initial memory and ``rounds`` checkpoints of ``pages`` dirty pages with 64-byte edits."""
    rng = random.Random(seed)
    initial = [rng.randbytes(PAGE_SIZE) if i % 2 else bytes(PAGE_SIZE) for i in range(pages * 4)]
    memory = list(initial)
    checkpoints = []
    for _ in range(rounds):
        dirty = rng.sample(range(len(memory)), pages)
        batch = []
        for pfn in dirty:
            page = bytearray(memory[pfn])
            off = rng.randrange(0, PAGE_SIZE // 64) * 64
            page[off : off + 64] = rng.randbytes(64)
            memory[pfn] = bytes(page)
            batch.append((pfn, memory[pfn]))
        checkpoints.append(batch)
    return initial, checkpoints


def timed(fn: Callable[[], int]) -> tuple[float, int]:
    start = time.perf_counter()
    size = fn()
    return time.perf_counter() - start, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pages", type=int, default=500, help="dirty pages per checkpoint")
    parser.add_argument("--rounds", type=int, default=40, help="checkpoints")
    args = parser.parse_args()
    memory, checkpoints = workload(args.pages, args.rounds)
    cctx = zstandard.ZstdCompressor(level=1)

    def per_page_zstd() -> int:
        return sum(len(cctx.compress(page)) for batch in checkpoints for _, page in batch)

    def per_page_xor_zstd() -> int:
        last = dict(enumerate(memory))
        total = 0
        for batch in checkpoints:
            for pfn, page in batch:
                total += len(cctx.compress(xor_pages(page, last[pfn])))
                last[pfn] = page
        return total

    def batched_xor_zstd() -> int:
        compressor = PageCompressor(cache_pages=len(memory))
        list(compressor.compress([PageData(tuple(range(len(memory))), tuple(memory))]))  # warm cache
        total = 0
        for batch in checkpoints:
            records = [PageData(tuple(p for p, _ in batch), tuple(d for _, d in batch))]
            total += sum(len(b.frame) for b in compressor.compress(records))
        return total

    def raw() -> int:
        return sum(len(b"".join(d for _, d in batch)) for batch in checkpoints)

    results = {}
    for name, fn in [("one zstd call per page (baseline)", per_page_zstd),
                     ("XOR, one zstd call per page", per_page_xor_zstd),
                     ("XOR, one zstd call per batch (remus)", batched_xor_zstd),
                     ("raw pages (--no-compression)", raw)]:
        results[name] = min(timed(fn) for _ in range(3))
    base_t, base_b = results["one zstd call per page (baseline)"]
    print(f"{args.rounds} checkpoints x {args.pages} dirty pages (64-byte edits), best of 3")
    print(f"{'method':40} {'ms/checkpoint':>14} {'time ratio':>11} {'KiB/checkpoint':>15} {'size ratio':>11}")
    for name, (seconds, size) in results.items():
        print(f"{name:40} {seconds / args.rounds * 1000:14.2f} {seconds / base_t:11.2f} "
              f"{size / args.rounds / 1024:15.1f} {size / base_b:11.3f}")
    # The receiver's side, for the record.
    compressor, decompressor = PageCompressor(cache_pages=len(memory)), PageDecompressor()
    copy = dict(enumerate(memory))
    list(compressor.compress([PageData(tuple(copy), tuple(copy.values()))]))
    batches = [list(compressor.compress([PageData(tuple(p for p, _ in b), tuple(d for _, d in b))]))
               for b in checkpoints]
    start = time.perf_counter()
    for checkpoint in batches:
        for batch in checkpoint:
            for word, page in decompressor.decompress(batch, copy.get):
                copy[word] = page  # type: ignore[assignment]
    print(f"receiver: {(time.perf_counter() - start) / args.rounds * 1000:.2f} ms/checkpoint to decompress")


if __name__ == "__main__":
    main()

"""remus.heap: freed heap memory goes back to the system."""

from __future__ import annotations

import subprocess
import sys

import pytest

from remus import heap

# Page-sized buffers with small live objects between them: freed, they stay in glibc's heap.
_FRAGMENTED = """
import os, sys
from remus import heap
def rss_kib():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1])
base = rss_kib()
pages, pins = [], []
for i in range(64 * 1024):
    pages.append(os.urandom(8) * 512)
    if i % 64 == 0:
        pins.append(bytes(4096 + 64))
del pages
before = rss_kib()
trimmed = heap.trim()
print(base, before, rss_kib(), trimmed)
"""


def test_trim_returns_freed_pages_to_the_system() -> None:
    out = subprocess.run([sys.executable, "-c", _FRAGMENTED], capture_output=True, text=True, check=True)
    base, before, after, trimmed = out.stdout.split()
    if trimmed != "True":
        pytest.skip("this C library has no malloc_trim")
    base_k, before_k, after_k = int(base), int(before), int(after)
    assert before_k - base_k > 128 * 1024, "glibc gave the memory back by itself: nothing to measure"
    assert after_k - base_k < 32 * 1024


def test_only_large_checkpoints_are_worth_a_trim() -> None:
    assert heap.worth_trimming(heap.TRIM_AFTER_BYTES)
    assert not heap.worth_trimming(heap.TRIM_AFTER_BYTES - 1)


def test_the_primary_trims_after_a_large_checkpoint_and_then_every_so_often() -> None:
    schedule = heap.TrimSchedule(now=100.0, every_s=10.0)
    assert schedule.due(heap.TRIM_AFTER_BYTES, 100.5)  # the first checkpoint
    assert not schedule.due(4096, 101.0)
    assert not schedule.due(4096, 110.4)
    assert schedule.due(4096, 110.5)  # 10 s after the last trim
    assert not schedule.due(4096, 115.0)
    assert schedule.due(heap.TRIM_AFTER_BYTES, 115.0)  # a large one trims at once
    assert not schedule.due(4096, 124.9)
    assert schedule.due(4096, 125.0)

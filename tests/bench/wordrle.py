"""The xm-era checkpoint codec, modelled from Xen 4.4's ``tools/libxc/xc_compression.c``: the baseline.

Format, per page, as that file defines it (see docs/REMUS-REFERENCE section 3):

* a page not in the sender's cache (or a pagetable page): ``FULL_PAGE``
  (0x80) then its 4096 bytes; the page is then cached;
* a cached page: the page compared with its cached copy in 32-bit words,
  cut into runs of at most 127 words; each run is a 1-byte header, bit 7
  ``SKIPFLAG`` (0x80: words unchanged) or ``RUNFLAG`` (0: changed words),
  bits 0-6 the run's length in words; a RUN header is followed by the new
  words, which also go into the cache.  Every run is written, the last one
  included, except that a page with no changed word is the single byte
  ``EMPTY_PAGE`` (0x00);
* the cache: ``DELTA_CACHE_SIZE`` = 8192 pages, LRU (a hit moves to the
  head, a miss takes the tail's slot).

No zstd after it: the xm-era stream carried these bytes as they are.  The
receiver applies them to its own copy of the page, so it needs no cache.

``PyWordRle`` is a plain-Python model, written for reading; ``c_codec()``
compiles the same algorithm in C through cffi (when a compiler is there) for
the speed baseline, as the original ran in C.  Both produce the same bytes
(the benchmark checks it); ``tests/test_bench_wordrle.py`` checks the model
against bytes derived by hand.  Written from the format's description, not
copied.
"""

from __future__ import annotations

import struct
import tempfile
from collections import OrderedDict
from typing import Any, Optional

PAGE_SIZE = 4096
WORDS = PAGE_SIZE // 4
CACHE_PAGES = 8192
RUNFLAG = 0x00
SKIPFLAG = 0x80
LENMASK = 0x7F
EMPTY_PAGE = 0x00
FULL_PAGE = SKIPFLAG
_WORDS = struct.Struct(f"<{WORDS}I")


class PyWordRle:
    """Sender side of the xm-era codec (see the module docstring)."""

    def __init__(self, cache_pages: int = CACHE_PAGES) -> None:
        self.capacity = cache_pages
        self.cache: "OrderedDict[int, bytearray]" = OrderedDict()

    def encode(self, pfn: int, page: bytes) -> bytes:
        old = self.cache.get(pfn)
        if old is None:
            if len(self.cache) >= self.capacity:
                self.cache.popitem(last=False)
            self.cache[pfn] = bytearray(page)
            return bytes([FULL_PAGE]) + page
        self.cache.move_to_end(pfn)
        new_words = _WORDS.unpack(page)
        old_words = _WORDS.unpack(old)
        out = bytearray()
        start = 0
        while start < WORDS:
            copying = new_words[start] != old_words[start]
            end = start + 1
            while end < WORDS and end - start < LENMASK and (new_words[end] != old_words[end]) == copying:
                end += 1
            if copying:
                out.append(RUNFLAG | (end - start))
                out += page[start * 4 : end * 4]
            else:
                out.append(SKIPFLAG | (end - start))
            start = end
        if all(b & SKIPFLAG for b in out):
            return bytes([EMPTY_PAGE])
        old[:] = page
        return bytes(out)


def decode(encoded: bytes, pos: int, page: bytearray) -> int:
    """Apply one encoded page at ``pos`` to the receiver's copy ``page``; the position after it."""
    head = encoded[pos]
    if head == EMPTY_PAGE:
        return pos + 1
    if head == FULL_PAGE:
        page[:] = encoded[pos + 1 : pos + 1 + PAGE_SIZE]
        return pos + 1 + PAGE_SIZE
    at = 0
    while at < PAGE_SIZE:
        head = encoded[pos]
        length = (head & LENMASK) * 4
        pos += 1
        if not head & SKIPFLAG:
            page[at : at + length] = encoded[pos : pos + length]
            pos += length
        at += length
    return pos


_C_SOURCE = r"""
#include <stdint.h>
#include <string.h>
#define PAGE 4096
#define NWORDS 1024
/* Encode one page against its cached copy; returns the bytes written to out. */
static long wr_delta(const unsigned char *page, unsigned char *cached, unsigned char *out)
{
    const uint32_t *nw = (const uint32_t *)page;
    const uint32_t *ow = (const uint32_t *)cached;
    long n = 0; int start = 0, changed_any = 0;
    while (start < NWORDS) {
        int copying = nw[start] != ow[start];
        int end = start + 1;
        while (end < NWORDS && end - start < 127 && ((nw[end] != ow[end]) == copying))
            end++;
        if (copying) {
            out[n++] = (unsigned char)(end - start);
            memcpy(out + n, page + 4 * start, 4 * (end - start));
            memcpy(cached + 4 * start, page + 4 * start, 4 * (end - start));
            n += 4 * (end - start);
            changed_any = 1;
        } else {
            out[n++] = (unsigned char)(0x80 | (end - start));
        }
        start = end;
    }
    if (!changed_any) { out[0] = 0; return 1; }
    return n;
}
/* slots[i] >= 0: the page's cache slot (hit); -1 - slot: a miss that takes that slot. */
long wr_encode(const unsigned char *pages, const long *slots, long count,
               unsigned char *cache, unsigned char *out)
{
    long n = 0, i;
    for (i = 0; i < count; i++) {
        const unsigned char *page = pages + i * PAGE;
        if (slots[i] >= 0) {
            n += wr_delta(page, cache + slots[i] * PAGE, out + n);
        } else {
            unsigned char *slot = cache + (-1 - slots[i]) * PAGE;
            out[n++] = 0x80;
            memcpy(out + n, page, PAGE);
            memcpy(slot, page, PAGE);
            n += PAGE;
        }
    }
    return n;
}
"""
_CDEF = "long wr_encode(const unsigned char *, const long *, long, unsigned char *, unsigned char *);"


class CWordRle:
    """The same codec with the page loop in C (the LRU bookkeeping stays in Python, as cheap
    as the original's linked list relative to a page's work)."""

    def __init__(self, lib: Any, ffi: Any, cache_pages: int = CACHE_PAGES) -> None:
        self.lib, self.ffi = lib, ffi
        self.capacity = cache_pages
        self.slots: "OrderedDict[int, int]" = OrderedDict()
        self.cache = ffi.new("unsigned char[]", cache_pages * PAGE_SIZE)

    def encode_batch(self, pfns: list[int], pages: bytes) -> bytes:
        slots = []
        for pfn in pfns:
            slot = self.slots.get(pfn)
            if slot is not None:
                self.slots.move_to_end(pfn)
                slots.append(slot)
                continue
            if len(self.slots) >= self.capacity:
                _old, slot = self.slots.popitem(last=False)
            else:
                slot = len(self.slots)
            self.slots[pfn] = slot
            slots.append(-1 - slot)
        out = self.ffi.new("unsigned char[]", len(pfns) * (PAGE_SIZE + 9))
        n = self.lib.wr_encode(pages, self.ffi.new("long[]", slots), len(pfns), self.cache, out)
        return bytes(self.ffi.buffer(out, n))


def c_codec() -> Optional[tuple[Any, Any]]:
    """(lib, ffi) of the C version compiled now, or None if there is no compiler."""
    try:
        import cffi

        ffi = cffi.FFI()
        ffi.cdef(_CDEF)
        ffi.set_source("_remus_bench_wordrle", _C_SOURCE, extra_compile_args=["-O2"])
        tmp = tempfile.mkdtemp(prefix="remus-wordrle-")
        path = ffi.compile(tmpdir=tmp, verbose=False)
        import importlib.util

        spec = importlib.util.spec_from_file_location("_remus_bench_wordrle", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.lib, module.ffi
    except Exception:  # noqa: BLE001 - any failure to build just means no C baseline
        return None

"""Build recipe for ``remus.stream._pages``, the codec's optional C helper (cffi, API mode).

``setup.py`` hands this file to cffi (``cffi_modules``) where a C compiler and
Python's headers are installed; elsewhere the codec moves its bytes with numpy
or in pure Python, producing the same bytes (``remus.stream.compression``).
It imports nothing from the package (it runs before the package is installed).

The helper only moves bytes a batch at a time: it never decides which page
goes where (the caller's ``PageCache`` does), never allocates, and checks
every slot and row against the bounds it is given before touching memory.

Run directly (``python3 remus/stream/_pages_build.py``) it builds the module in place.
"""

import os

from cffi import FFI

CDEF = """
int remus_encode_pages(const uint8_t *pages, size_t count, const int64_t *read,
                       const int64_t *write, uint8_t *slab, size_t slots, uint8_t *out);
int remus_xor_rows(uint8_t *payload, size_t count, const int64_t *rows, size_t nrows,
                   const uint8_t *bases);
"""

SOURCE = r"""
#include <stdint.h>
#include <string.h>

#define REMUS_PAGE 4096

static void remus_xor_page(uint8_t *dst, const uint8_t *a, const uint8_t *b)
{
    /* Word loads through memcpy: no alignment is assumed, and gcc makes them plain loads. */
    for (size_t i = 0; i < REMUS_PAGE; i += 8) {
        uint64_t x, y;
        memcpy(&x, a + i, 8);
        memcpy(&y, b + i, 8);
        x ^= y;
        memcpy(dst + i, &x, 8);
    }
}

/* One segment of a batch (no page number twice): page i of `pages` goes to `out` XORed with
 * slab slot read[i] (or as is when read[i] < 0), then is copied into slot write[i] (unless
 * write[i] < 0).  Returns -1, having written nothing, if a slot is not below `slots`. */
int remus_encode_pages(const uint8_t *pages, size_t count, const int64_t *read,
                       const int64_t *write, uint8_t *slab, size_t slots, uint8_t *out)
{
    for (size_t i = 0; i < count; i++)
        if (read[i] >= (int64_t)slots || write[i] >= (int64_t)slots)
            return -1;
    for (size_t i = 0; i < count; i++) {
        const uint8_t *page = pages + i * REMUS_PAGE;
        uint8_t *dst = out + i * REMUS_PAGE;
        if (read[i] >= 0)
            remus_xor_page(dst, page, slab + (size_t)read[i] * REMUS_PAGE);
        else
            memcpy(dst, page, REMUS_PAGE);
        if (write[i] >= 0)
            memcpy(slab + (size_t)write[i] * REMUS_PAGE, page, REMUS_PAGE);
    }
    return 0;
}

/* XOR page rows[k] of `payload` (count pages) in place with page k of `bases`.  Returns -1,
 * having written nothing, if a row is not below `count`. */
int remus_xor_rows(uint8_t *payload, size_t count, const int64_t *rows, size_t nrows,
                   const uint8_t *bases)
{
    for (size_t k = 0; k < nrows; k++)
        if (rows[k] < 0 || rows[k] >= (int64_t)count)
            return -1;
    for (size_t k = 0; k < nrows; k++) {
        uint8_t *page = payload + (size_t)rows[k] * REMUS_PAGE;
        remus_xor_page(page, page, bases + k * REMUS_PAGE);
    }
    return 0;
}
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
# -O2 after any CFLAGS (the lab builds the Xen binding at -O0): this loop is the point.
ffibuilder.set_source("remus.stream._pages", SOURCE, extra_compile_args=["-O2"])

if __name__ == "__main__":
    os.chdir(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
    ffibuilder.compile(verbose=True)

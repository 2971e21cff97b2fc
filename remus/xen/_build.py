"""Build recipe for ``remus.xen._xenlib``, the cffi (API mode) binding of Xen's tool libraries.

``setup.py`` hands this file to cffi (``cffi_modules``) only when the libxen-dev
headers are installed.  It imports nothing from the package (it runs before the
package is installed): it concatenates the declaration files in ``_cdefs/``, in
the order below, and compiles them against the system headers.  The module
links against libxenctrl, libxenguest, libxenstore, libxenevtchn and libxentoollog by their
sonames (``libxenctrl.so.4.17``, ...), so it must be built against the same Xen
release as the dom0 it runs in.

Run directly (``python3 remus/xen/_build.py``) it builds the module in place.
"""

import os

from cffi import FFI

#: Order matters: later files use types the earlier ones declare.
CDEF_FILES = ("xenctrl.cdef", "xenevtchn.cdef", "xenguest.cdef", "xenstore.cdef")

SOURCE = """
#include <errno.h>
#include <stdlib.h>
#include <xenctrl.h>
#include <xenevtchn.h>
#include <xenguest.h>
#include <xenstore.h>
#include <stdio.h>
#include <xentoollog.h>

/* libxc's messages go to Python's logging (remus.xen.lib), formatted here because Python
 * cannot take a va_list.  Progress reports and anything below XTL_INFO are dropped in C. */
static void remus_xtl_message(int level, int errnoval, const char *context, const char *msg);

static void remus_xtl_vmessage(struct xentoollog_logger *logger, xentoollog_level level,
                               int errnoval, const char *context, const char *format, va_list al)
{
    char msg[1024];

    if (level < XTL_INFO)
        return;
    vsnprintf(msg, sizeof(msg), format, al);
    remus_xtl_message(level, errnoval, context ? context : "", msg);
}

static void remus_xtl_progress(struct xentoollog_logger *logger, const char *context,
                               const char *doing_what, int percent,
                               unsigned long done, unsigned long total)
{
}

static void remus_xtl_destroy(struct xentoollog_logger *logger)
{
}

static xentoollog_logger remus_xtl = { remus_xtl_vmessage, remus_xtl_progress, remus_xtl_destroy };

static xentoollog_logger *remus_logger(void)
{
    return &remus_xtl;
}

struct remus_dominfo {
    uint32_t domid;
    int dying, crashed, shutdown, paused, blocked, running, hvm;
    unsigned int shutdown_reason;
    unsigned long nr_pages;
    unsigned long max_memkb;
    unsigned int nr_online_vcpus;
};

/* xc_domain_getinfo for exactly one domain, flattened (cffi cannot declare xc_dominfo_t). */
static int remus_domain_info(xc_interface *xch, uint32_t domid, struct remus_dominfo *out)
{
    xc_dominfo_t info;
    int n = xc_domain_getinfo(xch, domid, 1, &info);

    if (n < 0)
        return -1;
    if (n != 1 || info.domid != domid) {
        errno = ESRCH;
        return -1;
    }
    out->domid = info.domid;
    out->dying = info.dying;
    out->crashed = info.crashed;
    out->shutdown = info.shutdown;
    out->paused = info.paused;
    out->blocked = info.blocked;
    out->running = info.running;
    out->hvm = info.hvm;
    out->shutdown_reason = info.shutdown_reason;
    out->nr_pages = info.nr_pages;
    out->max_memkb = info.max_memkb;
    out->nr_online_vcpus = info.nr_online_vcpus;
    return 0;
}
"""

_here = os.path.dirname(os.path.abspath(__file__))


def _cdef() -> str:
    parts = []
    for name in CDEF_FILES:
        with open(os.path.join(_here, "_cdefs", name), encoding="utf-8") as f:
            parts.append(f.read())
    return "\n".join(parts)


ffibuilder = FFI()
ffibuilder.cdef(_cdef())
ffibuilder.set_source(
    "remus.xen._xenlib",
    SOURCE,
    libraries=["xenctrl", "xenguest", "xenstore", "xenevtchn", "xentoollog"],
)

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=os.path.dirname(os.path.dirname(_here)), verbose=True)

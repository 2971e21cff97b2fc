"""Build script: all metadata is in setup.cfg.

Two optional cffi (API mode) modules, each built only where it can be:

- ``remus.stream._pages``, the codec's C helper (one pass per batch for the
  XOR and the cache copies), where a C compiler and Python's own headers are
  installed (Debian: gcc, python3-dev).  Without it the codec uses numpy or
  pure Python and sends the same bytes.  ``REMUS_NO_NATIVE=1`` skips it.
- ``remus.xen._xenlib``, the Xen binding, where the Xen headers (libxen-dev)
  are installed as well; elsewhere using a Xen domain says what is missing.
  ``REMUS_NO_XEN=1`` skips it even where the headers are.

``setup_requires`` puts cffi into pip's isolated build environment when a
module is built.  A C helper that fails to compile (a compiler without the C
library's headers, say) is left out with a warning; the Xen binding is not.
"""

import os
import shlex
import shutil
import sys
import sysconfig

from setuptools import setup
from setuptools.command.build_ext import build_ext

NATIVE_MODULE = "remus.stream._pages"


class OptionalNativeBuild(build_ext):
    """build_ext that leaves the codec's C helper out, with a warning, if it does not compile."""

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:  # CompileError, LinkError, DistutilsExecError...
            if ext.name != NATIVE_MODULE:
                raise
            print(f"warning: {NATIVE_MODULE} (the codec's C helper) was not built: {exc}; "
                  "the codec uses numpy or pure Python instead", file=sys.stderr)

XEN_HEADERS = ("xenctrl.h", "xenguest.h", "xenstore.h", "xenevtchn.h", "xentoollog.h")
python_headers = os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h"))
compiler = shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")[:1]
can_compile = python_headers and bool(compiler) and shutil.which(compiler[0]) is not None

modules = []
if can_compile and os.environ.get("REMUS_NO_NATIVE") != "1":
    modules.append("remus/stream/_pages_build.py:ffibuilder")
if (
    can_compile
    and os.environ.get("REMUS_NO_XEN") != "1"
    and all(os.path.exists(os.path.join("/usr/include", h)) for h in XEN_HEADERS)
):
    modules.append("remus/xen/_build.py:ffibuilder")

if modules:
    setup(setup_requires=["cffi>=1.15"], cffi_modules=modules,
          cmdclass={"build_ext": OptionalNativeBuild})
else:
    setup()

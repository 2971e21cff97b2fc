"""Build script: all metadata is in setup.cfg.

The Xen binding (``remus.xen._xenlib``, a cffi API-mode module) is built only
where the Xen headers (libxen-dev) and Python's own headers are installed;
elsewhere this is a pure-Python package and using a Xen domain says what is
missing.  ``setup_requires`` puts cffi into pip's isolated build environment
when the binding is built.  ``REMUS_NO_XEN=1`` skips the binding even where
the headers are.
"""

import os
import sysconfig

from setuptools import setup

XEN_HEADERS = ("xenctrl.h", "xenguest.h", "xenstore.h", "xenevtchn.h", "xentoollog.h")
with_xen = (
    os.environ.get("REMUS_NO_XEN") != "1"
    and all(os.path.exists(os.path.join("/usr/include", h)) for h in XEN_HEADERS)
    and os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h"))
)

if with_xen:
    setup(setup_requires=["cffi>=1.15"], cffi_modules=["remus/xen/_build.py:ffibuilder"])
else:
    setup()

"""The one door to Xen's C libraries: loading the binding, and checking every call.

``load()`` imports the compiled cffi module ``remus.xen._xenlib`` the first
time a Xen domain is used (importing ``remus`` never does) and checks that this
process can drive Xen at all.  Whatever is missing - the hypervisor interface
``/dev/xen/privcmd``, root privileges, the binding itself or the libraries it
links to - comes back as ONE ``XenUnavailable`` that names every missing piece
and how to get it.

Every C call then goes through the same checked pattern::

    rc = b.check(b.lib.xc_domain_resume(b.xch, domid, 1), "xc_domain_resume")

``check`` (and ``check_ptr`` / ``check_true`` for calls that report failure as
NULL or false) turns a failure into ``XenError(op, code, errno)`` with the
errno the call left behind.

The save callbacks libxc calls (``extern "Python"`` in the cdefs) are routed
here to the Python object whose handle was passed as ``data``; see
``remus.xen.saver`` for what they do.  libxc's own messages arrive here too
and go to the ``xc`` logger.  This module never prints.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
from typing import Any, Optional, Protocol

from remus.errors import XenError, XenUnavailable

log = logging.getLogger(__name__)
#: libxc's own messages (errors show as "remus: xc: <context>: <message>").
xc_log = logging.getLogger("xc")

#: The hypervisor's privileged-command device; it exists only in dom0 of a Xen host.
PRIVCMD = "/dev/xen/privcmd"

_lock = threading.Lock()
_binding: Optional["Binding"] = None


def check(rc: int, op: str, errno: int) -> int:
    """``rc`` when it is not negative; else ``XenError(op, rc, errno)``."""
    if rc < 0:
        raise XenError(op, rc, errno)
    return rc


class Binding:
    """The loaded cffi module: ``ffi``, ``lib``, and the checks that read ``ffi.errno``."""

    def __init__(self, ffi: Any, lib: Any) -> None:
        self.ffi = ffi
        self.lib = lib

    def check(self, rc: int, op: str) -> int:
        """Raise ``XenError`` for a negative return code; else return it."""
        return check(rc, op, self.ffi.errno)

    def check_ptr(self, ptr: Any, op: str) -> Any:
        """Raise ``XenError`` for a NULL pointer; else return it."""
        if ptr == self.ffi.NULL:
            raise XenError(op, 0, self.ffi.errno)
        return ptr

    def check_true(self, ok: bool, op: str) -> None:
        """Raise ``XenError`` when a call that returns a C bool returned false."""
        if not ok:
            raise XenError(op, 0, self.ffi.errno)


def problems(privcmd: Optional[str] = None) -> list[str]:
    """What keeps this process from driving Xen, as remedies; empty when nothing does.

    ``privcmd`` defaults to ``PRIVCMD``.  Does not load the binding (see ``load``).
    """
    privcmd = privcmd or PRIVCMD
    found = []
    if not os.path.exists(privcmd):
        found.append(f"{privcmd} is missing: run remus in dom0 of a Xen host")
    elif os.geteuid() != 0:
        found.append("Xen's control interfaces need root: run remus as root")
    return found


def _import_binding() -> tuple[Optional[Binding], Optional[str]]:
    try:
        xenlib = importlib.import_module("remus.xen._xenlib")
    except ModuleNotFoundError as exc:
        if exc.name != "remus.xen._xenlib":
            raise
        return None, (
            "remus was installed without its Xen binding (remus.xen._xenlib): install the Xen "
            "and Python headers (Debian: apt-get install libxen-dev python3-dev) and reinstall remus"
        )
    except ImportError as exc:  # the module is there, a library it links to is not
        return None, (
            f"the Xen binding cannot load Xen's libraries ({exc}): install the Xen tools it was "
            "built for (Debian: xen-utils-4.17) or rebuild remus against this host's libxen-dev"
        )
    return Binding(xenlib.ffi, xenlib.lib), None


def load(privcmd: Optional[str] = None, purpose: str = "use Xen here") -> Binding:
    """The binding, loaded once per process.

    ``purpose`` opens the error message ("cannot <purpose>: ...").

    Raises:
        XenUnavailable: Xen cannot be used from this process; the message
            lists every missing piece with its remedy.
    """
    global _binding
    with _lock:
        if _binding is not None:
            return _binding
        missing = problems(privcmd)
        binding, trouble = _import_binding()
        if trouble:
            missing.append(trouble)
        if missing:
            raise XenUnavailable(f"cannot {purpose}: " + "; ".join(missing))
        assert binding is not None
        _register_callbacks(binding)
        _binding = binding
        return binding


# --------------------------------------------------------------------------- save callbacks


class SaveCallbacks(Protocol):
    """What the object behind a save's ``data`` handle answers (see ``remus.xen.saver``)."""

    def on_suspend(self) -> int: ...

    def on_precopy_policy(self, iteration: int, total_written: int, dirty_count: int) -> int: ...

    def on_postcopy(self) -> int: ...

    def on_checkpoint(self) -> int: ...


def _register_callbacks(b: Binding) -> None:
    """Attach the ``extern "Python"`` save callbacks (``load`` does it once per process)."""
    ffi = b.ffi

    # onerror: an exception escaping a callback must not leave libxc waiting; returning 0
    # (-1 for the precopy policy, XGS_POLICY_ABORT) ends the save, and the error is logged.
    def failed(exc_type: Any, exc: BaseException, tb: Any) -> None:
        log.error("a save callback failed: %s: %s", getattr(exc_type, "__name__", exc_type), exc)

    def remus_save_suspend(data: Any) -> int:
        cb: SaveCallbacks = ffi.from_handle(data)
        return cb.on_suspend()

    def remus_save_precopy_policy(stats: Any, data: Any) -> int:
        cb: SaveCallbacks = ffi.from_handle(data)
        return cb.on_precopy_policy(stats.iteration, stats.total_written, stats.dirty_count)

    def remus_save_postcopy(data: Any) -> int:
        cb: SaveCallbacks = ffi.from_handle(data)
        return cb.on_postcopy()

    def remus_save_checkpoint(data: Any) -> int:
        cb: SaveCallbacks = ffi.from_handle(data)
        return cb.on_checkpoint()

    def remus_xtl_message(level: int, errnoval: int, context: Any, msg: Any) -> None:
        text = ffi.string(msg).decode("utf-8", "replace")
        where = ffi.string(context).decode("utf-8", "replace")
        xc_log.log(xtl_to_logging(b.lib, level, errnoval, text), "%s: %s", where, text)

    ffi.def_extern(error=0, onerror=failed)(remus_save_suspend)
    ffi.def_extern(error=-1, onerror=failed)(remus_save_precopy_policy)
    ffi.def_extern(error=0, onerror=failed)(remus_save_postcopy)
    ffi.def_extern(error=0, onerror=failed)(remus_save_checkpoint)
    ffi.def_extern(onerror=failed)(remus_xtl_message)


def xtl_to_logging(lib: Any, level: int, errnoval: int, text: str) -> int:
    """The ``logging`` level of a libxc message of ``xentoollog_level`` ``level``.

    libxc reports "Save failed (0 = Success)" at error level when a callback
    ended the save on purpose (remus stopping); that one is only informative.
    """
    if level >= lib.XTL_ERROR:
        if text.startswith("Save failed (0 = Success)"):
            return logging.DEBUG
        return logging.ERROR
    if level >= lib.XTL_WARN:
        return logging.WARNING
    return logging.DEBUG

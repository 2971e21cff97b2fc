"""libxenctrl and libxenguest handles: domain state, the cooperative resume, the save call.

``XenControl`` owns one ``xc_interface`` (whose messages go to Python's
logging through ``remus.xen.lib``) and offers the few operations the Xen domain needs:
``info`` (a domain's state as a ``DomInfo``), ``resume_fast``
(``xc_domain_resume(fast=1)``) and ``save_function``, which returns the
``run_save`` that ``remus.xen.saver.CheckpointSaver`` runs in its thread.
The save gets a handle of its own, so the engine's thread and libxc's never
share one.  Nothing here waits for a guest.
"""

from __future__ import annotations

import errno as errno_mod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from remus.errors import XenError
from remus.xen.lib import Binding

if TYPE_CHECKING:
    from remus.xen.saver import CheckpointSaver, SaveFunction

# SHUTDOWN_* (xen/include/public/sched.h), for messages.
SHUTDOWN_REASONS = {0: "poweroff", 1: "reboot", 2: "suspend", 3: "crash", 4: "watchdog", 5: "soft_reset"}
SHUTDOWN_suspend = 2


@dataclass(frozen=True)
class DomInfo:
    """What the hypervisor says about one domain right now."""

    domid: int
    dying: bool
    crashed: bool
    shutdown: bool
    shutdown_reason: int
    paused: bool
    hvm: bool
    nr_pages: int
    max_memkb: int
    vcpus: int

    @property
    def suspended(self) -> bool:
        """Shut down for a suspend (what ``xl list`` shows as ``s``)."""
        return self.shutdown and self.shutdown_reason == SHUTDOWN_suspend

    @property
    def state(self) -> str:
        """A short description for messages."""
        if self.dying:
            return "dying"
        if self.shutdown:
            return "shut down (" + SHUTDOWN_REASONS.get(self.shutdown_reason, str(self.shutdown_reason)) + ")"
        return "paused" if self.paused else "running"


class XenControl:
    """One libxenctrl handle (see the module docstring)."""

    def __init__(self, b: Binding) -> None:
        self._b = b
        self._logger = b.lib.remus_logger()  # static: nothing to free
        self._xch: Any = self._open()

    def _open(self) -> Any:
        return self._b.check_ptr(self._b.lib.xc_interface_open(self._logger, self._logger, 0),
                                 "xc_interface_open")

    def info(self, domid: int) -> Optional[DomInfo]:
        """The domain's state, or None if it does not exist (any more)."""
        b = self._b
        out = b.ffi.new("struct remus_dominfo *")
        rc = b.lib.remus_domain_info(self._xch, domid, out)
        if rc < 0:
            if b.ffi.errno == errno_mod.ESRCH:
                return None
            raise XenError("xc_domain_getinfo", rc, b.ffi.errno)
        return DomInfo(
            domid=out.domid, dying=bool(out.dying), crashed=bool(out.crashed),
            shutdown=bool(out.shutdown), shutdown_reason=out.shutdown_reason,
            paused=bool(out.paused), hvm=bool(out.hvm), nr_pages=out.nr_pages,
            max_memkb=out.max_memkb, vcpus=out.nr_online_vcpus,
        )

    def resume_fast(self, domid: int) -> None:
        """``xc_domain_resume(fast=1)``: the guest's suspend returns "cancelled" and it runs on."""
        self._b.check(self._b.lib.xc_domain_resume(self._xch, domid, 1), "xc_domain_resume")

    @property
    def handle(self) -> Any:
        """The raw ``xc_interface *`` (for libxenguest's suspend event channel helpers)."""
        return self._xch

    def save_function(self, domid: int) -> "SaveFunction":
        """The ``run_save`` of a checkpointed (``XC_STREAM_REMUS``), initially live save of ``domid``."""
        b = self._b

        def run_save(fd: int, callbacks: "CheckpointSaver") -> None:
            xch = self._open()
            try:
                handle = b.ffi.new_handle(callbacks)
                cbs = b.ffi.new("struct save_callbacks *")
                cbs.suspend = b.lib.remus_save_suspend
                cbs.precopy_policy = b.lib.remus_save_precopy_policy
                cbs.postcopy = b.lib.remus_save_postcopy
                cbs.checkpoint = b.lib.remus_save_checkpoint
                cbs.data = handle
                rc = b.lib.xc_domain_save(xch, fd, domid, b.lib.XCFLAGS_LIVE, cbs,
                                          b.lib.XC_STREAM_REMUS, -1)
                # When a callback ends the save by returning 0, libxc returns 0 as well.
                b.check(rc, "xc_domain_save")
            finally:
                b.lib.xc_interface_close(xch)

        return run_save

    def close(self) -> None:
        if self._xch is not None:
            self._b.lib.xc_interface_close(self._xch)
            self._xch = None

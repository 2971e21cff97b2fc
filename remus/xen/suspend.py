"""Asking a PV guest to suspend itself, and waiting until it has - never without a deadline.

Two ways, as libxl does it (libxl_dom_suspend.c, Xen 4.17):

* ``EvtchnSuspender``: the guest advertises a suspend event channel
  (``/local/domain/<d>/device/suspend/event-channel``); remus binds it once
  (``xc_suspend_evtchn_init_exclusive``), and each suspend notifies it and
  waits for the guest's answer on the same channel.
* ``XenstoreSuspender``: otherwise remus writes ``suspend`` to the guest's
  ``control/shutdown`` node and waits for the ``@releaseDomain`` watch.

Either way the suspend counts only once the hypervisor reports the domain shut
down with reason ``suspend``.  On a timeout a pending xenstore request is
withdrawn, so a guest that did not suspend keeps running.  Resuming is not done
here (``XenDomain.resume``).
"""

from __future__ import annotations

import logging
import select
import time
from typing import Any, Callable, Optional, Protocol

from remus.errors import DomainError
from remus.xen.control import DomInfo
from remus.xen.lib import Binding

log = logging.getLogger(__name__)

#: The watch remus waits on: xenstored fires it when a domain shuts down (or dies).
RELEASE_DOMAIN = "@releaseDomain"
_WATCH_TOKEN = "remus-suspend"
#: Re-read the domain's state at least this often while waiting, whatever the watch says.
_POLL_S = 0.05


class Suspender(Protocol):
    """Suspends one guest.  ``suspend`` raises ``DomainError`` when it did not suspend in time."""

    method: str

    def suspend(self, timeout_s: float) -> None: ...

    def close(self) -> None: ...


class StoreForSuspend(Protocol):
    def read(self, path: str) -> Optional[str]: ...

    def write(self, path: str, value: str) -> None: ...

    def watch(self, path: str, token: str) -> None: ...

    def unwatch(self, path: str, token: str) -> None: ...

    def drain_watches(self) -> int: ...

    def wait_watch(self, timeout_s: float) -> bool: ...


InfoFunction = Callable[[int], Optional[DomInfo]]


def wait_suspended(name: str, domid: int, info: InfoFunction, wait: Callable[[float], object],
                   deadline: float) -> bool:
    """Wait until ``domid`` is shut down for a suspend; False at ``deadline``.

    ``wait(seconds)`` blocks until something may have changed (a watch or event
    channel fired) or the time passed.

    Raises:
        DomainError: the domain vanished or shut down for another reason.
    """
    while True:
        state = info(domid)
        if state is None:
            raise DomainError(f"domain {name} ({domid}) disappeared while suspending")
        if state.suspended:
            return True
        if state.shutdown or state.dying:
            raise DomainError(f"domain {name} ({domid}) is {state.state} instead of suspended")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        wait(min(remaining, _POLL_S))


class XenstoreSuspender:
    """Suspend through ``control/shutdown`` (see the module docstring)."""

    method = "xenstore"

    def __init__(self, store: StoreForSuspend, info: InfoFunction, domid: int, name: str) -> None:
        self._store = store
        self._info = info
        self.domid = domid
        self.name = name
        self._control = f"/local/domain/{domid}/control/shutdown"
        store.watch(RELEASE_DOMAIN, _WATCH_TOKEN)
        self._watching = True

    def suspend(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        self._store.drain_watches()
        self._store.write(self._control, "suspend")
        if wait_suspended(self.name, self.domid, self._info, self._store.wait_watch, deadline):
            return
        # Withdraw the request if the guest has not taken it, as libxl does.
        if self._store.read(self._control) == "suspend":
            self._store.write(self._control, "")
        raise DomainError(
            f"domain {self.name} ({self.domid}) did not suspend within {timeout_s:.1f} s "
            f"(suspend request written to {self._control})"
        )

    def close(self) -> None:
        if self._watching:
            self._watching = False
            self._store.unwatch(RELEASE_DOMAIN, _WATCH_TOKEN)


class EventChannel(Protocol):
    """A bound suspend event channel (``BoundSuspendChannel`` below, or a fake)."""

    def notify(self) -> None: ...

    def wait(self, timeout_s: float) -> bool: ...

    def close(self) -> None: ...


class EvtchnSuspender:
    """Suspend through the guest's suspend event channel (see the module docstring)."""

    method = "event channel"

    def __init__(self, channel: EventChannel, info: InfoFunction, domid: int, name: str) -> None:
        self._channel = channel
        self._info = info
        self.domid = domid
        self.name = name

    def suspend(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        self._channel.notify()
        if not wait_suspended(self.name, self.domid, self._info, self._channel.wait, deadline):
            raise DomainError(
                f"domain {self.name} ({self.domid}) did not suspend within {timeout_s:.1f} s "
                "(notified its suspend event channel)"
            )

    def close(self) -> None:
        self._channel.close()


class BoundSuspendChannel:
    """The guest's suspend event channel, bound exclusively through libxenguest/libxenevtchn."""

    def __init__(self, b: Binding, xch: Any, domid: int, remote_port: int) -> None:
        self._b = b
        self._xch = xch
        self.domid = domid
        self._xce = b.check_ptr(b.lib.xenevtchn_open(b.ffi.NULL, 0), "xenevtchn_open")
        self._lockfd = b.ffi.new("int *", -1)
        try:
            self.port = b.check(
                b.lib.xc_suspend_evtchn_init_exclusive(xch, self._xce, domid, remote_port, self._lockfd),
                "xc_suspend_evtchn_init_exclusive",
            )
        except BaseException:
            b.lib.xenevtchn_close(self._xce)
            raise
        self._fd = b.check(b.lib.xenevtchn_fd(self._xce), "xenevtchn_fd")

    def notify(self) -> None:
        self._b.check(self._b.lib.xenevtchn_notify(self._xce, self.port), "xenevtchn_notify")

    def wait(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for the channel to fire; consume and unmask it if it did."""
        b = self._b
        readable, _, _ = select.select([self._fd], [], [], max(0.0, timeout_s))
        if not readable:
            return False
        port = b.check(b.lib.xenevtchn_pending(self._xce), "xenevtchn_pending")
        b.check(b.lib.xenevtchn_unmask(self._xce, port), "xenevtchn_unmask")
        return port == self.port

    def close(self) -> None:
        if self._xce is not None:
            b = self._b
            rc = b.lib.xc_suspend_evtchn_release(self._xch, self._xce, self.domid, self.port, self._lockfd)
            if rc < 0:
                log.warning("releasing the suspend event channel of domain %d failed", self.domid)
            b.lib.xenevtchn_close(self._xce)
            self._xce = None

"""A real Xen PV domain under protection: the ``Domain`` the engine drives on a Xen host.

``XenDomain`` puts together the pieces of ``remus.xen``: the xenstore handle
(``store``), the libxenctrl handle (``control``), a suspender (``suspend``)
and the checkpointed libxc save (``saver``).  Per checkpoint the engine calls::

    suspend()   let libxc reach its suspend callback (the first time: start
                the save, which first copies memory live), then suspend the
                guest and let the callback return
    capture()   wait until libxc wrote the epoch up to its CHECKPOINT record;
                return those records
    resume()    xc_domain_resume(fast=1) + xs_resume_domain, then let libxc's
                postcopy callback return

``close()`` ends the save and, whatever happened before (a stop, an error, a
suspend that landed after its deadline), leaves the guest running: it asks the
hypervisor, not its own bookkeeping, whether the guest is suspended.

``assemble`` builds one from open handles: it resolves the domain argument,
refuses what cannot be protected (dom0, HVM guests, a guest that is not
running), reads the domain's libxl configuration (which the session header
carries to the backup, so that it can recreate the domain) and picks the
suspender.  A domain with a writable disk that ``block-remus`` does not
serve is refused unless disk replication is off (``--no-disk``), and the
replicated disks become devices (``remus.disk.xen``); without a backup
(``--blackhole``) disks get one warning naming them.  ``devices`` holds the
guest's disks, then its network output through ``remus.netbuf`` (one plug per vif).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from typing import Any, Callable, Optional, Protocol, Sequence

from remus.devices import CheckpointDevice
from remus.domain import Capture, DomainInfo
from remus.errors import DomainError, RemusError, XlError
from remus.stream.records import Session
from remus.xen import store as xs
from remus.xen.control import DomInfo
from remus.xen.saver import CheckpointSaver, SaveFunction
from remus.xen.suspend import EventChannel, EvtchnSuspender, StoreForSuspend, Suspender, XenstoreSuspender

log = logging.getLogger(__name__)

#: How long a guest may take to suspend once asked (libxl allows 60 s; a Remus checkpoint
#: cannot wait that long).
SUSPEND_TIMEOUT_S = 10.0
#: After a suspend request timed out but the guest had taken it, how long ``close`` waits for
#: the late suspend so that it can resume the guest.
LATE_SUSPEND_S = 5.0
#: Bound on the domain's configuration in the session record (JSON-escaped), leaving room
#: there for everything else.
MAX_CONFIG_CHARS = Session.MAX_BODY - 4096


class Control(Protocol):
    """What ``XenDomain`` needs of libxenctrl (``remus.xen.control.XenControl``)."""

    def info(self, domid: int) -> Optional[DomInfo]: ...

    def resume_fast(self, domid: int) -> None: ...

    def close(self) -> None: ...


class Store(Protocol):
    """What ``XenDomain`` needs of xenstore (``remus.xen.store.XenStore``)."""

    def resume_domain(self, domid: int) -> None: ...

    def close(self) -> None: ...


class FullControl(Control, Protocol):
    """What ``assemble`` needs of libxenctrl: the above, and the save."""

    def save_function(self, domid: int) -> SaveFunction: ...


class FullStore(Store, xs.StoreReader, StoreForSuspend, Protocol):
    """What ``assemble`` needs of xenstore: reads, the suspend request, the watch."""


#: ``(net_buffering, interval_ms) -> devices``: a domain's network output buffers.
NetDevices = Callable[[bool, int], Sequence[CheckpointDevice]]


class XenDomain:
    """A Xen PV guest under protection (see the module docstring)."""

    def __init__(
        self,
        ref: xs.DomainRef,
        control: Control,
        store: Store,
        suspender: Suspender,
        saver: CheckpointSaver,
        *,
        details: Optional[dict[str, Any]] = None,
        net_devices: Optional[NetDevices] = None,
        suspend_timeout_s: float = SUSPEND_TIMEOUT_S,
    ) -> None:
        self.ref = ref
        self._control = control
        self._store = store
        self._suspender = suspender
        self._saver = saver
        self._details = dict(details or {}, domid=ref.domid, suspend=suspender.method)
        self._net_devices = net_devices
        self.suspend_timeout_s = suspend_timeout_s
        self._suspended = False
        self._closed = False
        self._holding = False
        self._late_suspend_possible = False
        self._suspend_requested = False

    # -- Domain protocol -----------------------------------------------------------------
    @property
    def info(self) -> DomainInfo:
        return DomainInfo("xen", self.ref.name, self._details)

    @property
    def suspended(self) -> bool:
        return self._suspended

    def devices(self, net_buffering: bool, interval_ms: int) -> Sequence[CheckpointDevice]:
        """One output plug per vif (none with ``net_buffering`` off).  Raises ``NetbufError``."""
        if self._net_devices is None:
            return []
        return self._net_devices(net_buffering, interval_ms)

    def prepare_suspend(self) -> None:
        """Wait for libxc to ask for the suspend (the first time: start the save and wait
        through its live precopy, the guest running).  Raises ``DomainError``."""
        if self._closed:
            raise DomainError(f"domain {self.ref.name}: already closed")
        if not self._suspend_requested:
            self._saver.wait_for_suspend_request()
            self._suspend_requested = True

    def suspend(self) -> None:
        """Suspend the guest at libxc's request (waiting for it, unless ``prepare_suspend``
        already did).  Raises ``DomainError``."""
        self.prepare_suspend()
        self._suspend_requested = False
        try:
            self._suspender.suspend(self.suspend_timeout_s)
        except BaseException:
            self._late_suspend_possible = True
            self._saver.answer_suspend(False)
            raise
        self._suspended = True
        self._saver.answer_suspend(True)

    def capture(self) -> Capture:
        """This epoch's libxc records, up to its CHECKPOINT record.  Raises ``DomainError``."""
        if not self._suspended:
            raise DomainError(f"domain {self.ref.name}: capture while the guest runs")
        return self._saver.wait_for_checkpoint()

    def resume(self) -> None:
        """Resume the guest (fast, cooperative), then let libxc go on.  Raises ``RemusError``."""
        self._resume_guest()
        self._suspended = False
        self._saver.answer_postcopy(True)

    def hold(self) -> str:
        """Pause the guest and keep it paused (the backup may be running it).  Raises ``RemusError``.

        A controller pause (``xl pause``) first, then, if a checkpoint left the
        guest suspended, the fast resume that ends the suspend: the pause outlives
        it, so ``xl unpause`` is all an admin needs to let it run again.  ``close``
        then ends the save without resuming anything.
        """
        from remus.xen import xl

        self._holding = True
        xl.pause(str(self.ref.domid))
        state = self._control.info(self.ref.domid)
        if state is not None and state.suspended:
            self._resume_guest()
            self._suspended = False
        return "paused"

    def close(self) -> None:
        """End the save, make sure the guest runs (unless held), free every handle.  Logs, never raises."""
        if self._closed:
            return
        self._closed = True
        with contextlib.ExitStack() as stack:
            stack.callback(self._control.close)
            stack.callback(self._store.close)
            stack.callback(self._suspender.close)
            if self._holding:
                self._saver.stop()
                return
            self._ensure_running("before ending the save")
            self._saver.stop()
            self._ensure_running("after ending the save")
            if self._late_suspend_possible:
                self._wait_late_suspend()

    # -- internals -----------------------------------------------------------------------
    def _resume_guest(self) -> None:
        domid = self.ref.domid
        self._control.resume_fast(domid)
        self._store.resume_domain(domid)

    def _ensure_running(self, when: str) -> bool:
        """Resume the guest if the hypervisor says it is suspended; True if it had to."""
        try:
            state = self._control.info(self.ref.domid)
            if state is None or not state.suspended:
                self._suspended = False
                return False
            log.info("domain %s is suspended %s: resuming it", self.ref.name, when)
            self._resume_guest()
            self._suspended = False
            return True
        except RemusError as exc:
            log.error("could not resume domain %s %s: %s", self.ref.name, when, exc)
            return False

    def _wait_late_suspend(self) -> None:
        deadline = time.monotonic() + LATE_SUSPEND_S
        while time.monotonic() < deadline:
            if self._ensure_running("after a late suspend"):
                return
            time.sleep(0.05)


def assemble(spec: str, store: FullStore, control: FullControl,
             bind_channel: Callable[[int, int], EventChannel], *,
             read_config: Optional[Callable[[int], str]] = None,
             disk_replication: Optional[bool] = None) -> XenDomain:
    """The ``XenDomain`` for the command line's domain argument, on open handles.

    ``bind_channel(domid, port)`` binds a guest's suspend event channel.
    ``read_config(domid)`` returns the domain's libxl configuration as JSON
    (``remus.xen.xl.domain_config``); without it the session carries none, and
    a backup refuses it.  ``disk_replication``: True to replicate the disks
    (refusing a writable one block-remus does not serve), False for
    ``--no-disk``, None when no backup will ever use them (``--blackhole``).
    The handles stay the caller's until this returns; then they are the domain's.

    Raises:
        DomainNotFound: no domain has that name or id.
        DomainError: it cannot be protected (dom0, an HVM guest, not running, its
            configuration cannot be read or is too large for the session record,
            a writable disk is not replicated).
        DiskError: a replicated disk's server is not running.
        XenError: a Xen call failed.
    """
    ref = xs.resolve_domain(store, spec)
    state = control.info(ref.domid)
    if state is None or state.dying or state.shutdown:
        raise DomainError(f"domain {ref.name} ({ref.domid}) is not running: "
                          f"{'gone' if state is None else state.state}")
    if state.hvm:
        raise DomainError(f"domain {ref.name} is an HVM guest: remus protects PV guests only")
    details: dict[str, Any] = {"dom_type": "pv", "max_memkb": state.max_memkb, "vcpus": state.vcpus}
    if read_config is not None:
        details["libxl_config"] = _config_of(ref, read_config)
    disks = xs.disks(store, ref.domid)
    if disks and disk_replication is None:
        log.warning("domain %s has disks that remus does not replicate: %s (not protected)",
                    ref.name, ", ".join(disks))
    disk_devices = _disk_devices(ref, store, disk_replication, details)

    def net_devices(net_buffering: bool, interval_ms: int) -> Sequence[CheckpointDevice]:
        from remus.netbuf import domain_devices

        return [*disk_devices, *domain_devices(store.read, store.directory, ref.domid,
                                               net_buffering=net_buffering, interval_ms=interval_ms)]

    port = xs.suspend_event_channel(store, ref.domid)
    suspender: Suspender
    if port is not None:
        suspender = EvtchnSuspender(bind_channel(ref.domid, port), control.info, ref.domid, ref.name)
    else:
        suspender = XenstoreSuspender(store, control.info, ref.domid, ref.name)
    # The first checkpoint includes libxc's live copy of all the guest's memory.
    precopy_timeout_s = max(600.0, 120.0 * state.max_memkb / (1 << 20))
    saver = CheckpointSaver(control.save_function(ref.domid), f"domain {ref.name}",
                            precopy_timeout_s=precopy_timeout_s)
    return XenDomain(
        ref, control, store, suspender, saver,
        details=details,
        net_devices=net_devices,
    )


def _disk_devices(ref: xs.DomainRef, store: FullStore, replicate: Optional[bool],
                  details: dict[str, Any]) -> list[CheckpointDevice]:
    """The replicated disks' devices (their entries go into ``details["disks"]``)."""
    if replicate is None:
        return []
    from remus.disk.control import ControlledDisk
    from remus.disk.xen import control_path, disk_policy, vbds

    chosen = disk_policy(ref.name, vbds(store, ref.domid), replicate)
    devices = [ControlledDisk(i, control_path(vbd)) for i, vbd in enumerate(chosen)]
    if devices:
        details["disks"] = [d.session_entry() for d in devices]
    return list(devices)


def _config_of(ref: xs.DomainRef, read_config: Callable[[int], str]) -> str:
    try:
        config = read_config(ref.domid)
    except XlError as exc:
        raise DomainError(f"cannot read the configuration of domain {ref.name}, which the backup "
                          f"needs to recreate it: {exc}") from None
    size = len(json.dumps(config))
    if size > MAX_CONFIG_CHARS:
        raise DomainError(f"the configuration of domain {ref.name} takes {size} bytes in the session "
                          f"record, more than the {MAX_CONFIG_CHARS} it can carry")
    return config

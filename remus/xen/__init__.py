"""Real Xen domains: ``open_xen_domain`` turns a domain name or id into a ``XenDomain``.

Importing this package loads nothing from Xen; ``open_xen_domain`` loads the
cffi binding (``remus.xen.lib``) and raises ``XenUnavailable`` when Xen cannot
be used here.  Modules: ``lib`` (binding, checks, callbacks), ``store``
(xenstore, domain lookup), ``control`` (libxenctrl/libxenguest), ``suspend``,
``saver`` (libxc's save loop meeting the engine's), ``domain`` (``XenDomain``).
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from remus.xen.domain import XenDomain

log = logging.getLogger(__name__)


def open_xen_domain(spec: str) -> "XenDomain":
    """The running Xen PV domain named ``spec`` (a name as in ``xl list``, or a numeric id).

    Raises:
        XenUnavailable: Xen cannot be used from this process (the message says why).
        DomainNotFound: no domain has that name or id.
        DomainError: the domain cannot be protected (dom0, HVM, not running).
        XenError: a Xen call failed.
    """
    from remus.errors import DomainError
    from remus.xen import lib, store
    from remus.xen.control import XenControl
    from remus.xen.domain import XenDomain
    from remus.xen.saver import CheckpointSaver
    from remus.xen.suspend import BoundSuspendChannel, EvtchnSuspender, Suspender, XenstoreSuspender

    b = lib.load(purpose=f"open Xen domain {spec!r}")
    with contextlib.ExitStack() as stack:
        xenstore = store.XenStore(b)
        stack.callback(xenstore.close)
        ref = store.resolve_domain(xenstore, spec)
        control = XenControl(b)
        stack.callback(control.close)
        state = control.info(ref.domid)
        if state is None or state.dying or state.shutdown:
            raise DomainError(f"domain {ref.name} ({ref.domid}) is not running: "
                              f"{'gone' if state is None else state.state}")
        if state.hvm:
            raise DomainError(f"domain {ref.name} is an HVM guest: remus protects PV guests only")
        disks = store.disks(xenstore, ref.domid)
        if disks:
            log.warning("domain %s has disks that remus does not replicate: %s (not protected)",
                        ref.name, ", ".join(disks))
        port = store.suspend_event_channel(xenstore, ref.domid)
        suspender: Suspender
        if port is not None:
            channel = BoundSuspendChannel(b, control.handle, ref.domid, port)
            suspender = EvtchnSuspender(channel, control.info, ref.domid, ref.name)
        else:
            suspender = XenstoreSuspender(xenstore, control.info, ref.domid, ref.name)
        stack.callback(suspender.close)
        saver = CheckpointSaver(control.save_function(ref.domid), f"domain {ref.name}")
        domain = XenDomain(
            ref, control, xenstore, suspender, saver,
            details={"dom_type": "pv", "max_memkb": state.max_memkb, "vcpus": state.vcpus},
            vifs=store.vifs(xenstore, ref.domid),
        )
        stack.pop_all()
        return domain
    raise AssertionError("unreachable")  # pragma: no cover - ExitStack does not swallow

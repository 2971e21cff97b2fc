"""Real Xen domains: ``open_xen_domain`` turns a domain name or id into a ``XenDomain``.

Importing this package loads nothing from Xen; ``open_xen_domain`` loads the
cffi binding (``remus.xen.lib``) and raises ``XenUnavailable`` when Xen cannot
be used here.  Modules: ``lib`` (binding, checks, callbacks), ``store``
(xenstore, domain lookup), ``control`` (libxenctrl/libxenguest), ``suspend``,
``saver`` (libxc's save loop meeting the engine's), ``domain`` (``XenDomain``),
``xl`` (running the xl command), and on the backup ``savefile`` (an xl save
file from the committed image) and ``restore`` (``xl restore`` of it).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from remus.xen.domain import XenDomain


def open_xen_domain(spec: str, *, for_backup: bool = True, disk_replication: bool = True) -> "XenDomain":
    """The running Xen PV domain named ``spec`` (a name as in ``xl list``, or a numeric id).

    With ``for_backup`` its libxl configuration is read (``xl list -l``) for the
    session header, so that a backup can recreate it; without (``--blackhole``)
    neither xl nor the configuration is needed, and disks are not looked at.
    ``disk_replication=False`` (``--no-disk``) protects a domain whose writable
    disks are not replicated (``remus.disk.xen.disk_policy``).

    Raises:
        XenUnavailable: Xen cannot be used from this process (the message says why).
        DomainNotFound: no domain has that name or id.
        DomainError: the domain cannot be protected (dom0, HVM, not running, its libxl
            configuration cannot be read when ``for_backup``).
        XenError: a Xen call failed.
    """
    from remus.xen import lib, xl
    from remus.xen.control import XenControl
    from remus.xen.domain import assemble
    from remus.xen.store import XenStore
    from remus.xen.suspend import BoundSuspendChannel

    b = lib.load(purpose=f"open Xen domain {spec!r}")
    with contextlib.ExitStack() as stack:
        xenstore = XenStore(b)
        stack.callback(xenstore.close)
        control = XenControl(b)
        stack.callback(control.close)
        domain = assemble(spec, xenstore, control,
                          lambda domid, port: BoundSuspendChannel(b, control.handle, domid, port),
                          read_config=xl.domain_config if for_backup else None,
                          disk_replication=disk_replication if for_backup else None)
        stack.pop_all()
        return domain
    raise AssertionError("unreachable")  # pragma: no cover - ExitStack does not swallow

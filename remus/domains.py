"""Which kinds of domain exist, and which one a command line's domain argument names.

Importing this module loads neither kind: each is imported when it is named.
"""

from __future__ import annotations

from remus.domain import Domain


def open_domain(spec: str, *, for_backup: bool = True, disk_replication: bool = True) -> Domain:
    """The domain named by a command line's domain argument.

    ``sim:NAME[,key=value...]`` is the built-in simulated domain; anything else
    is a Xen domain name or numeric id.  ``for_backup=False`` (``--blackhole``:
    no backup will ever restore it) skips what only a backup needs, such as a
    Xen domain's libxl configuration.  ``disk_replication=False`` (``--no-disk``)
    lets a Xen domain with unreplicated writable disks be protected.

    Raises:
        UsageError: a malformed ``sim:`` spec.
        XenUnavailable: a Xen domain was named but Xen cannot be used here.
        DomainNotFound: no Xen domain has that name or id.
    """
    if spec.startswith("sim:"):
        from remus.sim.domain import SimulatedDomain
        from remus.sim.spec import parse_sim_spec

        return SimulatedDomain(parse_sim_spec(spec))
    from remus.xen import open_xen_domain

    return open_xen_domain(spec, for_backup=for_backup, disk_replication=disk_replication)

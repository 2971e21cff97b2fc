"""Finding a Xen domain's network interfaces in dom0, from xenstore.

For each of the domain's vif devices the frontend's ``backend`` entry
(``/local/domain/<domid>/device/vif/<devid>/backend``) names the backend
directory (``/local/domain/0/backend/vif/<domid>/<devid>``), which holds
the interface's name in ``vifname`` when the domain's config set one; the
default is ``vif<domid>.<devid>`` (the xm-era code only ever assumed the
default).  An HVM guest's emulated NIC (backend ``type`` ``vif_ioemu``) also
has a tap device ``<name>-emu``, which carries the guest's traffic until its
PV drivers take over, so it is buffered too when it exists.

``vif_names`` is pure: it reads xenstore only through the two callables it
is given.  ``present_interfaces`` checks the names against the host's
interfaces (netifaces by default).  Nothing here creates or changes
anything.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable, Optional, Sequence

from remus.errors import NetbufError

#: Suffix of the tap device of an HVM guest's emulated NIC (libxl's TAP_DEVICE_SUFFIX).
EMULATED_SUFFIX = "-emu"

_BACKEND_RE = re.compile(r"/local/domain/(?P<backend>[0-9]+)/backend/vif/(?P<domid>[0-9]+)/(?P<devid>[0-9]+)\Z")


def _devid_key(devid: str) -> tuple[int, str]:
    return (int(devid), devid) if devid.isdigit() else (1 << 31, devid)


def vif_names(
    read: Callable[[str], Optional[str]],
    directory: Callable[[str], Sequence[str]],
    domid: int,
    backend_domid: int = 0,
) -> list[str]:
    """The names of domain ``domid``'s network interfaces in the backend domain, in devid order.

    ``read(path)`` returns a xenstore value or None when the path does not
    exist; ``directory(path)`` returns the entries under a path (empty when
    it does not exist).  Emulated-NIC tap names (``-emu``) come right after
    their vif.

    Raises:
        NetbufError: a vif's xenstore entries are missing or malformed, or
            its backend is in another domain (a driver domain) than
            ``backend_domid``, where remus cannot buffer it.
    """
    frontends = f"/local/domain/{domid}/device/vif"
    names: list[str] = []
    for devid in sorted(directory(frontends), key=_devid_key):
        backend = read(f"{frontends}/{devid}/backend")
        if not backend:
            raise NetbufError(f"domain {domid}'s vif {devid} has no backend entry in xenstore ({frontends}/{devid})")
        m = _BACKEND_RE.match(backend)
        if m is None or m["domid"] != str(domid) or m["devid"] != devid:
            raise NetbufError(f"domain {domid}'s vif {devid} has an unexpected backend path {backend!r}")
        if int(m["backend"]) != backend_domid:
            raise NetbufError(
                f"domain {domid}'s vif {devid} is served by domain {m['backend']} (a driver domain); "
                f"remus can only buffer interfaces whose backend is in domain {backend_domid} (run with --no-net)"
            )
        name = read(f"{backend}/vifname") or f"vif{domid}.{devid}"
        names.append(name)
        if read(f"{backend}/type") == "vif_ioemu":
            names.append(name + EMULATED_SUFFIX)
    return names


def _netifaces_interfaces() -> list[str]:
    import netifaces  # type: ignore[import-not-found,import-untyped,unused-ignore]

    return list(netifaces.interfaces())


def present_interfaces(
    names: Iterable[str], interfaces: Optional[Callable[[], Sequence[str]]] = None
) -> list[str]:
    """``names`` that exist on this host, checked with ``interfaces()`` (netifaces by default).

    A missing emulated-NIC tap (``-emu``) is left out: the guest has none
    (or no device model runs).  Any other missing name is an error.

    Raises:
        NetbufError: an interface does not exist.
    """
    lister = interfaces or _netifaces_interfaces
    existing = set(lister())
    wanted = list(names)
    missing = [n for n in wanted if n not in existing and not n.endswith(EMULATED_SUFFIX)]
    if missing:
        raise NetbufError(
            f"network interface{'s' if len(missing) > 1 else ''} {', '.join(missing)} not found on this host "
            "(is the domain's backend here, and its vif hotplug finished?)"
        )
    return [n for n in wanted if n in existing]

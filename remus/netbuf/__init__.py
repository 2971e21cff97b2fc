"""Network output buffering for Xen domains: each vif's output held in a kernel plug qdisc per epoch.

Modules: ``netlink`` (framing and the NETLINK_ROUTE socket), ``tc`` (the
rtnetlink messages, as data), ``plug`` (``PlugBuffer``, the checkpointed
device, and ``teardown``), ``owners`` (the ``/run/remus/netbuf`` ownership
records), ``vifs`` (a domain's interfaces from xenstore) and ``cleanup``
(leftovers of a remus that was killed).  No module here prints, and none
runs ``tc``, ``ip`` or libnl: everything is netlink messages from Python.

Wiring a Xen domain::

    names = vif_names(xs.read, xs.directory, domid)
    devices = devices_for(names, interval_ms)          # one PlugBuffer per interface

or ``domain_devices(...)``, which also honours ``--no-net``.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

from remus.devices import CheckpointDevice
from remus.netbuf.owners import DEFAULT_STATE_DIR
from remus.netbuf.plug import DEFAULT_RATE_BYTES_PER_S, PlugBuffer, plug_limit_bytes
from remus.netbuf.tc import PlugAction
from remus.netbuf.vifs import present_interfaces, vif_names

__all__ = [
    "DEFAULT_RATE_BYTES_PER_S",
    "DEFAULT_STATE_DIR",
    "PlugAction",
    "PlugBuffer",
    "devices_for",
    "domain_devices",
    "plug_limit_bytes",
    "present_interfaces",
    "vif_names",
]


def devices_for(
    ifnames: Sequence[str],
    interval_ms: int,
    *,
    rate_bytes_per_s: int = DEFAULT_RATE_BYTES_PER_S,
    state_dir: str = DEFAULT_STATE_DIR,
    interfaces: Optional[Callable[[], Sequence[str]]] = None,
) -> list[CheckpointDevice]:
    """One ``PlugBuffer`` per interface that exists, each sized by ``plug_limit_bytes``.

    Nothing is installed yet: the engine calls ``install``.

    Raises:
        NetbufError: an interface (other than an absent ``-emu`` tap) does not exist.
    """
    limit = plug_limit_bytes(interval_ms, rate_bytes_per_s)
    return [PlugBuffer(name, limit_bytes=limit, state_dir=state_dir) for name in present_interfaces(ifnames, interfaces)]


def domain_devices(
    read: Callable[[str], Optional[str]],
    directory: Callable[[str], Sequence[str]],
    domid: int,
    *,
    net_buffering: bool,
    interval_ms: int,
    interfaces: Optional[Callable[[], Sequence[str]]] = None,
) -> list[CheckpointDevice]:
    """A Xen domain's network buffers, or none at all with ``net_buffering`` off (``--no-net``).

    With buffering off neither xenstore nor the host's interfaces are looked at.

    Raises:
        NetbufError: as ``vif_names`` and ``devices_for``.
    """
    if not net_buffering:
        return []
    return devices_for(vif_names(read, directory, domid), interval_ms, interfaces=interfaces)

"""How the backup keeps a protected domain ready, and how it activates it: the one place.

For every session the server opens a ``Standby`` through ``open_standby``,
which picks by the session's kind:

* ``sim``: the simulated guest is started from the image only at activation,
  inside this process, and its memory must hash to the digest the primary
  computed when it captured that checkpoint.  Its ``output=`` file is opened
  at session start, so a path the receiver cannot write is refused then, not
  at takeover.
* ``xen``: a hot standby (``HotXenStandby``): ``xl migrate-receive -r`` keeps
  the domain paused as ``NAME--incoming``, fed every committed checkpoint
  (``remus.xen.standby``), and failover hands it the end of its stream.  The
  cold path stays behind it: when the standby could not be started, broke on
  the way, or fails to activate, the domain is restored with ``xl restore``
  from the image (``remus.xen.restore``; a test may pass its own
  ``restore_xen``, and then gets the cold path alone unless it also passes
  ``start_hot_xen``).  Either way the domain runs on its own afterwards and
  outlives the receiver.

A session that replicates disks gets its standby wrapped in ``DiskStandby``:
the replicas (``remus.disk.replica``) are handed over before the domain is
activated, and a Xen domain is restored with its disks moved to the replicas
when they live under ``--disk-root``.

``check_capacity`` refuses a session whose declared memory does not fit the
bound the receiver was given (``--max-memory``).  Nothing here prints or
touches sockets; failures are ``RemusError`` subclasses with one-line
messages.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, AbstractSet, Any, Callable, Mapping, Optional, Protocol

from remus.backup.image import Image
from remus.errors import ActivationError, RemusError, UsageError
from remus.stream.records import PAGE_SIZE

if TYPE_CHECKING:
    from remus.disk.replica import ReplicaSet

#: The pfns a Xen session may use when it does not say (64 GiB of address space).
XEN_PFN_SPACE = 16 << 20

#: ``restore_xen(session_info, image)`` recreates a Xen domain from the committed image and
#: returns what to report about it (``domid``, ``restore_s``, ...); see ``remus.xen.restore``.
XenRestorer = Callable[[Mapping[str, Any], Image], dict[str, Any]]

log = logging.getLogger(__name__)


class Standby(Protocol):
    """What the backup keeps beside the committed image for one protected domain."""

    def committed(self, image: Image, seq: int, changed_pfns: AbstractSet[int]) -> None:
        """Checkpoint ``seq`` is committed and acknowledged; keep the ready domain in step."""

    def activate(self) -> dict[str, Any]:
        """Failover: run the domain from the last committed checkpoint; details for the report.

        Raises:
            RemusError: the domain could not be activated (the message says what is left).
        """

    def discard(self) -> None:
        """Orderly close, refused or broken session: drop what was prepared; run nothing."""

    def close(self) -> None:
        """The receiver is stopping: stop a domain that runs inside it (a simulated guest)."""

    def warming(self) -> bool:
        """True while the ready domain has not yet taken in the first checkpoint: a failover
        now would be slow, so the receiver holds its acknowledgements (never for long: a
        standby that stays cold breaks and the cold path takes over)."""


def memory_of(info: Mapping[str, Any]) -> int:
    """The guest memory, in bytes, that a session declares.

    Raises:
        RemusError: the declaration is missing or malformed.
    """
    kind = info.get("kind")
    if kind == "sim":
        from remus.sim.domain import spec_from_session

        return spec_from_session(info).memory
    if kind == "xen":
        if "max_pages" not in info and "max_memkb" in info:
            # What remus sends: the domain's maximum memory (xc_domain_getinfo's max_memkb).
            max_memkb = info["max_memkb"]
            if not isinstance(max_memkb, int) or isinstance(max_memkb, bool) or max_memkb <= 0:
                raise UsageError(f"bad max_memkb {max_memkb!r}")
            return max_memkb * 1024
        max_pages = info.get("max_pages")
        if not isinstance(max_pages, int) or isinstance(max_pages, bool) or max_pages <= 0:
            raise UsageError(f"bad max_pages {max_pages!r}")
        return max_pages * PAGE_SIZE
    raise UsageError(f"unknown domain kind {kind!r}")


def pfn_bound(info: Mapping[str, Any]) -> int:
    """How many page frame numbers a session's pages may use (every pfn is below it).

    A simulated guest's pfns are exactly its pages.  A Xen PV guest's pfn space is sized
    by its own kernel (the p2m can reach far above its memory, for ballooning), so unless
    the session names ``max_pages`` it gets ``XEN_PFN_SPACE``; what it may *hold* is still
    bounded by its declared memory through ``check_capacity``.

    Raises:
        RemusError: the declaration is missing or malformed.
    """
    if info.get("kind") == "xen":
        max_pages = info.get("max_pages", XEN_PFN_SPACE)
        if not isinstance(max_pages, int) or isinstance(max_pages, bool) or max_pages <= 0:
            raise UsageError(f"bad max_pages {max_pages!r}")
        return max_pages
    return memory_of(info) // PAGE_SIZE


def check_capacity(info: Mapping[str, Any], max_memory: int) -> None:
    """Refuse a session whose declared guest memory is more than this host will hold.

    Raises:
        RemusError: over the bound (the message names ``--max-memory``).
    """
    memory = memory_of(info)
    if memory > max_memory:
        raise UsageError(
            f"it declares {_size(memory)} of guest memory, more than this receiver takes "
            f"({_size(max_memory)}; see remus-receiver --max-memory)"
        )


def default_max_memory() -> int:
    """Half of this host's MemAvailable (the image and one checkpoint in flight must fit)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 2
    except (OSError, ValueError, IndexError):
        pass
    return 1 << 30


def _size(n: int) -> str:
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return f"{n} bytes"


def open_standby(info: Mapping[str, Any], *, restore_xen: Optional[XenRestorer] = None,
                 disks: Optional["ReplicaSet"] = None, start_hot_xen: Optional["HotStarter"] = None) -> Standby:
    """The standby for a session that was just opened (``disks``: its disk replicas, if any;
    ``start_hot_xen``: how to start a Xen domain's hot standby, see the module docstring).

    Raises:
        RemusError: the session cannot be taken (the reason goes back to the primary).
    """
    standby = _open_domain_standby(info, restore_xen, disks, start_hot_xen)
    return standby if disks is None else DiskStandby(standby, disks)


def _open_domain_standby(info: Mapping[str, Any], restore_xen: Optional[XenRestorer],
                         disks: Optional["ReplicaSet"], start_hot_xen: Optional["HotStarter"]) -> Standby:
    kind = info.get("kind")
    if kind == "sim":
        return SimStandby(info)
    if kind == "xen":
        from remus.xen.savefile import DomainConfig

        DomainConfig.parse(info.get("libxl_config"))  # without it, no failover
        if disks is not None and isinstance(info.get("libxl_config"), str):
            from remus.disk.replica import retarget_config  # the domain runs on the replicas

            info = dict(info, libxl_config=retarget_config(info["libxl_config"], disks.path_map()))
        cold = ColdXenStandby(info, restore_xen)
        if start_hot_xen is None and restore_xen is None:
            start_hot_xen = _start_xen_standby
        return cold if start_hot_xen is None else HotXenStandby(info, cold, start_hot_xen)
    raise UsageError(f"unknown domain kind {kind!r}")


class DiskStandby:
    """A domain's standby plus its disk replicas: at activation the replicas, synced, are
    handed over first (refused if an apply failed half-way), then the domain is activated."""

    def __init__(self, inner: Standby, disks: "ReplicaSet") -> None:
        self.inner = inner
        self.disks = disks

    def committed(self, image: Image, seq: int, changed_pfns: AbstractSet[int]) -> None:
        self.inner.committed(image, seq, changed_pfns)

    def activate(self) -> dict[str, Any]:
        handed = self.disks.handover()
        return dict(self.inner.activate(), **handed)

    def discard(self) -> None:
        self.disks.close()
        self.inner.discard()

    def warming(self) -> bool:
        return self.inner.warming()

    def close(self) -> None:
        self.disks.close()
        self.inner.close()


class SimStandby:
    """A simulated guest: started from the image at activation, inside the receiver."""

    def __init__(self, info: Mapping[str, Any]) -> None:
        from remus.sim.domain import spec_from_session

        self.spec = spec_from_session(info)
        if self.spec.output is not None:
            _check_appendable(self.spec.output)
        self._image: Optional[Image] = None
        self.domain: Any = None

    def committed(self, image: Image, seq: int, changed_pfns: AbstractSet[int]) -> None:
        self._image = image

    def activate(self) -> dict[str, Any]:
        from remus.sim.domain import SimulatedDomain

        image = self._image
        if image is None or image.seq == 0:
            raise ActivationError("no committed checkpoint to activate")
        vcpu = image.sim_vcpu()
        if vcpu is None:
            raise ActivationError(f"checkpoint {image.seq} has no vCPU record")
        # activate() hashes the image and refuses it unless it matches the digest the
        # primary computed when it captured this checkpoint.
        self.domain = SimulatedDomain.activate(self.spec, image.memory(self.spec.pages), vcpu)
        return {"counter": vcpu.counter, "memory_digest": vcpu.memory_digest.hex(), "verified": True}

    def discard(self) -> None:
        self._image = None

    def warming(self) -> bool:
        return False

    def close(self) -> None:
        if self.domain is not None:
            self.domain.close()
            self.domain = None


class ColdXenStandby:
    """A Xen domain restored with ``xl restore`` from the committed image at activation."""

    def __init__(self, info: Mapping[str, Any], restore_xen: Optional[XenRestorer]) -> None:
        self.info = info
        self._restore = restore_xen
        self._image: Optional[Image] = None

    def committed(self, image: Image, seq: int, changed_pfns: AbstractSet[int]) -> None:
        self._image = image

    def activate(self) -> dict[str, Any]:
        if self._image is None or self._image.seq == 0:
            raise ActivationError("no committed checkpoint to activate")
        if self._restore is not None:
            return self._restore(self.info, self._image)
        from remus.xen.restore import restore_domain

        return restore_domain(self.info, self._image)

    def discard(self) -> None:
        self._image = None

    def warming(self) -> bool:
        return False

    def close(self) -> None:
        """A restored Xen domain runs on its own: nothing to stop."""


# ---- hot standby (issue 10) --------------------------------------------------------------------
class HotStandby(Protocol):
    """What ``remus.xen.standby.XenStandby`` offers (a Standby without ``close``)."""

    def committed(self, image: Image, seq: int, changed_pfns: AbstractSet[int]) -> None: ...

    def activate(self) -> dict[str, Any]: ...

    def discard(self) -> None: ...

    def warming(self) -> bool: ...


#: ``start_hot_xen(session_info)`` starts a hot standby (raises RemusError if it cannot).
HotStarter = Callable[[Mapping[str, Any]], HotStandby]


def _start_xen_standby(info: Mapping[str, Any]) -> HotStandby:
    from remus.xen.standby import XenStandby

    return XenStandby.start(info)


class HotXenStandby:
    """A Xen domain kept ready by ``xl migrate-receive -r``, with ``xl restore`` of the image behind it.

    The hot standby is started with the session; if it cannot be, the session
    goes on with the cold path alone (``cold_reason`` says why, and the
    activation's details carry it).  Activation tries the hot standby first;
    if that fails (it destroys what it prepared), the cold path restores the
    image.
    """

    def __init__(self, info: Mapping[str, Any], cold: ColdXenStandby, start: HotStarter) -> None:
        self.cold = cold
        self.cold_reason: Optional[str] = None
        self.hot: Optional[HotStandby] = None
        try:
            self.hot = start(info)
        except RemusError as exc:
            self.cold_reason = f"no hot standby: {exc}"
            log.warning("%s: %s; a failover would restore it with xl restore", info.get("domain"), self.cold_reason)

    def committed(self, image: Image, seq: int, changed_pfns: AbstractSet[int]) -> None:
        self.cold.committed(image, seq, changed_pfns)
        if self.hot is not None:
            self.hot.committed(image, seq, changed_pfns)

    def activate(self) -> dict[str, Any]:
        hot, self.hot = self.hot, None
        if hot is not None:
            try:
                return hot.activate()
            except RemusError as exc:
                self.cold_reason = f"the hot standby failed: {exc}"
                log.warning("%s; restoring with xl restore", self.cold_reason)
        details = self.cold.activate()
        details["standby"] = False
        details["cold_reason"] = self.cold_reason
        return details

    def discard(self) -> None:
        hot, self.hot = self.hot, None
        if hot is not None:
            hot.discard()
        self.cold.discard()

    def warming(self) -> bool:
        return self.hot is not None and self.hot.warming()

    def close(self) -> None:
        """A Xen domain runs on its own: nothing to stop."""
# ---- end of hot standby ---------------------------------------------------------------------------


def _check_appendable(path: str) -> None:
    """Refuse an ``output=`` file the receiver could not append to at takeover."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise UsageError(f"cannot open output file {path}: {exc.strerror or exc}") from None
    os.close(fd)


__all__ = [
    "ColdXenStandby", "DiskStandby", "HotStarter", "HotXenStandby", "RemusError", "SimStandby", "Standby",
    "XenRestorer", "check_capacity",
    "default_max_memory", "memory_of", "open_standby", "pfn_bound",
]

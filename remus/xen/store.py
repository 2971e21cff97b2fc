"""xenstore: the handle remus uses, and what it reads there about a domain.

``XenStore`` wraps one libxenstore handle (reads, writes, the watch remus
waits on, ``xs_resume_domain``).  The functions below it only read, through
the small ``StoreReader`` protocol, so they work on a fake store in tests:
``resolve_domain`` turns the command line's domain argument into an id and a
name the way xm did (a numeric id, or a name looked up under
``/local/domain``), and ``disks`` lists a domain's disks.
Nothing here suspends or resumes a guest.
"""

from __future__ import annotations

import errno as errno_mod
import select
from typing import NamedTuple, Optional, Protocol

from remus.errors import DomainError, DomainNotFound, XenError
from remus.xen.lib import Binding


class StoreReader(Protocol):
    """The reads ``resolve_domain`` and ``disks`` need (and ``remus.netbuf.vif_names``)."""

    def read(self, path: str) -> Optional[str]:
        """The value at ``path``, or None if there is none."""

    def directory(self, path: str) -> list[str]:
        """The children of ``path`` (empty if there is none)."""


class XenStore:
    """One open libxenstore handle.

    Raises ``XenError`` for failed calls (a missing path is not a failure: see
    ``read`` and ``directory``).
    """

    def __init__(self, b: Binding) -> None:
        self._b = b
        self._h = b.check_ptr(b.lib.xs_open(0), "xs_open")

    def read(self, path: str) -> Optional[str]:
        b = self._b
        length = b.ffi.new("unsigned int *")
        ptr = b.lib.xs_read(self._h, b.lib.XBT_NULL, path.encode(), length)
        if ptr == b.ffi.NULL:
            if b.ffi.errno == errno_mod.ENOENT:
                return None
            raise XenError("xs_read", 0, b.ffi.errno, path)
        try:
            return bytes(b.ffi.buffer(ptr, length[0])).decode("utf-8", "replace")
        finally:
            b.lib.free(ptr)

    def directory(self, path: str) -> list[str]:
        b = self._b
        num = b.ffi.new("unsigned int *")
        ptr = b.lib.xs_directory(self._h, b.lib.XBT_NULL, path.encode(), num)
        if ptr == b.ffi.NULL:
            if b.ffi.errno == errno_mod.ENOENT:
                return []
            raise XenError("xs_directory", 0, b.ffi.errno, path)
        try:
            return [b.ffi.string(ptr[i]).decode("utf-8", "replace") for i in range(num[0])]
        finally:
            b.lib.free(ptr)

    def write(self, path: str, value: str) -> None:
        data = value.encode()
        self._b.check_true(self._b.lib.xs_write(self._h, self._b.lib.XBT_NULL, path.encode(), data,
                                                len(data)), "xs_write")

    def watch(self, path: str, token: str) -> None:
        self._b.check_true(self._b.lib.xs_watch(self._h, path.encode(), token.encode()), "xs_watch")

    def unwatch(self, path: str, token: str) -> None:
        self._b.check_true(self._b.lib.xs_unwatch(self._h, path.encode(), token.encode()), "xs_unwatch")

    def drain_watches(self) -> int:
        """Consume the watch events already queued; how many there were."""
        b = self._b
        count = 0
        while True:
            ev = b.lib.xs_check_watch(self._h)
            if ev == b.ffi.NULL:
                if b.ffi.errno not in (0, errno_mod.EAGAIN):
                    raise XenError("xs_check_watch", 0, b.ffi.errno)
                return count
            b.lib.free(ev)
            count += 1

    def wait_watch(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for a watch event; True (and drained) if one came."""
        fd = self._b.check(self._b.lib.xs_fileno(self._h), "xs_fileno")
        readable, _, _ = select.select([fd], [], [], max(0.0, timeout_s))
        return bool(readable) and self.drain_watches() > 0

    def resume_domain(self, domid: int) -> None:
        """Tell xenstored the domain runs again (so its next shutdown fires @releaseDomain)."""
        self._b.check_true(self._b.lib.xs_resume_domain(self._h, domid), "xs_resume_domain")

    def close(self) -> None:
        if self._h is not None:
            self._b.lib.xs_close(self._h)
            self._h = None


# --------------------------------------------------------------------------- reading


class DomainRef(NamedTuple):
    domid: int
    name: str


def resolve_domain(store: StoreReader, spec: str) -> DomainRef:
    """The domain a command line names: a numeric id, or a name as in ``xl list``.

    Raises:
        DomainNotFound: no domain has that id or name.
        DomainError: it names dom0, which cannot be protected.
    """
    text = spec.strip()
    if text.isdigit():
        domid = int(text)
        name = store.read(f"/local/domain/{domid}/name")
        if name is None:
            raise DomainNotFound(f"domain {spec!r} does not exist (no domain has id {domid})")
        ref = DomainRef(domid, name)
    else:
        ref = _by_name(store, text, spec)
    if ref.domid == 0:
        raise DomainError(f"domain {spec!r} is dom0 ({ref.name}): remus protects guests, not dom0")
    return ref


def _by_name(store: StoreReader, name: str, spec: str) -> DomainRef:
    ids = sorted(int(d) for d in store.directory("/local/domain") if d.isdigit())
    for domid in ids:
        if store.read(f"/local/domain/{domid}/name") == name:
            return DomainRef(domid, name)
    raise DomainNotFound(f"domain {spec!r} does not exist")


def disks(store: StoreReader, domid: int) -> list[str]:
    """The guest's virtual disks, by the name its backend gives them (``xvda``), else ``vbd <devid>``.

    (A guest's network interfaces are ``remus.netbuf.vif_names``'s business.)
    """
    names = []
    base = f"/local/domain/{domid}/device/vbd"
    for devid in store.directory(base):
        backend = store.read(f"{base}/{devid}/backend")
        name = store.read(f"{backend}/dev") if backend else None
        names.append(name or f"vbd {devid}")
    return names


def suspend_event_channel(store: StoreReader, domid: int) -> Optional[int]:
    """The port of the guest's suspend event channel, if it advertises one."""
    value = store.read(f"/local/domain/{domid}/device/suspend/event-channel")
    if value is None or not value.strip().isdigit():
        return None
    return int(value)

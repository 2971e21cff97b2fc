"""Fakes for the Xen tests: a fake libxc save loop writing a synthetic v2 stream, a fake guest.

``FakeLibxc`` behaves like ``xc_domain_save(..., XC_STREAM_REMUS)`` in Xen 4.17
(xg_sr_save.c): headers, static records, live precopy rounds asking the precopy
policy, then per checkpoint ``suspend`` -> dirty PAGE_DATA + state records +
CHECKPOINT -> ``postcopy`` -> ``checkpoint``, ending when a callback answers 0.
``FakeGuest`` is the hypervisor's view of one PV domain (running or suspended).
"""

from __future__ import annotations

import errno
import os
import threading
import time
from typing import Callable, Optional

from remus.errors import XenError
from remus.stream.codec import encode_record
from remus.stream.records import (
    MAX_BATCH_PAGES,
    PAGE_SIZE,
    Checkpoint,
    DomainHeader,
    PageData,
    XenRecord,
    XenRecType,
)
from remus.xen.control import SHUTDOWN_suspend, DomInfo
from remus.xen.saver import XGS_POLICY_ABORT, XGS_POLICY_CONTINUE_PRECOPY, CheckpointSaver
from remus.xen.store import DomainRef

GUEST_PAGES = 64


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def pages(pfns: list[int]) -> PageData:
    return PageData(tuple(pfns), tuple(bytes([pfn % 256]) * PAGE_SIZE for pfn in pfns))


class FakeLibxc:
    """A ``run_save`` for ``CheckpointSaver`` (see the module docstring).

    ``fail`` names a point (``"copy"``: while the guest is suspended, after
    ``suspend`` answered) where the save raises ``XenError`` like a failed
    ``xc_domain_save``.  ``precopy_forever`` keeps the live phase going until
    the policy answers ABORT.  ``calls`` records the callbacks and answers.
    """

    def __init__(self, dirty_per_checkpoint: int = 3, fail: Optional[str] = None,
                 precopy_forever: bool = False, garbage: bool = False, guest_pages: int = GUEST_PAGES,
                 content: Callable[[list[int]], PageData] = pages) -> None:
        self.guest_pages = guest_pages
        self.content = content
        self.dirty = dirty_per_checkpoint
        self.fail = fail
        self.precopy_forever = precopy_forever
        self.garbage = garbage
        self.calls: list[tuple[str, int]] = []
        self.returned: Optional[int] = None
        self.checkpoints = 0

    def __call__(self, fd: int, cb: CheckpointSaver) -> None:
        if self.garbage:
            write_all(fd, b"\x00" * 40)
            time.sleep(0.05)
            write_all(fd, b"\x00" * 4096)
            return
        write_all(fd, DomainHeader(1, 4, 17).encode_body())
        write_all(fd, encode_record(XenRecord(XenRecType.X86_PV_INFO, b"\x08" + b"\x00" * 7)))
        write_all(fd, encode_record(XenRecord(XenRecType.STATIC_DATA_END, b"")))
        iteration = 0
        while True:  # live precopy
            decision = cb.on_precopy_policy(iteration, iteration * self.guest_pages,
                                            -1 if iteration else self.guest_pages)
            self.calls.append(("precopy_policy", decision))
            if decision == XGS_POLICY_ABORT:
                raise XenError("xc_domain_save", -1, errno.EINTR, "precopy aborted")
            sent = list(range(self.guest_pages)) if iteration == 0 else [1, 2]
            for start in range(0, len(sent), MAX_BATCH_PAGES):  # libxc's records hold as many at most
                write_all(fd, encode_record(self.content(sent[start : start + MAX_BATCH_PAGES])))
            if decision != XGS_POLICY_CONTINUE_PRECOPY and not self.precopy_forever:
                break
            iteration += 1
            time.sleep(0.01)
        while True:
            answer = cb.on_suspend()
            self.calls.append(("suspend", answer))
            if answer == 0:
                raise XenError("xc_domain_save", -1, 0, "save callback suspend() failed")
            if self.fail == "copy":
                raise XenError("xc_domain_save", -1, errno.EIO, "writing the page data failed")
            write_all(fd, encode_record(self.content(list(range(10, 10 + self.dirty)))))
            write_all(fd, encode_record(XenRecord(XenRecType.SHARED_INFO, b"\x00" * PAGE_SIZE)))
            write_all(fd, encode_record(Checkpoint()))
            self.checkpoints += 1
            answer = cb.on_postcopy()
            self.calls.append(("postcopy", answer))
            if answer <= 0:
                self.returned = 0
                return
            answer = cb.on_checkpoint()
            self.calls.append(("checkpoint", answer))
            if answer <= 0:
                self.returned = 0  # "Save failed (0 = Success)", and xc_domain_save returns 0
                return


class FakeGuest:
    """The hypervisor's and xenstore's view of one PV guest (control, store and suspender)."""

    method = "fake"

    def __init__(self, domid: int = 7, suspend_fails: bool = False) -> None:
        self.domid = domid
        self.is_suspended = False
        self.suspend_fails = suspend_fails
        self.log: list[str] = []
        self.closed: list[str] = []
        self.lock = threading.Lock()

    # control
    def info(self, domid: int) -> Optional[DomInfo]:
        assert domid == self.domid
        return DomInfo(domid=domid, dying=False, crashed=False, shutdown=self.is_suspended,
                       shutdown_reason=SHUTDOWN_suspend, paused=False, hvm=False, nr_pages=GUEST_PAGES,
                       max_memkb=GUEST_PAGES * 4, vcpus=1)

    def resume_fast(self, domid: int) -> None:
        self.log.append("resume")
        self.is_suspended = False

    # store
    def resume_domain(self, domid: int) -> None:
        self.log.append("xs_resume")

    # suspender
    def suspend(self, timeout_s: float) -> None:
        self.log.append("suspend")
        if self.suspend_fails:
            from remus.errors import DomainError

            raise DomainError("guest did not suspend")
        self.is_suspended = True

    def close(self) -> None:
        self.closed.append("closed")


def make_domain(libxc: FakeLibxc, guest: Optional[FakeGuest] = None,
                **timeouts: float) -> tuple["XenDomainT", FakeGuest]:
    from remus.xen.domain import XenDomain

    guest = guest or FakeGuest()
    options = dict(precopy_timeout_s=5.0, step_timeout_s=5.0, answer_timeout_s=5.0, join_timeout_s=5.0)
    options.update(timeouts)
    saver = CheckpointSaver(libxc, "domain test", **options)
    domain = XenDomain(DomainRef(guest.domid, "test"), guest, guest, guest, saver)
    return domain, guest


XenDomainT = "remus.xen.domain.XenDomain"
Waiter = Callable[[], bool]


def eventually(cond: Waiter, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return cond()

"""Suspending a guest through xenstore or its suspend event channel, against fakes."""

from __future__ import annotations

from typing import Optional

import pytest

from remus.errors import DomainError
from remus.xen.control import SHUTDOWN_suspend, DomInfo
from remus.xen.suspend import RELEASE_DOMAIN, EvtchnSuspender, XenstoreSuspender

CONTROL = "/local/domain/5/control/shutdown"


class Guest:
    """Hypervisor state of domain 5; ``behaviour`` says what it does with a suspend request."""

    def __init__(self, behaviour: str = "suspend") -> None:
        self.behaviour = behaviour
        self.shutdown = False
        self.reason = SHUTDOWN_suspend

    def info(self, domid: int) -> Optional[DomInfo]:
        if self.behaviour == "vanish" and self.shutdown:
            return None
        return DomInfo(domid=domid, dying=False, crashed=False, shutdown=self.shutdown,
                       shutdown_reason=self.reason, paused=False, hvm=False, nr_pages=1,
                       max_memkb=4, vcpus=1)

    def asked(self) -> bool:
        """React to a request; True if the guest took it."""
        if self.behaviour == "ignore":
            return False
        self.shutdown = True
        if self.behaviour == "poweroff":
            self.reason = 0
        return True


class Store:
    def __init__(self, guest: Guest) -> None:
        self.guest = guest
        self.nodes: dict[str, str] = {}
        self.writes: list[tuple[str, str]] = []
        self.watches: set[tuple[str, str]] = set()
        self.pending = 0

    def read(self, path: str) -> Optional[str]:
        return self.nodes.get(path)

    def write(self, path: str, value: str) -> None:
        self.writes.append((path, value))
        self.nodes[path] = value
        if path == CONTROL and value == "suspend" and self.guest.asked():
            self.nodes[path] = ""  # the guest acknowledges by clearing the node
            self.pending += 1  # and xenstored fires @releaseDomain

    def watch(self, path: str, token: str) -> None:
        self.watches.add((path, token))

    def unwatch(self, path: str, token: str) -> None:
        self.watches.remove((path, token))

    def drain_watches(self) -> int:
        n, self.pending = self.pending, 0
        return n

    def wait_watch(self, timeout_s: float) -> bool:
        return self.drain_watches() > 0


def test_xenstore_suspend() -> None:
    guest = Guest()
    store = Store(guest)
    s = XenstoreSuspender(store, guest.info, 5, "domu")
    assert (RELEASE_DOMAIN, "remus-suspend") in store.watches
    s.suspend(1.0)
    assert store.writes == [(CONTROL, "suspend")]
    s.close()
    s.close()
    assert not store.watches


def test_xenstore_suspend_timeout_withdraws_the_request() -> None:
    guest = Guest("ignore")
    store = Store(guest)
    s = XenstoreSuspender(store, guest.info, 5, "domu")
    with pytest.raises(DomainError, match="did not suspend within 0.1 s"):
        s.suspend(0.1)
    assert store.writes == [(CONTROL, "suspend"), (CONTROL, "")]


@pytest.mark.parametrize("behaviour, message", [("poweroff", "poweroff"), ("vanish", "disappeared")])
def test_a_guest_that_does_something_else_is_an_error(behaviour: str, message: str) -> None:
    guest = Guest(behaviour)
    s = XenstoreSuspender(Store(guest), guest.info, 5, "domu")
    with pytest.raises(DomainError, match=message):
        s.suspend(1.0)


class Channel:
    def __init__(self, guest: Guest) -> None:
        self.guest = guest
        self.fired = False
        self.closed = False

    def notify(self) -> None:
        self.fired = self.guest.asked()

    def wait(self, timeout_s: float) -> bool:
        fired, self.fired = self.fired, False
        return fired

    def close(self) -> None:
        self.closed = True


def test_event_channel_suspend() -> None:
    guest = Guest()
    channel = Channel(guest)
    s = EvtchnSuspender(channel, guest.info, 5, "domu")
    s.suspend(1.0)
    assert guest.shutdown
    s.close()
    assert channel.closed


def test_event_channel_suspend_timeout() -> None:
    guest = Guest("ignore")
    s = EvtchnSuspender(Channel(guest), guest.info, 5, "domu")
    with pytest.raises(DomainError, match="event channel"):
        s.suspend(0.1)

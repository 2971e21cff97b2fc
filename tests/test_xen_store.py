"""Reading a domain out of xenstore: name/id resolution and device lists, on a fake store."""

from __future__ import annotations

from typing import Optional

import pytest

from remus.errors import DomainError, DomainNotFound
from remus.xen.store import DomainRef, disks, resolve_domain, suspend_event_channel


class FakeStore:
    def __init__(self, tree: dict[str, str]) -> None:
        self.tree = tree

    def read(self, path: str) -> Optional[str]:
        return self.tree.get(path)

    def directory(self, path: str) -> list[str]:
        prefix = path.rstrip("/") + "/"
        children = {p[len(prefix):].split("/")[0] for p in self.tree if p.startswith(prefix)}
        return sorted(children)


STORE = FakeStore({
    "/local/domain/0/name": "Domain-0",
    "/local/domain/3/name": "domu",
    "/local/domain/3/device/vbd/51712/backend": "/local/domain/0/backend/vbd/3/51712",
    "/local/domain/0/backend/vbd/3/51712/dev": "xvda",
    "/local/domain/3/device/vbd/51728/backend": "/local/domain/0/backend/vbd/3/51728",
    "/local/domain/3/device/vif/0/backend": "/local/domain/0/backend/vif/3/0",
    "/local/domain/0/backend/vif/3/0/vifname": "vif3.0",
    "/local/domain/3/device/vif/1/backend": "/local/domain/0/backend/vif/3/1",
    "/local/domain/12/name": "other",
    "/local/domain/12/device/suspend/event-channel": "9",
})


@pytest.mark.parametrize("spec, ref", [
    ("domu", DomainRef(3, "domu")),
    ("3", DomainRef(3, "domu")),
    (" 12 ", DomainRef(12, "other")),
    ("other", DomainRef(12, "other")),
])
def test_resolve_by_name_or_id(spec: str, ref: DomainRef) -> None:
    assert resolve_domain(STORE, spec) == ref


@pytest.mark.parametrize("spec", ["nosuch", "4", "Domu", "3x"])
def test_unknown_domains_are_one_line_errors(spec: str) -> None:
    with pytest.raises(DomainNotFound) as info:
        resolve_domain(STORE, spec)
    assert "\n" not in str(info.value)
    assert repr(spec) in str(info.value)


@pytest.mark.parametrize("spec", ["0", "Domain-0"])
def test_dom0_is_refused(spec: str) -> None:
    with pytest.raises(DomainError, match="dom0"):
        resolve_domain(STORE, spec)


def test_devices() -> None:
    assert disks(STORE, 3) == ["xvda", "vbd 51728"]
    assert disks(STORE, 12) == []


def test_suspend_event_channel() -> None:
    assert suspend_event_channel(STORE, 12) == 9
    assert suspend_event_channel(STORE, 3) is None
    assert suspend_event_channel(FakeStore({"/local/domain/5/device/suspend/event-channel": ""}), 5) is None

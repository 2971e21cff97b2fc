"""Finding a domain's vifs from xenstore (fake accessors), and --no-net installing nothing."""

from typing import Dict, List, Optional

import pytest

from remus.errors import NetbufError
from remus.netbuf import domain_devices, present_interfaces, vif_names


class FakeXenstore:
    def __init__(self, entries: Dict[str, str]) -> None:
        self.entries = entries
        self.reads: List[str] = []

    def read(self, path: str) -> Optional[str]:
        self.reads.append(path)
        return self.entries.get(path)

    def directory(self, path: str) -> List[str]:
        self.reads.append(path)
        prefix = path.rstrip("/") + "/"
        return sorted({p[len(prefix):].split("/")[0] for p in self.entries if p.startswith(prefix)})


def vif(domid: int, devid: int, **backend: str) -> Dict[str, str]:
    bpath = f"/local/domain/0/backend/vif/{domid}/{devid}"
    entries = {f"/local/domain/{domid}/device/vif/{devid}/backend": bpath, f"{bpath}/handle": str(devid)}
    entries.update({f"{bpath}/{k}": v for k, v in backend.items()})
    return entries


def test_default_names_in_devid_order() -> None:
    xs = FakeXenstore({**vif(3, 10), **vif(3, 2), **vif(3, 0)})
    assert vif_names(xs.read, xs.directory, 3) == ["vif3.0", "vif3.2", "vif3.10"]


def test_configured_vifname_wins() -> None:
    xs = FakeXenstore({**vif(3, 0, vifname="web-eth0"), **vif(3, 1)})
    assert vif_names(xs.read, xs.directory, 3) == ["web-eth0", "vif3.1"]


def test_emulated_nic_tap_follows_its_vif() -> None:
    xs = FakeXenstore(vif(4, 0, type="vif_ioemu"))
    assert vif_names(xs.read, xs.directory, 4) == ["vif4.0", "vif4.0-emu"]


def test_no_vifs() -> None:
    assert vif_names(FakeXenstore({}).read, FakeXenstore({}).directory, 3) == []


def test_missing_backend_entry() -> None:
    xs = FakeXenstore({"/local/domain/3/device/vif/0/state": "4"})
    with pytest.raises(NetbufError, match="vif 0 has no backend entry"):
        vif_names(xs.read, xs.directory, 3)


def test_driver_domain_backend_is_refused() -> None:
    xs = FakeXenstore({"/local/domain/3/device/vif/0/backend": "/local/domain/7/backend/vif/3/0"})
    with pytest.raises(NetbufError, match="served by domain 7 .a driver domain."):
        vif_names(xs.read, xs.directory, 3)


@pytest.mark.parametrize("backend", ["/local/domain/0/backend/vif/4/0", "/local/domain/0/backend/vbd/3/0", "garbage"])
def test_malformed_backend_path(backend: str) -> None:
    xs = FakeXenstore({"/local/domain/3/device/vif/0/backend": backend})
    with pytest.raises(NetbufError, match="unexpected backend path"):
        vif_names(xs.read, xs.directory, 3)


def test_present_interfaces_drops_only_absent_emu_taps() -> None:
    assert present_interfaces(["vif4.0", "vif4.0-emu"], lambda: ["vif4.0"]) == ["vif4.0"]
    with pytest.raises(NetbufError, match="interfaces vif4.0, vif4.1 not found"):
        present_interfaces(["vif4.0", "vif4.1"], lambda: [])


def test_no_net_installs_nothing_and_reads_nothing() -> None:
    xs = FakeXenstore(vif(3, 0))

    def no_interfaces() -> List[str]:
        raise AssertionError("--no-net must not look at interfaces")

    assert domain_devices(xs.read, xs.directory, 3, net_buffering=False, interval_ms=200,
                          interfaces=no_interfaces) == []
    assert xs.reads == []


def test_domain_devices_with_buffering() -> None:
    xs = FakeXenstore({**vif(3, 0), **vif(3, 1, vifname="eth-b")})
    devices = domain_devices(xs.read, xs.directory, 3, net_buffering=True, interval_ms=100,
                             interfaces=lambda: ["vif3.0", "eth-b"])
    assert [d.name for d in devices] == ["plug:vif3.0", "plug:eth-b"]

"""The receiver with a Xen session: failover goes to the Xen restorer, with the last
committed checkpoint; its result or its failure is reported in one line."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any, Mapping

import pytest

from remus.errors import ActivationError
from remus.backup.image import Image
from remus.stream.codec import encode_record
from remus.stream.records import Ack, Close, CloseReason
from tests.helpers import SealedClient
from tests.test_transport import ReceiverThread
from tests.xen_stream import CONFIG, STATE_TYPES, xen_session


class FakeRestorer:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.calls: list[tuple[Mapping[str, Any], int, list[int]]] = []

    def __call__(self, info: Mapping[str, Any], image: Image) -> dict[str, Any]:
        self.calls.append((info, image.seq, [r.TYPE for r in image.state_records()]))
        if self.fail:
            raise ActivationError("xl restore of domu failed (exit status 3): boom; no domain was left behind")
        return {"domid": 42, "name": "domu", "restore_s": 1.25}


def send_and_drop(port: int, data: bytes, backup: ReceiverThread, commits: int) -> None:
    with SealedClient(port) as sock:
        sock.sendall(data)
        # Stay connected until the receiver committed everything (see test_transport).
        deadline = time.monotonic() + 15
        while sum(1 for e in list(backup.events) if e["event"] == "commit") < commits:
            assert time.monotonic() < deadline, backup.events
            time.sleep(0.02)


def test_a_lost_xen_primary_is_restored_from_its_last_committed_checkpoint() -> None:
    restorer = FakeRestorer()
    backup = ReceiverThread(restore_xen=restorer)
    stream, _guest = xen_session(3)
    partial, _ = xen_session(4)
    assert partial.startswith(stream)
    send_and_drop(backup.port, partial[: len(stream) + (len(partial) - len(stream)) // 2], backup, 3)
    event = backup.wait_event("activated")
    assert backup.finish() == 0
    assert event["domain"] == "xen:domu" and event["seq"] == 3
    assert event["domid"] == 42 and event["restore_s"] == 1.25
    [(info, seq, state_types)] = restorer.calls
    assert seq == 3 and info["libxl_config"] == CONFIG and state_types == STATE_TYPES
    [line] = [line for line in backup.lines if "activated" in line]
    assert "activated xen:domu from checkpoint 3 (" in line
    assert line.endswith("s old); it runs as domain 42, restored in 1.2 s")


def test_a_failed_xen_activation_is_one_line_and_exit_status_1() -> None:
    backup = ReceiverThread(restore_xen=FakeRestorer(fail=True))
    stream, _guest = xen_session(2)
    send_and_drop(backup.port, stream, backup, 2)
    event = backup.wait_event("activation-failed")
    assert backup.finish() == 1
    assert event["seq"] == 2 and "boom" in event["error"]
    [line] = [line for line in backup.lines if "FAILED" in line]
    assert "activating xen:domu from checkpoint 2 FAILED: xl restore of domu failed" in line


@pytest.mark.parametrize("config", [None, "{}"], ids=["none", "nameless"])
def test_a_xen_session_without_a_usable_config_is_refused_at_once(config: Any) -> None:
    restorer = FakeRestorer()
    backup = ReceiverThread(restore_xen=restorer)
    stream, _guest = xen_session(0, config=config)
    with SealedClient(backup.port) as sock:
        sock.sendall(stream)
        event = backup.wait_event("refused")
        reply = sock.read_all()
    assert "cannot take domain 'domu'" in event["reason"]
    assert "libxl configuration" in event["reason"] or "names no domain" in event["reason"]
    assert encode_record(Close(CloseReason.REFUSED, event["reason"])) in reply
    backup.stop.set("test")
    backup.thread.join(timeout=15)
    assert restorer.calls == []


def test_a_xen_domain_is_restored_on_its_disk_replica_at_the_committed_state(tmp_path: Any) -> None:
    import json

    config = json.dumps({"c_info": {"type": "pv", "name": "domu", "domid": 4},
                         "b_info": {"max_memkb": 64, "type.pv": {"kernel": "/boot/vmlinuz"}},
                         "disks": [{"pdev_path": "/img/domu.img", "vdev": "xvda", "script": "block-remus"}]})
    restorer = FakeRestorer()
    backup = ReceiverThread(restore_xen=restorer, disk_root=str(tmp_path))
    stream, _ = xen_session(3, config=config, disk="/img/domu.img")
    longer, _ = xen_session(4, config=config, disk="/img/domu.img")
    send_and_drop(backup.port, longer[: len(stream) + (len(longer) - len(stream)) // 2], backup, 3)
    event = backup.wait_event("activated")
    assert backup.finish() == 0
    replica = tmp_path / "img/domu.img"
    assert event["disks"] == [str(replica)] and event["disk_seq"] == 3
    [(info, seq, _types)] = restorer.calls
    assert json.loads(info["libxl_config"])["disks"][0]["pdev_path"] == str(replica)
    data = replica.read_bytes()
    assert data[512:2048] == b"\x01" * 512 + b"\x02" * 512 + b"\x03" * 512  # checkpoint 4 never committed
    assert data[2048:] == bytes(65536 - 2048)


class WarmingHot:
    """A hot standby that takes in the first checkpoint only when the test says so."""

    def __init__(self) -> None:
        self.warm = threading.Event()
        self.committed_seqs: list[int] = []

    def start(self, info: Mapping[str, Any]) -> "WarmingHot":
        return self

    def committed(self, image: Image, seq: int, changed_pfns: Any) -> None:
        self.committed_seqs.append(seq)

    def activate(self) -> dict[str, Any]:
        return {"domid": 7, "name": "domu", "restore_s": 0.1, "standby": True}

    def discard(self) -> None:
        pass

    def warming(self) -> bool:
        return bool(self.committed_seqs) and not self.warm.is_set()


def acks_in(plain: bytes) -> list[int]:
    """The checkpoints acknowledged in the receiver's replies, in the order they were sent."""
    found = [(plain.find(encode_record(Ack(seq))), seq) for seq in range(10)]
    return [seq for at, seq in sorted(found) if at >= 0]


def test_acks_wait_until_the_hot_standby_has_the_first_checkpoint() -> None:
    """Until the standby took in the first checkpoint a failover would be slow, so the primary
    hears heartbeats but no ACK of a checkpoint; then every held ACK goes, in order."""
    hot = WarmingHot()
    backup = ReceiverThread(restore_xen=FakeRestorer(), start_hot_xen=hot.start)
    stream, _guest = xen_session(3)
    with SealedClient(backup.port) as client:
        client.sendall(stream)
        deadline = time.monotonic() + 15
        while sum(1 for e in list(backup.events) if e["event"] == "commit") < 3:
            assert time.monotonic() < deadline, backup.events
            time.sleep(0.02)
        client.sock.settimeout(0.1)
        plain = b""

        def read_for(seconds: float) -> bytes:
            got = b""
            until = time.monotonic() + seconds
            while time.monotonic() < until:  # heartbeats keep coming: read for a while, not to EOF
                try:
                    data = client.sock.recv(65536)
                except socket.timeout:
                    continue
                assert data, f"the receiver closed the connection: {backup.lines}"
                got += b"".join(client.link.receive_data(data))
            return got

        plain += read_for(0.5)
        assert acks_in(plain) == [0]  # the session's opening only
        assert any(e["event"] == "session" for e in backup.events)
        hot.warm.set()
        while acks_in(plain)[-1:] != [3]:
            assert time.monotonic() < deadline, acks_in(plain)
            plain += read_for(0.1)
        assert acks_in(plain) == [0, 1, 2, 3]
        client.sendall(encode_record(Close(CloseReason.STOPPED, "done")))
    assert backup.finish() == 0
    assert hot.committed_seqs == [1, 2, 3]

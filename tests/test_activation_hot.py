"""The hot standby in ``remus.backup.activation``: a Xen session gets one when it can, with the
cold path (``xl restore`` of the image) behind it."""

from __future__ import annotations

from typing import AbstractSet, Any, Mapping, Optional

import pytest

from remus.backup.activation import ColdXenStandby, HotXenStandby, open_standby
from remus.backup.image import Image
from remus.backup.session import BackupSession, Committed
from remus.errors import ActivationError
from tests.xen_stream import xen_session


class FakeRestorer:
    def __init__(self) -> None:
        self.seqs: list[int] = []

    def __call__(self, info: Mapping[str, Any], image: Image) -> dict[str, Any]:
        self.seqs.append(image.seq)
        return {"domid": 42, "name": "domu", "restore_s": 1.25}


class FakeHot:
    def __init__(self, fail: Optional[str] = None) -> None:
        self.fail = fail
        self.calls: list[Any] = []
        self.pages: set[int] = set()

    def start(self, info: Mapping[str, Any]) -> "FakeHot":
        self.calls.append(("start", info["domain"]))
        if self.fail == "start":
            raise ActivationError("cannot run xl migrate-receive: no such file")
        return self

    def committed(self, image: Image, seq: int, changed_pfns: AbstractSet[int]) -> None:
        self.calls.append(("committed", seq))
        self.pages |= changed_pfns

    def activate(self) -> dict[str, Any]:
        self.calls.append(("activate",))
        if self.fail == "activate":
            raise ActivationError("xl migrate-receive of domu failed (exit status 1): boom")
        return {"domid": 9, "name": "domu", "restore_s": 0.5, "standby": True, "standby_seq": 3}

    def discard(self) -> None:
        self.calls.append(("discard",))

    def warming(self) -> bool:
        return False


def protect(standby: Any, checkpoints: int = 3) -> BackupSession:
    """Feed a session as the server does: every Committed output to the standby."""
    stream, _guest = xen_session(checkpoints)
    session = BackupSession()
    for output in session.receive_data(stream):
        if isinstance(output, Committed):
            standby.committed(session.image, output.seq, output.changed_pfns)
    return session


def test_a_xen_session_keeps_a_hot_standby_that_fails_over() -> None:
    hot, restorer = FakeHot(), FakeRestorer()
    session = BackupSession()
    stream, guest = xen_session(3)
    session.receive_data(stream[:2000])
    standby = open_standby(session.info, restore_xen=restorer, start_hot_xen=hot.start)
    assert isinstance(standby, HotXenStandby)
    protect(standby)
    details = standby.activate()
    assert details["domid"] == 9 and details["standby"] is True
    assert hot.calls[0] == ("start", "domu") and hot.calls[-1] == ("activate",)
    assert [c[1] for c in hot.calls if c[0] == "committed"] == [1, 2, 3]
    assert hot.pages == set(guest.memory)
    assert restorer.seqs == []  # the cold path is not used


def test_discard_reaches_the_hot_standby_and_activates_nothing() -> None:
    hot, restorer = FakeHot(), FakeRestorer()
    stream, _ = xen_session(0)
    session = BackupSession()
    session.receive_data(stream)
    standby = open_standby(session.info, restore_xen=restorer, start_hot_xen=hot.start)
    protect(standby, 2)
    standby.discard()
    assert hot.calls[-1] == ("discard",) and ("activate",) not in hot.calls and restorer.seqs == []


@pytest.mark.parametrize("fail", ["start", "activate"])
def test_without_a_working_hot_standby_the_cold_path_restores(fail: str) -> None:
    restorer = FakeRestorer()
    stream, _ = xen_session(0)
    session = BackupSession()
    session.receive_data(stream)
    standby = open_standby(session.info, restore_xen=restorer, start_hot_xen=FakeHot(fail).start)
    protect(standby, 2)
    details = standby.activate()
    assert details["domid"] == 42 and details["standby"] is False and restorer.seqs == [2]
    assert details["cold_reason"].startswith("no hot standby: cannot run xl migrate-receive" if fail == "start"
                                             else "the hot standby failed: xl migrate-receive of domu failed")


def test_a_test_restorer_alone_gets_the_cold_path() -> None:
    stream, _ = xen_session(0)
    session = BackupSession()
    session.receive_data(stream)
    assert isinstance(open_standby(session.info, restore_xen=FakeRestorer()), ColdXenStandby)

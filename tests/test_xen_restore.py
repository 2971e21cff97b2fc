"""Activating a Xen domain with ``xl restore``, against a fake xl (``tests/fake_xl.py``)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from remus.backup.session import BackupSession
from remus.errors import ActivationError, XlError
from remus.xen.restore import restore_domain
from remus.xen.savefile import DomainConfig, save_file
from tests.fake_xl import fake_xl  # noqa: F401 - a fixture
from tests.fake_xl import fake_xl_state as state
from tests.xen_stream import CONFIG, xen_session


def committed(checkpoints: int = 3) -> BackupSession:
    stream, _guest = xen_session(checkpoints)
    session = BackupSession()
    session.receive_data(stream)
    return session


def test_restore_streams_the_save_file_into_xl_restore(fake_xl: Path) -> None:
    session = committed()
    details = restore_domain(session.info, session.image)
    assert details["domid"] == 5 and details["name"] == "domu" and details["restore_s"] >= 0
    expected = b"".join(save_file(session.image, DomainConfig.parse(CONFIG)))
    assert (fake_xl / "restored.bin").read_bytes() == expected
    calls = state(fake_xl)["calls"]
    assert calls == [["domid", "domu"], ["restore", "/dev/stdin"], ["domid", "domu"]]


def test_a_taken_name_is_said_plainly_and_nothing_is_restored(fake_xl: Path) -> None:
    (fake_xl / "state.json").write_text(json.dumps({"domains": {"domu": 1}, "next": 5, "calls": []}))
    session = committed()
    with pytest.raises(ActivationError, match="a domain named domu already exists on this host \\(id 1\\)"):
        restore_domain(session.info, session.image)
    assert state(fake_xl)["calls"] == [["domid", "domu"]]


@pytest.mark.parametrize("how, left", [
    ("fail", "no domain was left behind"),
    ("fail-leave", "the half-restored domain domu \\(id 5\\) was destroyed"),
])
def test_a_failed_restore_says_why_in_xls_words_and_leaves_nothing(
        fake_xl: Path, monkeypatch: pytest.MonkeyPatch, how: str, left: str) -> None:
    monkeypatch.setenv("FAKE_XL_RESTORE", how)
    session = committed()
    with pytest.raises(ActivationError) as info:
        restore_domain(session.info, session.image)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("xl restore of domu failed (exit status 3): ")
    assert "cannot (re-)build domain: -3" in message and "Loading new save file" not in message
    assert re.search(left, message)
    assert state(fake_xl)["domains"] == {}


def test_a_restore_past_its_deadline_is_killed_and_its_domain_destroyed(
        fake_xl: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_XL_RESTORE", "hang")
    session = committed()
    with pytest.raises(ActivationError, match="did not finish within 1 s; the half-restored domain domu "
                                              "\\(id 5\\) was destroyed"):
        restore_domain(session.info, session.image, timeout_s=1.0)
    assert state(fake_xl)["domains"] == {}


def test_no_xl_on_this_host_is_said_plainly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    session = committed()
    with pytest.raises(XlError, match="the xl command is not installed on this host"):
        restore_domain(session.info, session.image)


def test_many_pages_go_through_in_several_writev_batches(fake_xl: Path) -> None:
    session = committed()
    image = session.image
    image.pages.update({pfn: (pfn, bytes([pfn % 251]) * 4096) for pfn in range(64, 3000)})
    restore_domain(session.info, image)
    expected = b"".join(save_file(image, DomainConfig.parse(CONFIG)))
    assert (fake_xl / "restored.bin").read_bytes() == expected


def test_write_all_resumes_after_partial_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from remus.xen.restore import write_all

    written = bytearray()

    def writev(fd: int, views: list) -> int:  # at most 5 bytes a call, like a busy pipe
        out = b"".join(bytes(v) for v in views)[:5]
        written.extend(out)
        return len(out)

    monkeypatch.setattr(os, "writev", writev)
    pieces = [b"abc", b"", b"defghijk", b"l", b"mnopqrstuvwxyz0123"]
    write_all(99, pieces)
    assert bytes(written) == b"".join(pieces)

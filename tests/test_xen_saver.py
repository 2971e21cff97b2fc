"""The rendezvous between libxc's save loop and the engine, driven by a fake libxc."""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest

from remus.errors import DomainError
from remus.stream.codec import encode_record
from remus.stream.records import Checkpoint, DomainHeader, PageData, XenRecord
from remus.xen.saver import (
    XGS_POLICY_ABORT,
    XGS_POLICY_CONTINUE_PRECOPY,
    XGS_POLICY_STOP_AND_COPY,
    CheckpointSaver,
    record_chunks,
)
from tests.xen_fakes import GUEST_PAGES, FakeLibxc, eventually, pages


def saver(libxc: FakeLibxc, **timeouts: float) -> CheckpointSaver:
    options = dict(precopy_timeout_s=5.0, step_timeout_s=5.0, answer_timeout_s=5.0, join_timeout_s=5.0)
    options.update(timeouts)
    return CheckpointSaver(libxc, "domain test", **options)


def one_checkpoint(s: CheckpointSaver):
    s.wait_for_suspend_request()
    s.answer_suspend(True)
    capture = s.wait_for_checkpoint()
    s.answer_postcopy(True)
    return capture


def test_epochs_are_cut_at_checkpoint_records() -> None:
    libxc = FakeLibxc(dirty_per_checkpoint=3)
    s = saver(libxc)
    try:
        first = one_checkpoint(s)
        second = one_checkpoint(s)
        third = one_checkpoint(s)
    finally:
        s.stop()
    # The first epoch opens with libxc's headers and holds the live precopy rounds.
    assert isinstance(first.records[0], DomainHeader)
    assert first.records[0].dom_type == 1 and (first.records[0].xen_major, first.records[0].xen_minor) == (4, 17)
    assert isinstance(first.records[-1], Checkpoint)
    assert first.dirty_pages > GUEST_PAGES + 3  # all memory, then the live rounds, then 3
    for later in (second, third):
        assert [type(r) for r in later.records] == [PageData, XenRecord, Checkpoint]
        assert later.dirty_pages == 3
    # libxc's thread saw every answer, and the stop answered its last checkpoint() with 0.
    assert libxc.calls[-1] == ("checkpoint", 0)
    assert libxc.returned == 0
    assert [c for c in libxc.calls if c[0] != "precopy_policy"] == [
        ("suspend", 1), ("postcopy", 1), ("checkpoint", 1),
        ("suspend", 1), ("postcopy", 1), ("checkpoint", 1),
        ("suspend", 1), ("postcopy", 1), ("checkpoint", 0),
    ]


def test_precopy_policy_mirrors_libxc_default_and_aborts_on_stop() -> None:
    s = saver(FakeLibxc())
    assert s.on_precopy_policy(0, 0, 5000) == XGS_POLICY_CONTINUE_PRECOPY
    assert s.on_precopy_policy(1, 5000, 49) == XGS_POLICY_STOP_AND_COPY
    assert s.on_precopy_policy(5, 5000, 1000) == XGS_POLICY_STOP_AND_COPY
    assert s.on_precopy_policy(2, 5000, -1) == XGS_POLICY_CONTINUE_PRECOPY
    s.stop()
    assert s.on_precopy_policy(0, 0, 5000) == XGS_POLICY_ABORT


def test_stop_before_start_is_harmless() -> None:
    s = saver(FakeLibxc())
    s.stop()
    s.stop()
    assert not s.started


def test_stop_during_precopy_aborts_the_save_and_unblocks_the_waiter() -> None:
    libxc = FakeLibxc(precopy_forever=True)
    s = saver(libxc)
    errors: list[BaseException] = []

    def engine() -> None:
        try:
            s.wait_for_suspend_request()
        except DomainError as exc:
            errors.append(exc)

    t = threading.Thread(target=engine)
    t.start()
    assert eventually(lambda: len(libxc.calls) >= 3)
    s.stop()
    t.join(5)
    assert not t.is_alive()
    assert errors and "libxc's save" in str(errors[0])
    assert libxc.calls[-1] == ("precopy_policy", XGS_POLICY_ABORT)


def test_a_failed_save_surfaces_in_the_waiting_engine_call() -> None:
    s = saver(FakeLibxc(fail="copy"))
    try:
        s.wait_for_suspend_request()
        s.answer_suspend(True)
        with pytest.raises(DomainError, match="xc_domain_save failed"):
            s.wait_for_checkpoint()
    finally:
        s.stop()


def test_a_refused_suspend_ends_the_save() -> None:
    libxc = FakeLibxc()
    s = saver(libxc)
    try:
        s.wait_for_suspend_request()
        s.answer_suspend(False)
        with pytest.raises(DomainError, match="suspend"):
            s.wait_for_checkpoint()
    finally:
        s.stop()
    assert ("suspend", 0) in libxc.calls


def test_a_malformed_stream_is_an_error_not_a_hang() -> None:
    s = saver(FakeLibxc(garbage=True))
    try:
        with pytest.raises(DomainError, match="stream could not be read|ended"):
            s.wait_for_suspend_request()
    finally:
        s.stop()


def test_engine_waits_have_deadlines() -> None:
    libxc = FakeLibxc(precopy_forever=True)
    s = saver(libxc, precopy_timeout_s=0.2)
    started = time.monotonic()
    try:
        with pytest.raises(DomainError, match="did not ask for a suspend within"):
            s.wait_for_suspend_request()
    finally:
        s.stop()
    assert time.monotonic() - started < 5


def test_libxc_callbacks_have_deadlines_too() -> None:
    libxc = FakeLibxc()
    s = saver(libxc, answer_timeout_s=0.2)
    try:
        s.wait_for_suspend_request()
        # The engine never answers: libxc's suspend() gives up with 0 and the save ends.
        assert eventually(lambda: ("suspend", 0) in libxc.calls)
        with pytest.raises(DomainError):
            s.wait_for_checkpoint()
    finally:
        s.stop()


def test_postcopy_answer_outside_postcopy_ends_the_save() -> None:
    libxc = FakeLibxc()
    s = saver(libxc)
    try:
        s.wait_for_suspend_request()
        s.answer_postcopy(True)  # an error path: the engine resumes without a capture
        s.answer_suspend(True)
        assert eventually(lambda: not any(t.is_alive() for t in s._threads))
    finally:
        s.stop()
    assert ("postcopy", 0) in libxc.calls or ("suspend", 0) in libxc.calls


def chunks_of(data: bytes, close: bool = True) -> list[bytes]:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(data)
        if close:
            a.shutdown(socket.SHUT_WR)
        return list(record_chunks(b, max_body=1 << 16))


def test_the_reader_cuts_the_stream_into_whole_records() -> None:
    header = DomainHeader(1, 4, 17).encode_body()
    records = [encode_record(XenRecord(2, b"\x01" * 5)), encode_record(Checkpoint()),
               encode_record(pages([1, 2, 3]))]
    assert chunks_of(header + b"".join(records)) == [header, *records, b""]


def test_the_reader_passes_truncated_and_oversized_records_on_for_the_decoder() -> None:
    header = DomainHeader(1, 4, 17).encode_body()
    record = encode_record(pages([1]))
    assert chunks_of(header + record[:100]) == [header, record[:100], b""]
    assert chunks_of(header[:10]) == [header[:10], b""]
    huge = struct.pack("<II", 1, 1 << 20)
    assert chunks_of(header + huge + b"x" * 64) == [header, huge, b""]

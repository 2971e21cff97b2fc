"""The stream format: golden bytes for every record, whole and byte-at-a-time feeding,
and typed errors for malformed input."""

from __future__ import annotations

import struct
from typing import Any

import pytest

from remus.errors import RemoteProtocolError
from remus.stream.codec import NEED_DATA, EndOfStream, StreamDecoder, encode_record
from remus.stream.records import (
    Ack,
    Checkpoint,
    Close,
    CloseReason,
    Commit,
    DomainHeader,
    Heartbeat,
    PageBatch,
    PageData,
    Session,
    SimVcpu,
    StreamHeader,
    XenRecord,
    page_type_has_data,
)

PAGE = bytes(range(256)) * 16


def h(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", "").replace("\n", ""))


# Each golden value is derived by hand from the layout in remus/stream/records.py:
# u32 type (LE), u32 body length (LE), body, zero padding to 8 octets.
GOLDEN: list[tuple[str, Any, bytes]] = [
    # marker ~0, id "RMUS", version 2, options 0, reserved 0 (big-endian like libxc's image header)
    ("stream-header", StreamHeader(), h("ffffffffffffffff 524d5553 00000002 0000 0000 00000000")),
    # type 0x52450006, length 8, u64 seq = 5
    ("ack", Ack(5), h("06004552 08000000 0500000000000000")),
    # type 0x52450007, length 8, u64 count = 1
    ("heartbeat", Heartbeat(1), h("07004552 08000000 0100000000000000")),
    # type 0x52450005, length 16, u64 seq 3, u32 records 2, u32 crc 0xdeadbeef
    ("commit", Commit(3, 2, 0xDEADBEEF, 1_700_000_000_123),
     h("05004552 18000000 0300000000000000 02000000 efbeadde 7b68e5cf8b010000")),
    # type 0x52450008, length 11, u32 reason 0, u32 reserved, "bye", 5 bytes of padding
    ("close", Close(CloseReason.STOPPED, "bye"), h("08004552 0b000000 00000000 00000000 627965 0000000000")),
    # libxc CHECKPOINT: type 0x0e, empty body
    ("checkpoint", Checkpoint(), h("0e000000 00000000")),
    # type 0x52450002, length 40: libxc image header (BE: marker, "XENF", version 3, options, reserved)
    # then domain header (LE: type 1 = x86 PV, page_shift 12, reserved, xen 4.17)
    ("domain-header", DomainHeader(1, 4, 17),
     h("02004552 28000000 ffffffffffffffff 58454e46 00000003 0000 0000 00000000"
       "01000000 0c00 0000 04000000 11000000")),
    # type 0x52450004, length 56: counter 1, rng 2, writes 3, 32-byte digest
    ("sim-vcpu", SimVcpu(1, 2, 3, b"\xaa" * 32),
     h("04004552 38000000 0100000000000000 0200000000000000 0300000000000000") + b"\xaa" * 32),
    # type 0x52450001, length 44 of compact sorted JSON, 4 bytes of padding
    ("session", Session({"domain": "d", "kind": "sim", "page_size": 4096}),
     h("01004552 2c000000") + b'{"domain":"d","kind":"sim","page_size":4096}' + bytes(4)),
    # an opaque libxc record (SHARED_INFO 0x07) of 3 bytes, 5 bytes of padding
    ("xen-record", XenRecord(0x07, b"\x01\x02\x03"), h("07000000 03000000 010203 0000000000")),
    # PAGE_DATA: type 1, length 8 + 2*8 + 4096: count 2, reserved, pfn 5 (NOTAB), pfn 7 of type
    # XTAB (0xf << 28, shifted up 32 bits: no data follows), then the one page
    ("page-data", PageData((5, 0xF000000000000007), (PAGE,)),
     h("01000000 18100000 02000000 00000000 0500000000000000 07000000000000f0")
     + PAGE),
    # page batch: type 0x52450003, length 44: count 2, data pages 2, frame length 4, reserved,
    # pfns 1 and 2, kinds FULL XOR + 6 bytes of padding, the 4 frame bytes, then 4 bytes of padding
    ("page-batch", PageBatch((1, 2), (1, 2), b"ZSTD"),
     h("03004552 2c000000 02000000 02000000 04000000 00000000 0100000000000000 0200000000000000"
       "0102000000000000 5a535444 00000000")),
]


@pytest.mark.parametrize("name,record,wire", GOLDEN, ids=[g[0] for g in GOLDEN])
def test_golden_bytes(name: str, record: Any, wire: bytes) -> None:
    encoded = record.encode() if isinstance(record, StreamHeader) else encode_record(record)
    assert encoded == wire


def test_the_xtab_pfn_word_is_what_the_golden_value_says() -> None:
    # (the golden PAGE_DATA above spells the second pfn word little-endian)
    assert struct.pack("<Q", 0xF000000000000007) == h("07000000000000f0")
    assert not page_type_has_data(0xF000000000000007) and page_type_has_data(5)


def stream_bytes() -> bytes:
    records = [g[1] for g in GOLDEN if not isinstance(g[1], StreamHeader)]
    return StreamHeader().encode() + b"".join(encode_record(r) for r in records)


def drain(decoder: StreamDecoder) -> list[Any]:
    return list(decoder.events())


def expected_events() -> list[Any]:
    return [g[1] for g in GOLDEN] + [EndOfStream(0)]


def test_decode_whole_stream() -> None:
    decoder = StreamDecoder()
    decoder.receive_data(stream_bytes())
    decoder.receive_data(b"")
    assert drain(decoder) == expected_events()


def test_decode_one_byte_at_a_time() -> None:
    decoder = StreamDecoder()
    events: list[Any] = []
    for byte in stream_bytes():
        decoder.receive_data(bytes([byte]))
        events += drain(decoder)
    decoder.receive_data(b"")
    events += drain(decoder)
    assert events == expected_events()


def test_eof_inside_a_record_reports_the_partial_bytes() -> None:
    data = stream_bytes()
    decoder = StreamDecoder()
    decoder.receive_data(data[:-3])
    decoder.receive_data(b"")
    events = drain(decoder)
    assert events[-1] == EndOfStream(len(encode_record(GOLDEN[-1][1])) - 3)


def test_libxc_mode_reads_xc_domain_save_output() -> None:
    decoder = StreamDecoder(libxc=True)
    decoder.receive_data(DomainHeader(2, 4, 17).encode_body() + encode_record(Checkpoint()))
    assert drain(decoder) == [DomainHeader(2, 4, 17), Checkpoint()]


def test_commit_digest_covers_checkpoint_records_only() -> None:
    decoder = StreamDecoder()
    decoder.receive_data(stream_bytes())
    drain(decoder)
    count, _crc = decoder.take_commit_digest()
    # session, heartbeat, ack, commit and close are not checkpoint content
    assert count == 6
    assert decoder.take_commit_digest() == (0, 0)


# --------------------------------------------------------------------------- errors

BAD_STREAMS = [
    ("bad-marker", h("fffffffffffffffe 524d5553 00000002 0000 0000 00000000"), "bad marker"),
    ("plain-libxc", h("ffffffffffffffff 58454e46 00000003 0000 0000 00000000"), "plain libxc"),
    ("other-id", h("ffffffffffffffff 41414141 00000001 0000 0000 00000000"), "id 0x41414141"),
    ("version", h("ffffffffffffffff 524d5553 00000001 0000 0000 00000000"), "version 1"),
    ("reserved", h("ffffffffffffffff 524d5553 00000002 0001 0000 00000000"), "reserved"),
    ("huge-length", StreamHeader().encode() + h("01000000 ffffffff"), "over the"),
    ("padding", StreamHeader().encode() + h("07000000 03000000 010203 0000000001"), "padding"),
    ("unknown-remus-type", StreamHeader().encode() + h("ff004552 00000000"), "unknown remus record"),
    ("short-ack", StreamHeader().encode() + h("06004552 04000000 01000000 00000000"), "ACK record"),
    ("nonempty-checkpoint", StreamHeader().encode() + h("0e000000 01000000 0100000000000000"), "CHECKPOINT"),
    ("page-count", StreamHeader().encode() + h("01000000 08000000 05000000 00000000"), "shorter than its pfn"),
    ("page-zero", StreamHeader().encode() + h("01000000 08000000 00000000 00000000"), "count 0"),
    ("page-size", StreamHeader().encode() + h("01000000 10000000 01000000 00000000 0500000000000000"),
     "expected 4096"),
    ("session-json", StreamHeader().encode() + h("01004552 02000000 7b7d 000000000000"), "lacks"),
    ("session-notjson", StreamHeader().encode() + h("01004552 02000000 ffff 000000000000"), "not JSON"),
    ("close-reason", StreamHeader().encode() + h("08004552 08000000 09000000 00000000"), "unknown reason"),
    ("batch-kind", StreamHeader().encode() + h("03004552 20000000 01000000 01000000 00000000 00000000"
                                               "0100000000000000 0300000000000000"), "unknown page kind"),
    ("batch-kind-vs-type", StreamHeader().encode() + h("03004552 20000000 01000000 00000000 00000000 00000000"
                                                       "0100000000000000 0000000000000000"), "does not match"),
    ("domain-header-size", StreamHeader().encode() + h("02004552 08000000 0000000000000000"), "not 40"),
]


@pytest.mark.parametrize("name,data,needle", BAD_STREAMS, ids=[b[0] for b in BAD_STREAMS])
@pytest.mark.parametrize("chunk", [1, 1 << 20], ids=["bytewise", "whole"])
def test_malformed_input_raises_remote_protocol_error(name: str, data: bytes, needle: str, chunk: int) -> None:
    decoder = StreamDecoder(max_record_bytes=1 << 20)
    with pytest.raises(RemoteProtocolError) as info:
        for start in range(0, len(data), chunk):
            decoder.receive_data(data[start : start + chunk])
            drain(decoder)
    assert needle in str(info.value)


def test_a_hostile_length_is_refused_before_its_body_arrives() -> None:
    decoder = StreamDecoder(max_record_bytes=1000)
    decoder.receive_data(StreamHeader().encode())
    drain(decoder)
    decoder.receive_data(h("01000000 e9030000"))  # claims 1001 bytes
    with pytest.raises(RemoteProtocolError):
        decoder.next_event()
    assert decoder.buffered == 8  # nothing was allocated for the body


def test_next_event_says_need_data_until_a_record_is_complete() -> None:
    decoder = StreamDecoder()
    decoder.receive_data(StreamHeader().encode() + encode_record(Ack(1))[:-1])
    assert decoder.next_event() == StreamHeader()
    assert decoder.next_event() is NEED_DATA
    decoder.receive_data(encode_record(Ack(1))[-1:])
    assert decoder.next_event() == Ack(1)


def test_data_after_eof_is_a_caller_bug() -> None:
    decoder = StreamDecoder()
    decoder.receive_data(b"")
    with pytest.raises(RuntimeError):
        decoder.receive_data(b"x")


def test_page_data_must_match_its_pfn_types() -> None:
    with pytest.raises(ValueError):
        PageData((5,), ())

"""The xl save file the backup builds from its image: golden header bytes, and a round trip
from a Remus stream of a PV guest to the PLAIN libxc stream xl restore reads."""

from __future__ import annotations

import json
import struct
from typing import Any

import pytest

from remus.backup.session import BackupSession
from remus.errors import ActivationError
from remus.backup.image import Image
from remus.stream.codec import NEED_DATA, EndOfStream, StreamDecoder
from remus.stream.records import DomainHeader, PageData, XenRecord, XenRecType
from remus.xen.savefile import (
    LIBXL_REC_TYPE_END,
    LIBXL_REC_TYPE_LIBXC_CONTEXT,
    DomainConfig,
    libxc_stream,
    libxl_header,
    libxl_record,
    save_file,
    xl_header,
)
from tests.xen_stream import CONFIG, HOLE_PFN, PAGES, STATE_TYPES, STATIC_TYPES, xen_session


def h(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", "").replace("\n", ""))


# Derived by hand from tools/xl/xl.h and libxl_sr_stream_format.h (Xen 4.17).
def test_xl_header_golden_bytes() -> None:
    assert xl_header(b"{}\0") == (
        b"Xen saved domain, xl format\n \0 \r"  # char magic[32]
        + h("04030201")  # u32 byteorder 0x01020304, host (little) endian
        + h("03000000")  # u32 mandatory_flags: JSON (1) | STREAMv2 (2)
        + h("00000000")  # u32 optional_flags
        + h("07000000")  # u32 optional_data_len: 4 + 3
        + h("03000000") + b"{}\0"  # optional data: u32 config length, config with its NUL
    )
    assert len(b"Xen saved domain, xl format\n \0 \r") == 32


def test_libxl_stream_golden_bytes() -> None:
    # u64 ident "LibxlFmt", u32 version 2, u32 options 0: all big-endian
    assert libxl_header() == h("4c6962786c466d74 00000002 00000000")
    # records: u32 type, u32 length (host endian), no body
    assert libxl_record(LIBXL_REC_TYPE_LIBXC_CONTEXT) == h("01000000 00000000")
    assert libxl_record(LIBXL_REC_TYPE_END) == h("00000000 00000000")


def test_the_config_goes_in_as_xl_save_writes_it() -> None:
    config = DomainConfig.parse(CONFIG)
    assert config.name == "domu"
    raw = config.for_restore()
    assert raw.endswith(b"\0") and raw.count(b"\0") == 1
    restored = json.loads(raw[:-1])
    # the old domain id is cleared, as xl save does, so that libxl picks a free one
    assert restored["c_info"] == {"type": "pv", "name": "domu", "domid": 0}
    assert restored["b_info"] == json.loads(CONFIG)["b_info"]
    assert DomainConfig.parse(CONFIG).json["c_info"]["domid"] == 4  # parse() copies nothing away


@pytest.mark.parametrize("text, needle", [
    (None, "sent no libxl configuration"),
    ("{not json", "is not JSON"),
    ("[1, 2]", "names no domain"),
    ('{"c_info": {"type": "pv"}}', "names no domain"),
    ('{"c_info": {"name": ""}}', "names no domain"),
])
def test_a_config_without_a_domain_name_is_refused(text: Any, needle: str) -> None:
    with pytest.raises(ActivationError, match=needle):
        DomainConfig.parse(text)


def committed_image(checkpoints: int, compression: bool = True) -> tuple[Image, Any]:
    stream, guest = xen_session(checkpoints, compression=compression)
    session = BackupSession()
    session.receive_data(stream)
    assert session.image.seq == checkpoints
    return session.image, guest


def decode_libxc(data: bytes) -> list[Any]:
    decoder = StreamDecoder(libxc=True)
    decoder.receive_data(data)
    decoder.receive_data(b"")
    events = []
    while True:
        event = decoder.next_event()
        assert event is not NEED_DATA
        if isinstance(event, EndOfStream):
            assert event.partial_bytes == 0
            return events
        events.append(event)


@pytest.mark.parametrize("checkpoints", [1, 4])
@pytest.mark.parametrize("compression", [True, False], ids=["compressed", "raw"])
def test_the_image_becomes_a_plain_stream_with_the_latest_pages(checkpoints: int, compression: bool) -> None:
    image, guest = committed_image(checkpoints, compression)
    events = decode_libxc(b"".join(libxc_stream(image)))

    assert events[0] == DomainHeader(1, 4, 17)
    types = [e.TYPE for e in events[1:]]
    n_static, n_state = len(STATIC_TYPES), len(STATE_TYPES)
    # static records of checkpoint 1, then pages only, then the latest state records, then END
    assert types[:n_static] == STATIC_TYPES
    assert set(types[n_static : -n_state - 1]) == {XenRecType.PAGE_DATA}
    assert types[-n_state - 1 :] == STATE_TYPES + [XenRecType.END]
    assert all(r.body[4:8] == struct.pack("<I", 1) for r in events[1 : 1 + n_static])
    assert all(r.body[4:8] == struct.pack("<I", checkpoints) for r in events[-n_state - 1 : -1])
    assert events[-1] == XenRecord(XenRecType.END, b"")  # a PLAIN stream ends; no CHECKPOINT in it
    assert XenRecType.CHECKPOINT not in types

    pages: dict[int, tuple[int, Any]] = {}
    for record in events:
        if isinstance(record, PageData):
            assert len(record.pfns) <= 1024
            data = iter(record.pages)
            for word in record.pfns:
                assert (word & 0xFFFFFFFFFFFFF) not in pages  # every page once
                pages[word & 0xFFFFFFFFFFFFF] = (word, None if (word >> 60) == 0xF else next(data))
    assert pages == guest.memory  # each page in its latest version, with its type word
    assert len(pages) == PAGES and pages[HOLE_PFN][1] is None


def test_the_save_file_wraps_the_libxc_stream_in_xl_and_libxl_framing() -> None:
    image, _guest = committed_image(2)
    config = DomainConfig.parse(CONFIG)
    data = b"".join(save_file(image, config))
    head = xl_header(config.for_restore()) + libxl_header() + libxl_record(LIBXL_REC_TYPE_LIBXC_CONTEXT)
    assert data.startswith(head)
    assert data.endswith(h("00000000 00000000") + h("00000000 00000000"))  # libxc END, libxl END
    assert data[len(head) : -8] == b"".join(libxc_stream(image))


def test_many_pages_are_cut_into_batches_of_1024() -> None:
    image, _guest = committed_image(1)
    page = bytes(4096)
    image.pages = {pfn: (pfn, page) for pfn in range(2500)}
    records = [e for e in decode_libxc(b"".join(libxc_stream(image))) if isinstance(e, PageData)]
    assert [len(r.pfns) for r in records] == [1024, 1024, 452]
    assert [r.pfns[0] for r in records] == [0, 1024, 2048]


def test_images_that_cannot_be_restored_are_refused_before_any_byte() -> None:
    with pytest.raises(ActivationError, match="no complete checkpoint"):
        libxc_stream(Image())
    image, _guest = committed_image(2)
    image.header = DomainHeader(2, 4, 17)
    with pytest.raises(ActivationError, match="only x86 PV domains"):
        save_file(image, DomainConfig.parse(CONFIG))
    image, _guest = committed_image(2)
    image.latest_records = [r for r in image.latest_records if r.TYPE != XenRecType.X86_PV_VCPU_BASIC]
    with pytest.raises(ActivationError, match="checkpoint 2 cannot be restored: it has no X86_PV_VCPU_BASIC"):
        libxc_stream(image)

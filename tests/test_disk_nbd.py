"""The sans-IO NBD server connection: handshake and transmission, whole and byte by byte."""

from __future__ import annotations

import struct

import pytest

from remus.disk.nbd import (
    IHAVEOPT,
    NBD_REP_MAGIC,
    NEED_DATA,
    Disconnect,
    Export,
    NbdCmd,
    NbdOpt,
    NbdRep,
    NbdServerConnection,
    Request,
    State,
    request_bytes,
)
from remus.errors import LocalProtocolError, RemoteProtocolError

EXPORT = Export("vm1", 1 << 20)


def option(opt: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, opt, len(data)) + data


def go(name: bytes = b"vm1", *infos: int) -> bytes:
    return option(NbdOpt.GO, struct.pack(">I", len(name)) + name + struct.pack(f">H{len(infos)}H", len(infos), *infos))


def events(conn: NbdServerConnection) -> list[object]:
    out = []
    while (event := conn.next_event()) is not NEED_DATA:
        out.append(event)
        if isinstance(event, Disconnect):
            break
    return out


def feed(conn: NbdServerConnection, data: bytes, bytewise: bool) -> list[object]:
    if not bytewise:
        conn.receive_data(data)
        return events(conn)
    out: list[object] = []
    for i in range(len(data)):
        conn.receive_data(data[i : i + 1])
        out += events(conn)
    return out


def test_greeting_is_nbdmagic_ihaveopt_and_fixed_newstyle_no_zeroes() -> None:
    conn = NbdServerConnection(EXPORT)
    # "NBDMAGIC", "IHAVEOPT", flags FIXED_NEWSTYLE|NO_ZEROES = 3
    assert conn.data_to_send().hex() == "4e42444d41474943" + "49484156454f5054" + "0003"


@pytest.mark.parametrize("bytewise", [False, True])
def test_go_then_write_read_flush_disc(bytewise: bool) -> None:
    conn = NbdServerConnection(EXPORT)
    conn.data_to_send()
    stream = struct.pack(">I", 3) + go(b"vm1", 3)
    stream += request_bytes(NbdCmd.WRITE, 512, 4, handle=7, flags=1, data=b"abcd")
    stream += request_bytes(NbdCmd.READ, 0, 8, handle=8)
    stream += request_bytes(NbdCmd.FLUSH, 0, 0, handle=9)
    stream += request_bytes(NbdCmd.DISC, 0, 0, handle=10)
    got = feed(conn, stream, bytewise)
    assert got == [
        Request(NbdCmd.WRITE, 1, 7, 512, 4, b"abcd"),
        Request(NbdCmd.READ, 0, 8, 0, 8),
        Request(NbdCmd.FLUSH, 0, 9, 0, 0),
        Disconnect(),
    ]
    assert isinstance(got[0], Request) and got[0].fua
    replies = conn.data_to_send()
    # NBD_REP_INFO(EXPORT: size 1 MiB, flags HAS_FLAGS|SEND_FLUSH|SEND_FUA = 0x0d), INFO(BLOCK_SIZE), ACK
    info = struct.pack(">QIII", NBD_REP_MAGIC, 7, 3, 12) + bytes.fromhex("0000" "0000000000100000" "000d")
    block = struct.pack(">QIII", NBD_REP_MAGIC, 7, 3, 14) + struct.pack(">HIII", 3, 1, 4096, 32 << 20)
    ack = struct.pack(">QIII", NBD_REP_MAGIC, 7, 1, 0)
    assert replies == info + block + ack
    assert conn.state is State.CLOSED


def test_export_name_answers_size_and_flags_with_and_without_zeroes() -> None:
    for client_flags, tail in ((3, b""), (1, bytes(124))):
        conn = NbdServerConnection(EXPORT)
        conn.data_to_send()
        conn.receive_data(struct.pack(">I", client_flags) + option(NbdOpt.EXPORT_NAME, b""))
        assert conn.next_event() is NEED_DATA
        assert conn.data_to_send() == struct.pack(">QH", 1 << 20, 0x0D) + tail
        assert conn.state is State.TRANSMISSION


def test_unsupported_option_and_unknown_export_are_refused_and_negotiation_goes_on() -> None:
    conn = NbdServerConnection(EXPORT)
    conn.data_to_send()
    conn.receive_data(struct.pack(">I", 1) + option(NbdOpt.STRUCTURED_REPLY) + go(b"other") + go(b"vm1"))
    assert conn.next_event() is NEED_DATA
    out = conn.data_to_send()
    replies = []
    while out:
        _m, opt, rep, length = struct.unpack_from(">QIII", out)
        replies.append((opt, rep))
        out = out[20 + length :]
    assert replies == [
        (NbdOpt.STRUCTURED_REPLY, NbdRep.ERR_UNSUP),
        (NbdOpt.GO, NbdRep.ERR_UNKNOWN),
        (NbdOpt.GO, NbdRep.INFO),
        (NbdOpt.GO, NbdRep.ACK),
    ]


def test_invalid_requests_get_errors_without_reaching_the_caller() -> None:
    conn = NbdServerConnection(Export("ro", 4096, read_only=True))
    conn.receive_data(struct.pack(">I", 3) + go(b""))
    conn.next_event()
    conn.data_to_send()
    conn.receive_data(
        request_bytes(NbdCmd.WRITE, 0, 2, handle=1, data=b"xy")  # read-only: EPERM
        + request_bytes(NbdCmd.READ, 4000, 512, handle=2)  # past the end: EINVAL
        + request_bytes(NbdCmd.TRIM, 0, 512, handle=3)  # TRIM not offered: EINVAL
        + request_bytes(NbdCmd.READ, 0, 16, handle=4)
    )
    assert conn.next_event() == Request(NbdCmd.READ, 0, 4, 0, 16)
    errors = struct.unpack(">" + "IIQ" * 3, conn.data_to_send())
    assert [errors[1], errors[4], errors[7]] == [1, 22, 22]
    assert [errors[2], errors[5], errors[8]] == [1, 2, 3]
    assert conn.invalid_requests == 3


def test_reply_bytes_and_local_misuse() -> None:
    conn = NbdServerConnection(EXPORT)
    read = Request(NbdCmd.READ, 0, 0x1122334455667788, 0, 4)
    assert conn.reply(read, 0, b"DATA").hex() == "67446698" "00000000" "1122334455667788" + b"DATA".hex()
    assert conn.reply(read, 5).hex() == "67446698" "00000005" "1122334455667788"
    with pytest.raises(LocalProtocolError):
        conn.reply(read, 0, b"abc")


@pytest.mark.parametrize(
    "stream",
    [
        struct.pack(">I", 4),  # not fixed newstyle
        struct.pack(">I", 1) + struct.pack(">QII", 0x1234, 7, 0),  # option without IHAVEOPT
        struct.pack(">I", 1) + go(b"") + request_bytes(NbdCmd.READ, 0, 1)[:-24].replace(b"\x25", b"\x26", 1) + bytes(24),
        struct.pack(">I", 1) + go(b"") + request_bytes(NbdCmd.WRITE, 0, 64 << 20),  # payload too big
    ],
)
def test_unframeable_input_is_a_remote_protocol_error(stream: bytes) -> None:
    conn = NbdServerConnection(EXPORT)
    conn.receive_data(stream)
    with pytest.raises(RemoteProtocolError):
        events(conn)


def test_oversized_option_is_skipped_and_refused() -> None:
    conn = NbdServerConnection(EXPORT)
    conn.data_to_send()
    conn.receive_data(struct.pack(">I", 1) + option(NbdOpt.LIST, bytes(5000)) + option(NbdOpt.ABORT))
    assert events(conn) == [Disconnect()]
    out = conn.data_to_send()
    assert struct.unpack_from(">QIII", out)[2] == NbdRep.ERR_TOO_BIG

"""Netlink framing, ACK/error parsing and the request/answer loop, without a kernel."""

import errno
import struct
import sys
from collections import deque
from typing import Deque, List

import pytest

from remus.netbuf import netlink
from remus.netbuf.netlink import (
    NLM_F_ACK_TLVS,
    NLM_F_CAPPED,
    NLMSG_DONE,
    NLMSG_ERROR,
    NLMSG_OVERRUN,
    NetlinkDecodeError,
    NetlinkError,
    Request,
    RtnlSocket,
)

little_endian = pytest.mark.skipif(sys.byteorder != "little", reason="goldens are in little-endian host order")


@little_endian
def test_nlmsg_pads_payload_and_counts_it() -> None:
    # nlmsghdr: len 16+4 (3 bytes payload + 1 padding) | type 0x24 | flags 0x05 | seq 7 | pid 0
    assert netlink.nlmsg(0x24, 0x05, 7, b"abc") == bytes.fromhex("14000000 2400 0500 07000000 00000000 61626300")


@little_endian
def test_rtattr_length_excludes_padding() -> None:
    # rta_len 4+5 = 9, then 3 bytes of padding to the next 4-byte boundary
    assert netlink.rtattr_str(1, "plug") == bytes.fromhex("09000100 706c7567 00 000000")
    assert netlink.rtattr(2, b"") == bytes.fromhex("04000200")


def test_parse_rtattrs_round_trip_and_flags_removed() -> None:
    data = netlink.rtattr(1, b"x") + netlink.nested(2 | netlink.NLA_F_NESTED, netlink.rtattr(3, b"1234"))
    assert netlink.parse_rtattrs(data) == [(1, b"x"), (2, netlink.rtattr(3, b"1234"))]


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(bytes.fromhex("08000100 6162"), id="overruns"),
        pytest.param(bytes.fromhex("02000100"), id="shorter-than-header"),
    ],
)
def test_parse_rtattrs_rejects_malformed(data: bytes) -> None:
    with pytest.raises(NetlinkDecodeError):
        netlink.parse_rtattrs(data)


def test_split_messages() -> None:
    two = netlink.nlmsg(16, 2, 1, b"abcde") + netlink.nlmsg(NLMSG_DONE, 2, 1, struct.pack("=i", 0))
    parsed = list(netlink.split_messages(two))
    assert [(h.nlmsg_type, p) for h, p in parsed] == [(16, b"abcde\0\0\0"), (NLMSG_DONE, b"\0\0\0\0")]
    with pytest.raises(NetlinkDecodeError):
        list(netlink.split_messages(two[:-1]))


def error_payload(code: int, request: bytes, *, capped: bool, msg: str = "", offset: int = -1) -> bytes:
    echoed = request[:16] if capped else request
    tlvs = b""
    if msg:
        tlvs += netlink.rtattr_str(netlink.NLMSGERR_ATTR_MSG, msg)
    if offset >= 0:
        tlvs += netlink.rtattr(netlink.NLMSGERR_ATTR_OFFS, struct.pack("=I", offset))
    return struct.pack("=i", -code) + echoed + tlvs


REQUEST = Request(36, 0x605, b"\0" * 20 + netlink.rtattr_str(1, "plug")).frame(seq=9)


@little_endian
def test_parse_error_golden_capped_with_extended_ack() -> None:
    # What a kernel with NETLINK_CAP_ACK and NETLINK_EXT_ACK sends for a plug it does not know:
    payload = bytes.fromhex(
        "feffffff"                            # error -2 (ENOENT)
        "2c000000 2400 0506 09000000 00000000"  # the request's nlmsghdr only (capped)
        "24000100"                            # NLMSGERR_ATTR_MSG (1), len 4+32
    ) + b"Specified qdisc kind is unknown\0"
    ack = netlink.parse_error(NLM_F_CAPPED | NLM_F_ACK_TLVS, payload)
    assert ack.error == errno.ENOENT
    assert ack.request.nlmsg_seq == 9 and ack.request.nlmsg_type == 36
    assert ack.ext_msg == "Specified qdisc kind is unknown"


def test_parse_error_uncapped_skips_the_echoed_request() -> None:
    payload = error_payload(errno.EINVAL, REQUEST, capped=False, msg="Invalid handle", offset=20)
    ack = netlink.parse_error(NLM_F_ACK_TLVS, payload)
    assert (ack.error, ack.ext_msg, ack.bad_offset) == (errno.EINVAL, "Invalid handle", 20)


def test_parse_error_plain_ack() -> None:
    ack = netlink.parse_error(NLM_F_CAPPED, error_payload(0, REQUEST, capped=True))
    assert ack.error == 0 and ack.ext_msg == "" and ack.bad_offset is None


def test_parse_error_too_short() -> None:
    with pytest.raises(NetlinkDecodeError):
        netlink.parse_error(0, b"\0" * 10)


class ScriptedSocket:
    """Answers each send with the datagrams the test queued for it (seq filled in by a callback)."""

    def __init__(self) -> None:
        self.sent: List[bytes] = []
        self.script: Deque[List[bytes]] = deque()
        self.inbox: Deque[bytes] = deque()
        self.closed = False

    def send(self, data: bytes) -> int:
        self.sent.append(data)
        seq = struct.unpack_from("=I", data, 8)[0]
        for make in self.script.popleft():
            self.inbox.append(make(seq) if callable(make) else make)
        return len(data)

    def recv(self, bufsize: int) -> bytes:
        return self.inbox.popleft()

    def close(self) -> None:
        self.closed = True


def ack_for(code: int = 0, msg: str = ""):
    def make(seq: int) -> bytes:
        flags = NLM_F_CAPPED | (NLM_F_ACK_TLVS if msg else 0)
        return netlink.nlmsg(NLMSG_ERROR, flags, seq, error_payload(code, REQUEST, capped=True, msg=msg))

    return make


def test_request_waits_for_its_own_ack_and_skips_stale_messages() -> None:
    sock = ScriptedSocket()
    stale = netlink.nlmsg(NLMSG_ERROR, NLM_F_CAPPED, 999, error_payload(errno.EPERM, REQUEST, capped=True))
    answer = lambda seq: netlink.nlmsg(16, 0, seq, b"link")  # noqa: E731
    sock.script.append([stale, lambda seq: answer(seq) + ack_for()(seq)])
    rtnl = RtnlSocket(sock)
    got = rtnl.request(Request(18, 1, b""))
    assert [p for _h, p in got] == [b"link"]
    assert struct.unpack_from("=HH", sock.sent[0], 4) == (18, 1 | netlink.NLM_F_ACK)


def test_request_raises_netlink_error_with_kernel_text() -> None:
    sock = ScriptedSocket()
    sock.script.append([ack_for(errno.ENOENT, "Specified qdisc kind is unknown")])
    with pytest.raises(NetlinkError) as info:
        RtnlSocket(sock).request(Request(36, 1, b""))
    assert info.value.errno == errno.ENOENT
    assert info.value.ext_msg == "Specified qdisc kind is unknown"
    assert str(info.value) == "RTM_NEWQDISC: No such file or directory (Specified qdisc kind is unknown)"


def test_sequence_numbers_increase() -> None:
    sock = ScriptedSocket()
    sock.script.extend([[ack_for()], [ack_for()]])
    rtnl = RtnlSocket(sock)
    rtnl.request(Request(36, 1, b""))
    rtnl.request(Request(36, 1, b""))
    assert [struct.unpack_from("=I", m, 8)[0] for m in sock.sent] == [1, 2]


def test_overrun_is_an_error() -> None:
    sock = ScriptedSocket()
    sock.script.append([lambda seq: netlink.nlmsg(NLMSG_OVERRUN, 0, seq, b"")])
    with pytest.raises(NetlinkError) as info:
        RtnlSocket(sock).request(Request(36, 1, b""))
    assert info.value.errno == errno.ENOBUFS


def test_close_is_idempotent_and_final() -> None:
    sock = ScriptedSocket()
    rtnl = RtnlSocket(sock)
    rtnl.close()
    rtnl.close()
    assert sock.closed
    with pytest.raises(ValueError):
        rtnl.request(Request(36, 1, b""))


def test_real_socket_opens_unprivileged() -> None:
    # Opening a NETLINK_ROUTE socket needs no privilege; only changes do.
    with RtnlSocket() as rtnl:
        assert rtnl is not None

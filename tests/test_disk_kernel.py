"""NBD_CMD_CONNECT and friends: packed bytes against the kernel's layout, and the attach path."""

from __future__ import annotations

import os
import socket
import struct

import pytest

from remus.disk.kernel import (
    MODPROBE_HINT,
    ConnectParams,
    NbdNetlink,
    attach,
    connect_request,
    disconnect_request,
    getfamily_request,
    parse_connect_reply,
)
from remus.disk.nbd import NbdCmd, request_bytes
from remus.disk.server import ImageFile, NbdServer
from remus.errors import DiskUnavailable
from remus.netbuf.netlink import NLMSG_ERROR, NlMsgHdr, nlmsg, rtattr, split_messages


def test_getfamily_bytes() -> None:
    framed = getfamily_request().frame(seq=1)
    # nlmsghdr: len 28, type GENL_ID_CTRL 0x10, flags REQUEST|ACK 5, seq 1, pid 0
    # genlmsghdr: cmd CTRL_CMD_GETFAMILY 3, version 1, reserved 0
    # attr CTRL_ATTR_FAMILY_NAME (2), len 8: "nbd\0"
    assert framed.hex() == (
        "1c000000" "1000" "0500" "01000000" "00000000"
        "03" "01" "0000"
        "0800" "0200" "6e626400"
    )


def test_connect_bytes() -> None:
    req = connect_request(0x1234, ConnectParams(sock_fd=7, size_bytes=1 << 30, server_flags=0x0D, index=3))
    assert req.msg_type == 0x1234
    expected = bytes.fromhex("01010000")  # NBD_CMD_CONNECT, version 1
    expected += bytes.fromhex("0800" "0100" "03000000")  # INDEX u32 3
    expected += bytes.fromhex("0c00" "0200") + struct.pack("=Q", 1 << 30)  # SIZE_BYTES
    expected += bytes.fromhex("0c00" "0300") + struct.pack("=Q", 512)  # BLOCK_SIZE_BYTES: a 512-byte-sector disk
    expected += bytes.fromhex("0c00" "0400") + struct.pack("=Q", 30)  # TIMEOUT s
    expected += bytes.fromhex("0c00" "0500") + struct.pack("=Q", 0x0D)  # SERVER_FLAGS
    expected += bytes.fromhex("0c00" "0600") + struct.pack("=Q", 1)  # CLIENT_FLAGS destroy-on-disconnect
    # SOCKETS (7|NLA_F_NESTED) > SOCK_ITEM (1|NESTED) > SOCK_FD u32 7
    expected += bytes.fromhex("1000" "0780" "0c00" "0180" "0800" "0100" "07000000")
    assert req.payload == expected


def test_disconnect_bytes_and_connect_reply() -> None:
    assert disconnect_request(0x20, 5).payload.hex() == "02010000" "0800" "0100" "05000000"
    assert parse_connect_reply(bytes(4) + rtattr(1, struct.pack("=I", 9))) == 9
    with pytest.raises(DiskUnavailable):
        parse_connect_reply(bytes(4))


class FakeKernel:
    """Answers GETFAMILY and CONNECT like the kernel; keeps the socket it was given."""

    def __init__(self, has_nbd: bool = True) -> None:
        self.has_nbd = has_nbd
        self.sent: list[bytes] = []
        self.replies: list[bytes] = []
        self.sock_fd = -1

    def send(self, data: bytes) -> int:
        self.sent.append(data)
        (hdr, payload), = list(split_messages(data))
        if hdr.nlmsg_type == 0x10:
            if not self.has_nbd:
                self.replies.append(self._ack(hdr, -2))
                return len(data)
            answer = bytes(4) + rtattr(1, struct.pack("=H", 0x33))
        else:
            assert hdr.nlmsg_type == 0x33
            fd_attr = payload.rfind(bytes.fromhex("08000100"))
            self.sock_fd = os.dup(struct.unpack_from("=I", payload, fd_attr + 4)[0])
            answer = bytes(4) + rtattr(1, struct.pack("=I", 4))
        self.replies.append(nlmsg(hdr.nlmsg_type, 0, hdr.nlmsg_seq, answer) + self._ack(hdr, 0))
        return len(data)

    @staticmethod
    def _ack(hdr: NlMsgHdr, error: int) -> bytes:
        request = struct.pack("=IHHII", hdr.nlmsg_len, hdr.nlmsg_type, hdr.nlmsg_flags, hdr.nlmsg_seq, 0)
        return nlmsg(NLMSG_ERROR, 0x100, hdr.nlmsg_seq, struct.pack("=i", error) + request)

    def recv(self, bufsize: int) -> bytes:
        return self.replies.pop(0)

    def close(self) -> None:
        pass


def fake_netlink(kernel: FakeKernel) -> NbdNetlink:
    from remus.netbuf.netlink import RtnlSocket

    return NbdNetlink(RtnlSocket(kernel))


def test_missing_module_names_modprobe() -> None:
    with pytest.raises(DiskUnavailable, match="modprobe nbd"):
        fake_netlink(FakeKernel(has_nbd=False))


@pytest.mark.skipif(os.path.exists("/sys/module/nbd"), reason="this host has the nbd module")
def test_this_host_without_nbd_gets_the_modprobe_message() -> None:
    with pytest.raises(DiskUnavailable) as info:
        NbdNetlink()
    assert str(info.value) == MODPROBE_HINT


def test_attach_serves_the_kernel_end_without_a_handshake(tmp_path: "os.PathLike[str]") -> None:
    path = os.path.join(tmp_path, "disk.img")
    with open(path, "wb") as f:
        f.write(b"\x42" * 8192)
    kernel = FakeKernel()
    image = ImageFile(path)
    server = NbdServer(image)
    try:
        assert attach(server, fake_netlink(kernel)) == 4
        # be the kernel: requests at once, no greeting expected
        dev = socket.socket(fileno=kernel.sock_fd)
        dev.settimeout(10)
        dev.sendall(request_bytes(NbdCmd.READ, 4096, 16, handle=11))
        reply = b""
        while len(reply) < 32:
            reply += dev.recv(32 - len(reply))
        assert struct.unpack(">IIQ", reply[:16]) == (0x67446698, 0, 11)
        assert reply[16:] == b"\x42" * 16
        dev.close()
    finally:
        server.close()
        image.close()

"""Test frames of every kind, a raw sender and a timestamping tap (AF_PACKET), for network-buffering tests.

Every frame remus must hold is here: IPv4, IPv6, ARP, 802.1Q, an unknown
ethertype and a bare 14-byte header.  Each carries its sequence number in
its source MAC (02:52:4d:ss:ss:ss, locally administered), so even the
header-only frame can be told apart.  ``Tap`` reads frames with the
kernel's receive timestamps.  Used by test_netbuf_kernel.py (in a network
namespace) and by the Xen lab's netbuf job.  Linux only; sending needs root.
"""

from __future__ import annotations

import select
import socket
import struct
import time
from typing import Iterator, List, NamedTuple, Optional, Tuple

ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
ETH_P_IPV6 = 0x86DD
ETH_P_8021Q = 0x8100
ETH_P_EXPERIMENTAL = 0x88B5  # IEEE 802 local experimental ethertype 1
ETH_P_EXPERIMENTAL_2 = 0x88B6
SO_TIMESTAMPNS = 35  # asm-generic/socket.h (SO_TIMESTAMPNS_OLD); SCM_TIMESTAMPNS has the same value
SO_RCVBUFFORCE = 33  # asm-generic/socket.h: root may exceed net.core.rmem_max
SOL_PACKET = 263  # linux/socket.h
PACKET_OUTGOING = 4  # linux/if_packet.h
PACKET_STATISTICS = 6  # linux/if_packet.h: struct tpacket_stats { unsigned tp_packets, tp_drops; }, reset on read
TAP_BUFFER_BYTES = 64 << 20  # a plug's release is a burst; a slow reader must not lose it
BROADCAST = b"\xff" * 6
MARK = b"\x02\x52\x4d"  # source MACs 02:52:4d:..:..:.. carry a sequence number

#: The kinds of frame ``frame`` can build, each a different way past an IPv4-only filter.
KINDS = ("ipv4", "ipv6", "arp", "vlan", "other", "tiny")


def src_mac(seq: int) -> bytes:
    return MARK + struct.pack(">I", seq)[1:]


def seq_of(frame: bytes) -> Optional[int]:
    """The sequence number in a test frame's source MAC, or None for any other frame."""
    if len(frame) >= 12 and frame[6:9] == MARK:
        return int.from_bytes(frame[9:12], "big")
    return None


def _checksum(data: bytes) -> int:
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def frame(kind: str, seq: int) -> bytes:
    """A broadcast frame of ``kind`` (one of ``KINDS``) numbered ``seq``."""
    src = src_mac(seq)
    body = b"remus netbuf test " + str(seq).encode()
    if kind == "ipv4":
        udp = struct.pack("!HHHH", 9, 9, 8 + len(body), 0) + body
        header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), seq & 0xFFFF, 0, 64, 17, 0,
                             bytes([10, 200, 0, 1]), bytes([255, 255, 255, 255]))
        header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
        return BROADCAST + src + struct.pack("!H", ETH_P_IP) + header + udp
    if kind == "ipv6":
        udp = struct.pack("!HHHH", 9, 9, 8 + len(body), 0) + body
        header = struct.pack("!IHBB16s16s", 6 << 28, len(udp), 17, 64,
                             bytes.fromhex("fe80" + "00" * 13 + "01"), bytes.fromhex("ff02" + "00" * 13 + "01"))
        return b"\x33\x33\x00\x00\x00\x01" + src + struct.pack("!H", ETH_P_IPV6) + header + udp
    if kind == "arp":
        arp = struct.pack("!HHBBH6s4s6s4s", 1, ETH_P_IP, 6, 4, 1, src, bytes([10, 200, 0, 1]), bytes(6),
                          bytes([10, 200, 0, 2]))
        return BROADCAST + src + struct.pack("!H", ETH_P_ARP) + arp + bytes(18)
    if kind == "vlan":
        return BROADCAST + src + struct.pack("!HHH", ETH_P_8021Q, 42, ETH_P_EXPERIMENTAL) + body.ljust(42, b"\0")
    if kind == "other":
        return BROADCAST + src + struct.pack("!H", ETH_P_EXPERIMENTAL) + body.ljust(46, b"\0")
    if kind == "tiny":
        return BROADCAST + src + struct.pack("!H", ETH_P_EXPERIMENTAL_2)
    raise ValueError(f"unknown frame kind {kind!r}")


def kind_of(seq: int) -> str:
    """The kind ``stream`` gives frame ``seq``."""
    return KINDS[seq % len(KINDS)]


def stream(start: int = 1) -> Iterator[Tuple[int, bytes]]:
    """Endless ``(seq, frame)``, cycling through every kind."""
    seq = start
    while True:
        yield seq, frame(kind_of(seq), seq)
        seq += 1


class Sender:
    """Raw frames out of one interface."""

    def __init__(self, ifname: str) -> None:
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        self.sock.bind((ifname, 0))

    def send(self, data: bytes) -> None:
        self.sock.send(data)

    def close(self) -> None:
        self.sock.close()


class Seen(NamedTuple):
    """One frame a tap read: kernel timestamp (Unix seconds), packet type, bytes."""

    unix: float
    pkttype: int
    data: bytes


class Tap:
    """Every frame through one interface, with the kernel's timestamps; outgoing copies optional."""

    def __init__(self, ifname: str, *, outgoing: bool = True) -> None:
        self.ifname = ifname
        self.outgoing = outgoing
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, TAP_BUFFER_BYTES)
        except PermissionError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, TAP_BUFFER_BYTES)
        self.dropped = 0
        self.sock.bind((ifname, ETH_P_ALL))
        self.sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def read_ready(self) -> List[Seen]:
        """What is queued now, without waiting."""
        seen = []
        while True:
            try:
                data, ancdata, _flags, addr = self.sock.recvmsg(65536, socket.CMSG_SPACE(16))
            except BlockingIOError:
                return seen
            stamp = time.time()
            for level, ctype, cdata in ancdata:
                if level == socket.SOL_SOCKET and ctype == SO_TIMESTAMPNS and len(cdata) >= 16:
                    sec, nsec = struct.unpack("=qq", cdata[:16])
                    stamp = sec + nsec / 1e9
            if addr[2] == PACKET_OUTGOING and not self.outgoing:
                continue
            seen.append(Seen(stamp, addr[2], data))

    def wait_for(self, seqs: set, timeout_s: float) -> List[Seen]:
        """Read until every test frame numbered in ``seqs`` was seen, or ``timeout_s`` passed."""
        got: List[Seen] = []
        missing = set(seqs)
        deadline = time.monotonic() + timeout_s
        while missing:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            select.select([self.sock], [], [], remaining)
            for s in self.read_ready():
                got.append(s)
                missing.discard(seq_of(s.data))
        return got

    def count_drops(self) -> int:
        """Frames the kernel dropped because this tap's buffer was full, in total so far."""
        _packets, drops = struct.unpack("=II", self.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
        self.dropped += drops
        return self.dropped

    def close(self) -> None:
        self.sock.close()

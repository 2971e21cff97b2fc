"""Netlink framing and a NETLINK_ROUTE socket that waits for the kernel's answer.

The first half is pure: ``nlmsg`` and ``rtattr`` build ``struct nlmsghdr``
and ``struct rtattr`` (include/uapi/linux/netlink.h, rtnetlink.h) around a
payload, ``split_messages`` and ``parse_rtattrs`` take them apart, and
``parse_error`` reads the ``struct nlmsgerr`` the kernel sends as an ACK or
an error.  Everything is packed in host byte order with an explicit ``=``,
as the kernel reads it.

The second half, ``RtnlSocket``, sends one request at a time, always with
``NLM_F_ACK``, and reads until the kernel's ACK for that request's sequence
number; an error ACK becomes ``NetlinkError``
carrying the errno and the kernel's extended-ACK text ("Specified qdisc kind
is unknown").  It takes any object with ``send``/``recv``/``close`` in place
of a real socket, so tests can record and answer messages.

This module knows nothing about traffic control (``remus.netbuf.tc`` does),
never shells out and never uses libnl.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from typing import Iterator, NamedTuple, Optional, Protocol

# include/uapi/linux/netlink.h
NETLINK_ROUTE = 0
NLMSG_ALIGNTO = 4
NLM_F_REQUEST = 0x01
NLM_F_MULTI = 0x02
NLM_F_ACK = 0x04
NLM_F_ECHO = 0x08
NLM_F_REPLACE = 0x100  # modifiers of NEW requests
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLM_F_CAPPED = 0x100  # flags of an NLMSG_ERROR ack
NLM_F_ACK_TLVS = 0x200
NLMSG_NOOP = 0x1
NLMSG_ERROR = 0x2
NLMSG_DONE = 0x3
NLMSG_OVERRUN = 0x4
NETLINK_CAP_ACK = 10  # socket options at level SOL_NETLINK
NETLINK_EXT_ACK = 11
NLMSGERR_ATTR_MSG = 1  # enum nlmsgerr_attrs
NLMSGERR_ATTR_OFFS = 2
NLA_F_NESTED = 1 << 15
NLA_F_NET_BYTEORDER = 1 << 14
NLA_TYPE_MASK = ~(NLA_F_NESTED | NLA_F_NET_BYTEORDER) & 0xFFFF
# include/linux/socket.h (not in every Python's socket module)
SOL_NETLINK = 270

#: struct nlmsghdr { __u32 nlmsg_len; __u16 nlmsg_type; __u16 nlmsg_flags; __u32 nlmsg_seq; __u32 nlmsg_pid; }
NLMSGHDR = struct.Struct("=IHHII")
#: struct rtattr { unsigned short rta_len; unsigned short rta_type; }  (rtnetlink.h; same layout as nlattr)
RTATTR = struct.Struct("=HH")
#: struct nlmsgerr { int error; struct nlmsghdr msg; }, then the request's payload unless capped, then TLVs
NLMSGERR_ERROR = struct.Struct("=i")

#: Names of the message types this package sends, for error messages.
MESSAGE_NAMES = {
    16: "RTM_NEWLINK", 17: "RTM_DELLINK", 18: "RTM_GETLINK",
    36: "RTM_NEWQDISC", 37: "RTM_DELQDISC", 38: "RTM_GETQDISC",
    44: "RTM_NEWTFILTER", 45: "RTM_DELTFILTER", 46: "RTM_GETTFILTER",
}

RECV_BUFSIZE = 65536
DEFAULT_TIMEOUT_S = 5.0


class NetlinkDecodeError(ValueError):
    """The bytes are not well-formed netlink (a truncated header or attribute)."""


class NetlinkError(OSError):
    """The kernel answered a request with an error ACK.

    ``errno`` is the positive error number, ``request`` the request's message
    type name (``RTM_NEWQDISC``) and ``ext_msg`` the kernel's extended-ACK
    text, or ``""`` when it sent none.
    """

    def __init__(self, code: int, request: str, ext_msg: str = "") -> None:
        text = os.strerror(code) + (f" ({ext_msg})" if ext_msg else "")
        super().__init__(code, text)
        self.request = request
        self.ext_msg = ext_msg

    def __str__(self) -> str:
        return f"{self.request}: {self.strerror}"


class NlMsgHdr(NamedTuple):
    """struct nlmsghdr, as parsed."""

    nlmsg_len: int
    nlmsg_type: int
    nlmsg_flags: int
    nlmsg_seq: int
    nlmsg_pid: int


class Ack(NamedTuple):
    """A parsed NLMSG_ERROR: ``error`` is 0 for a plain ACK, else a positive errno."""

    error: int
    request: NlMsgHdr
    ext_msg: str
    bad_offset: Optional[int]


class Request(NamedTuple):
    """A message to send: its type, its flags (with NLM_F_REQUEST) and its payload.

    The socket adds NLM_F_ACK and the sequence number when framing it.
    """

    msg_type: int
    flags: int
    payload: bytes

    def frame(self, seq: int, pid: int = 0) -> bytes:
        """The whole message as the kernel receives it (``NLM_F_ACK`` added)."""
        return nlmsg(self.msg_type, self.flags | NLM_F_ACK, seq, self.payload, pid)


def align(length: int) -> int:
    """NLMSG_ALIGN / RTA_ALIGN: round up to 4 bytes."""
    return (length + NLMSG_ALIGNTO - 1) & ~(NLMSG_ALIGNTO - 1)


def _pad(data: bytes) -> bytes:
    return data + bytes(align(len(data)) - len(data))


def nlmsg(msg_type: int, flags: int, seq: int, payload: bytes, pid: int = 0) -> bytes:
    """``struct nlmsghdr`` + payload; ``nlmsg_len`` counts the header and the padded payload."""
    body = _pad(payload)
    return NLMSGHDR.pack(NLMSGHDR.size + len(body), msg_type, flags, seq, pid) + body


def rtattr(rta_type: int, payload: bytes) -> bytes:
    """One attribute: ``rta_len`` counts header and payload (not the padding that follows)."""
    return _pad(RTATTR.pack(RTATTR.size + len(payload), rta_type) + payload)


def rtattr_str(rta_type: int, text: str) -> bytes:
    """A NUL-terminated string attribute (NLA_STRING / NLA_NUL_STRING)."""
    return rtattr(rta_type, text.encode("ascii") + b"\0")


def nested(rta_type: int, *attrs: bytes) -> bytes:
    """An attribute whose payload is other attributes (without NLA_F_NESTED, as tc sends them)."""
    return rtattr(rta_type, b"".join(attrs))


def parse_rtattrs(data: bytes) -> list[tuple[int, bytes]]:
    """``(type, payload)`` of each attribute in ``data``, in order, flag bits removed.

    Raises:
        NetlinkDecodeError: an attribute overruns ``data`` or is shorter than its header.
    """
    attrs = []
    offset = 0
    while offset + RTATTR.size <= len(data):
        length, rta_type = RTATTR.unpack_from(data, offset)
        if length < RTATTR.size or offset + length > len(data):
            raise NetlinkDecodeError(f"attribute of length {length} at offset {offset} overruns {len(data)} bytes")
        attrs.append((rta_type & NLA_TYPE_MASK, bytes(data[offset + RTATTR.size : offset + length])))
        offset += align(length)
    return attrs


def attr_map(data: bytes) -> dict[int, bytes]:
    """``parse_rtattrs`` as a dict (the last of a repeated type wins)."""
    return dict(parse_rtattrs(data))


def asciiz(payload: bytes) -> str:
    """The text of a NUL-terminated string attribute."""
    return payload.split(b"\0", 1)[0].decode("ascii", "replace")


def split_messages(data: bytes) -> Iterator[tuple[NlMsgHdr, bytes]]:
    """Each ``(header, payload)`` in one datagram from the kernel.

    Raises:
        NetlinkDecodeError: a header claims more bytes than there are.
    """
    offset = 0
    while offset + NLMSGHDR.size <= len(data):
        hdr = NlMsgHdr(*NLMSGHDR.unpack_from(data, offset))
        if hdr.nlmsg_len < NLMSGHDR.size or offset + hdr.nlmsg_len > len(data):
            raise NetlinkDecodeError(
                f"message of length {hdr.nlmsg_len} at offset {offset} overruns {len(data)} bytes"
            )
        yield hdr, bytes(data[offset + NLMSGHDR.size : offset + hdr.nlmsg_len])
        offset += align(hdr.nlmsg_len)


def parse_error(flags: int, payload: bytes) -> Ack:
    """Read the payload of an NLMSG_ERROR message (``flags`` are its nlmsg_flags).

    With ``NLM_F_CAPPED`` only the request's header follows the error code,
    else the whole request does; with ``NLM_F_ACK_TLVS`` the extended-ACK
    attributes come after that.

    Raises:
        NetlinkDecodeError: the payload is shorter than the header it must hold.
    """
    need = NLMSGERR_ERROR.size + NLMSGHDR.size
    if len(payload) < need:
        raise NetlinkDecodeError(f"NLMSG_ERROR payload of {len(payload)} bytes, need {need}")
    (error,) = NLMSGERR_ERROR.unpack_from(payload, 0)
    request = NlMsgHdr(*NLMSGHDR.unpack_from(payload, NLMSGERR_ERROR.size))
    ext_msg = ""
    bad_offset = None
    if flags & NLM_F_ACK_TLVS:
        echoed = NLMSGHDR.size if (flags & NLM_F_CAPPED or error == 0) else request.nlmsg_len
        tlvs = attr_map(payload[NLMSGERR_ERROR.size + align(echoed) :])
        if NLMSGERR_ATTR_MSG in tlvs:
            ext_msg = asciiz(tlvs[NLMSGERR_ATTR_MSG])
        if NLMSGERR_ATTR_OFFS in tlvs and len(tlvs[NLMSGERR_ATTR_OFFS]) >= 4:
            (bad_offset,) = struct.unpack_from("=I", tlvs[NLMSGERR_ATTR_OFFS])
    return Ack(-error, request, ext_msg, bad_offset)


class RawSocket(Protocol):
    """What ``RtnlSocket`` needs of a socket: a real one fits, so does a test's fake kernel."""

    def send(self, data: bytes) -> int: ...

    def recv(self, bufsize: int) -> bytes: ...

    def close(self) -> None: ...


def open_route_socket(timeout_s: float = DEFAULT_TIMEOUT_S) -> socket.socket:
    """A bound AF_NETLINK/NETLINK_ROUTE socket asking for capped, extended ACKs.

    Raises:
        OSError: the socket cannot be made (no netlink: not Linux).
    """
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
    try:
        for option in (NETLINK_EXT_ACK, NETLINK_CAP_ACK):
            try:
                sock.setsockopt(SOL_NETLINK, option, 1)
            except OSError as exc:  # kernels before 4.12 lack them; errors then have no text
                if exc.errno != errno.ENOPROTOOPT:
                    raise
        sock.bind((0, 0))
        sock.settimeout(timeout_s)
    except BaseException:
        sock.close()
        raise
    return sock


class RtnlSocket:
    """One request at a time to the kernel's rtnetlink, each answered before the next.

    ``request`` raises ``NetlinkError`` for an error ACK and returns the
    messages that came back before the ACK (the answer to a GET).  Messages
    with another sequence number (left from an interrupted request) are
    skipped.  Dumps are not supported: remus only asks for single objects.
    """

    def __init__(self, sock: Optional[RawSocket] = None) -> None:
        self._sock: Optional[RawSocket] = sock if sock is not None else open_route_socket()
        self._seq = 0

    def __enter__(self) -> "RtnlSocket":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the socket (idempotent)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def request(self, req: Request) -> list[tuple[NlMsgHdr, bytes]]:
        """Send ``req`` with NLM_F_ACK and wait for its ACK.

        Raises:
            NetlinkError: the kernel refused it.
            NetlinkDecodeError: the kernel's answer is malformed.
            OSError: the socket failed (``TimeoutError`` after the socket's timeout).
        """
        if self._sock is None:
            raise ValueError("RtnlSocket used after close()")
        self._seq = (self._seq % 0xFFFFFFFF) + 1
        seq = self._seq
        self._sock.send(req.frame(seq))
        name = MESSAGE_NAMES.get(req.msg_type, f"netlink message {req.msg_type}")
        answers: list[tuple[NlMsgHdr, bytes]] = []
        while True:
            for hdr, payload in split_messages(self._sock.recv(RECV_BUFSIZE)):
                if hdr.nlmsg_seq != seq or hdr.nlmsg_type == NLMSG_NOOP:
                    continue
                if hdr.nlmsg_type == NLMSG_ERROR:
                    ack = parse_error(hdr.nlmsg_flags, payload)
                    if ack.error:
                        raise NetlinkError(ack.error, name, ack.ext_msg)
                    return answers
                if hdr.nlmsg_type == NLMSG_OVERRUN:
                    raise NetlinkError(errno.ENOBUFS, name, "netlink overrun")
                answers.append((hdr, payload))

"""The kernel's side of a replicated disk: ``/dev/nbdN`` attached to our server without nbd-client.

The messages are pure: ``getfamily_request`` asks the generic netlink
controller for the ``nbd`` family's id, ``connect_request`` builds
NBD_CMD_CONNECT (include/uapi/linux/nbd-netlink.h) handing the kernel one
end of a socketpair, ``disconnect_request`` NBD_CMD_DISCONNECT.  The kernel
skips the NBD handshake on a socket passed this way, so our end of the pair
is served from the transmission phase on
(``NbdServer.serve_socket(sock, handshake=False)``).

``attach`` does it for real (root, the ``nbd`` module loaded) and raises
``DiskUnavailable`` with the remedy when the module is missing or the caller
lacks CAP_SYS_ADMIN.  Netlink framing comes from ``remus.netbuf.netlink``;
this module never shells out.
"""

from __future__ import annotations

import errno
import socket
import struct
from dataclasses import dataclass
from typing import Optional

from remus.disk.server import NbdServer
from remus.errors import DiskUnavailable
from remus.netbuf.netlink import (
    NLA_F_NESTED,
    NLM_F_REQUEST,
    NetlinkError,
    Request,
    RtnlSocket,
    attr_map,
    rtattr,
    rtattr_str,
)

# include/uapi/linux/netlink.h, genetlink.h
NETLINK_GENERIC = 16
GENL_ID_CTRL = 0x10
CTRL_CMD_GETFAMILY = 3
CTRL_ATTR_FAMILY_ID = 1
CTRL_ATTR_FAMILY_NAME = 2
#: struct genlmsghdr { __u8 cmd; __u8 version; __u16 reserved; }
GENLMSGHDR = struct.Struct("=BBH")

# include/uapi/linux/nbd-netlink.h
NBD_GENL_FAMILY_NAME = "nbd"
NBD_GENL_VERSION = 1
NBD_CMD_CONNECT = 1
NBD_CMD_DISCONNECT = 2
NBD_ATTR_INDEX = 1  # u32
NBD_ATTR_SIZE_BYTES = 2  # u64
NBD_ATTR_BLOCK_SIZE_BYTES = 3  # u64
NBD_ATTR_TIMEOUT = 4  # u64, seconds
NBD_ATTR_SERVER_FLAGS = 5  # u64, the NBD transmission flags
NBD_ATTR_CLIENT_FLAGS = 6  # u64
NBD_ATTR_SOCKETS = 7  # nested NBD_SOCK_ITEM
NBD_SOCK_ITEM = 1  # nested NBD_SOCK_FD
NBD_SOCK_FD = 1  # u32
# include/uapi/linux/nbd.h
NBD_CFLAG_DESTROY_ON_DISCONNECT = 1 << 0
NBD_CFLAG_DISCONNECT_ON_CLOSE = 1 << 1
NBD_MAJOR = 43

MODPROBE_HINT = "the kernel has no nbd support loaded: modprobe nbd"


def genl(family: int, cmd: int, version: int, attrs: bytes) -> Request:
    """A generic netlink request: ``struct genlmsghdr`` then the attributes."""
    return Request(family, NLM_F_REQUEST, GENLMSGHDR.pack(cmd, version, 0) + attrs)


def getfamily_request(name: str = NBD_GENL_FAMILY_NAME) -> Request:
    """CTRL_CMD_GETFAMILY for ``name`` (the controller's version is 1)."""
    return genl(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, 1, rtattr_str(CTRL_ATTR_FAMILY_NAME, name))


def parse_family_id(payload: bytes) -> int:
    """The family id in the controller's answer (payload after nlmsghdr).

    Raises:
        DiskUnavailable: the answer has no family id.
    """
    attrs = attr_map(payload[GENLMSGHDR.size :])
    raw = attrs.get(CTRL_ATTR_FAMILY_ID)
    if raw is None or len(raw) < 2:
        raise DiskUnavailable("the generic netlink controller did not name the nbd family's id")
    return int(struct.unpack_from("=H", raw)[0])


def _u32(attr: int, value: int) -> bytes:
    return rtattr(attr, struct.pack("=I", value))


def _u64(attr: int, value: int) -> bytes:
    return rtattr(attr, struct.pack("=Q", value))


@dataclass(frozen=True)
class ConnectParams:
    """What NBD_CMD_CONNECT tells the kernel about one device."""

    sock_fd: int
    size_bytes: int
    server_flags: int
    #: The logical sector size the guest sees: 512, as for a loop device or most real disks, so a
    #: disk image made for one (an MBR partition table, a file system of 1 KiB blocks) still reads
    #: right.  (4096 made the lab's ext4 image of 1 KiB blocks unmountable: "bad block size 1024".)
    block_size: int = 512
    timeout_s: int = 30
    client_flags: int = NBD_CFLAG_DESTROY_ON_DISCONNECT
    index: Optional[int] = None


def connect_request(family: int, params: ConnectParams) -> Request:
    """NBD_CMD_CONNECT with one socket (``index`` None: the kernel picks a free device)."""
    attrs = b""
    if params.index is not None:
        attrs += _u32(NBD_ATTR_INDEX, params.index)
    attrs += _u64(NBD_ATTR_SIZE_BYTES, params.size_bytes)
    attrs += _u64(NBD_ATTR_BLOCK_SIZE_BYTES, params.block_size)
    attrs += _u64(NBD_ATTR_TIMEOUT, params.timeout_s)
    attrs += _u64(NBD_ATTR_SERVER_FLAGS, params.server_flags)
    attrs += _u64(NBD_ATTR_CLIENT_FLAGS, params.client_flags)
    item = rtattr(NBD_SOCK_ITEM | NLA_F_NESTED, _u32(NBD_SOCK_FD, params.sock_fd))
    attrs += rtattr(NBD_ATTR_SOCKETS | NLA_F_NESTED, item)
    return genl(family, NBD_CMD_CONNECT, NBD_GENL_VERSION, attrs)


def disconnect_request(family: int, index: int) -> Request:
    """NBD_CMD_DISCONNECT of ``/dev/nbd<index>``."""
    return genl(family, NBD_CMD_DISCONNECT, NBD_GENL_VERSION, _u32(NBD_ATTR_INDEX, index))


def parse_connect_reply(payload: bytes) -> int:
    """The device index the kernel chose, from its answer to NBD_CMD_CONNECT.

    Raises:
        DiskUnavailable: the answer names no device.
    """
    raw = attr_map(payload[GENLMSGHDR.size :]).get(NBD_ATTR_INDEX)
    if raw is None or len(raw) < 4:
        raise DiskUnavailable("the kernel connected an nbd device but did not say which")
    return int(struct.unpack_from("=I", raw)[0])


def open_generic_socket(timeout_s: float = 5.0) -> socket.socket:
    """A bound AF_NETLINK/NETLINK_GENERIC socket."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_GENERIC)
    try:
        sock.bind((0, 0))
        sock.settimeout(timeout_s)
    except BaseException:
        sock.close()
        raise
    return sock


def _unavailable(exc: NetlinkError, what: str) -> DiskUnavailable:
    if exc.errno == errno.ENOENT:
        return DiskUnavailable(MODPROBE_HINT)
    if exc.errno == errno.EPERM:
        return DiskUnavailable(f"{what} needs CAP_SYS_ADMIN: run remus's disk server as root")
    return DiskUnavailable(f"{what} failed: {exc}")


class NbdNetlink:
    """Resolves the ``nbd`` family once and connects or disconnects devices through it."""

    def __init__(self, rtnl: Optional[RtnlSocket] = None) -> None:
        self._rtnl = rtnl if rtnl is not None else RtnlSocket(open_generic_socket())
        self.family = self._resolve()

    def _resolve(self) -> int:
        try:
            answers = self._rtnl.request(getfamily_request())
        except NetlinkError as exc:
            raise _unavailable(exc, "looking up the nbd netlink family") from None
        if not answers:
            raise DiskUnavailable(MODPROBE_HINT)
        return parse_family_id(answers[0][1])

    def connect(self, params: ConnectParams) -> int:
        """Attach a device to ``params.sock_fd``; return its index N (``/dev/nbdN``).

        Raises:
            DiskUnavailable: the kernel refused (the message says why and what to do).
        """
        try:
            answers = self._rtnl.request(connect_request(self.family, params))
        except NetlinkError as exc:
            raise _unavailable(exc, "NBD_CMD_CONNECT") from None
        if not answers:
            if params.index is None:
                raise DiskUnavailable("the kernel connected an nbd device but did not say which")
            return params.index
        return parse_connect_reply(answers[0][1])

    def disconnect(self, index: int) -> None:
        """Detach ``/dev/nbd<index>`` (its server sees EOF)."""
        try:
            self._rtnl.request(disconnect_request(self.family, index))
        except NetlinkError as exc:
            raise _unavailable(exc, f"NBD_CMD_DISCONNECT of /dev/nbd{index}") from None

    def close(self) -> None:
        self._rtnl.close()


def attach(server: NbdServer, netlink: Optional[NbdNetlink] = None, index: Optional[int] = None) -> int:
    """Give ``server``'s export to the kernel as ``/dev/nbdN``; return N.

    Raises:
        DiskUnavailable: no nbd module, not root, or the kernel refused.
    """
    nl = netlink if netlink is not None else NbdNetlink()
    kernel_end, our_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        export = server.export
        params = ConnectParams(kernel_end.fileno(), export.size, export.transmission_flags, index=index)
        chosen = nl.connect(params)
    except BaseException:
        our_end.close()
        raise
    finally:
        kernel_end.close()  # the kernel holds its own reference from here on
        if netlink is None:
            nl.close()
    server.serve_socket(our_end, handshake=False)
    return chosen

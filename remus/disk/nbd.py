"""The NBD protocol, server side, sans I/O: bytes in, requests out, replies to bytes.

Implements the fixed newstyle handshake and the simple-reply transmission
phase of the NBD protocol (doc/proto.md of the NBD project; constants as
spelled there).  ``NbdServerConnection`` is fed what the client sent
(``receive_data``) and hands out, one at a time, the transmission requests
it must serve (``next_event`` returns a ``Request``, ``Disconnect`` or
``NEED_DATA``); ``reply`` turns the result of a request into bytes, and
``data_to_send`` returns everything the connection itself has to say (the
greeting, option replies, error replies to invalid requests).

Theory of operation.  The connection moves through::

    GREETING --client flags--> OPTIONS --EXPORT_NAME or GO--> TRANSMISSION --DISC--> CLOSED

Options it does not support (STARTTLS, STRUCTURED_REPLY, meta contexts) get
``NBD_REP_ERR_UNSUP`` and the client goes on.  In transmission, a request
that is well framed but wrong (out of range, unknown command or flag, bad
length) never reaches the caller: the connection queues an error reply
(``EINVAL``, ``ENOSPC`` for a write past the end, ``EPERM`` for a write to a
read-only export) and swallows a WRITE's payload.  A request that cannot be
framed (bad magic, a payload too big to hold) raises ``RemoteProtocolError``:
the stream cannot be resynchronised, so the caller drops that connection.

Never touches a socket, a file or a clock (``remus.disk.server`` does).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field
from typing import ClassVar, Union

from remus.errors import LocalProtocolError, RemoteProtocolError

# --- doc/proto.md (NBD protocol) -----------------------------------------------------
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
NBD_REP_MAGIC = 0x0003E889045565A9
NBD_REQUEST_MAGIC = 0x25609513
NBD_SIMPLE_REPLY_MAGIC = 0x67446698

NBD_FLAG_FIXED_NEWSTYLE = 1 << 0  # handshake flags (server)
NBD_FLAG_NO_ZEROES = 1 << 1
NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0  # client flags
NBD_FLAG_C_NO_ZEROES = 1 << 1

NBD_FLAG_HAS_FLAGS = 1 << 0  # transmission flags
NBD_FLAG_READ_ONLY = 1 << 1
NBD_FLAG_SEND_FLUSH = 1 << 2
NBD_FLAG_SEND_FUA = 1 << 3
NBD_FLAG_ROTATIONAL = 1 << 4
NBD_FLAG_SEND_TRIM = 1 << 5

NBD_CMD_FLAG_FUA = 1 << 0

NBD_REP_ERR = 1 << 31
#: Longest option payload accepted; longer ones are refused with NBD_REP_ERR_TOO_BIG.
MAX_OPTION_BYTES = 4096
#: Longest READ or WRITE served (32 MiB, as the NBD reference server and the kernel use).
MAX_REQUEST_BYTES = 32 << 20
#: Block sizes advertised in NBD_INFO_BLOCK_SIZE (minimum, preferred, maximum).
BLOCK_SIZES = (1, 4096, MAX_REQUEST_BYTES)

_GREETING = struct.Struct(">QQH")
_OPTION = struct.Struct(">QII")
_OPTION_REPLY = struct.Struct(">QIII")
_REQUEST = struct.Struct(">IHHQQI")
_SIMPLE_REPLY = struct.Struct(">IIQ")


class NbdOpt(enum.IntEnum):
    """NBD_OPT_*."""

    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10


class NbdRep(enum.IntEnum):
    """NBD_REP_* (option reply types)."""

    ACK = 1
    SERVER = 2
    INFO = 3
    ERR_UNSUP = NBD_REP_ERR | 1
    ERR_POLICY = NBD_REP_ERR | 2
    ERR_INVALID = NBD_REP_ERR | 3
    ERR_UNKNOWN = NBD_REP_ERR | 6
    ERR_TOO_BIG = NBD_REP_ERR | 9


class NbdInfo(enum.IntEnum):
    """NBD_INFO_* (information types in NBD_REP_INFO)."""

    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class NbdCmd(enum.IntEnum):
    """NBD_CMD_* (transmission request types)."""

    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4


class NbdError(enum.IntEnum):
    """NBD error values in replies (the protocol's fixed numbers, not the host's errno)."""

    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


class State(enum.Enum):
    GREETING = "awaiting the client's flags"
    OPTIONS = "negotiating options"
    TRANSMISSION = "serving requests"
    CLOSED = "closed"


@dataclass(frozen=True)
class Export:
    """What one server offers: a name, a size in bytes, and whether it may be written."""

    name: str
    size: int
    read_only: bool = False
    trim: bool = False

    @property
    def transmission_flags(self) -> int:
        flags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA
        if self.read_only:
            flags |= NBD_FLAG_READ_ONLY
        if self.trim:
            flags |= NBD_FLAG_SEND_TRIM
        return flags


@dataclass(frozen=True)
class Request:
    """A valid transmission request to serve (``data`` only for WRITE)."""

    cmd: NbdCmd
    flags: int
    handle: int
    offset: int
    length: int
    data: bytes = field(default=b"", repr=False)

    @property
    def fua(self) -> bool:
        return bool(self.flags & NBD_CMD_FLAG_FUA)


@dataclass(frozen=True)
class Disconnect:
    """The client sent NBD_CMD_DISC or NBD_OPT_ABORT: close the connection after flushing."""


class NeedData(enum.Enum):
    NEED_DATA = "need data"


NEED_DATA = NeedData.NEED_DATA
Event = Union[Request, Disconnect, NeedData]


class NbdServerConnection:
    """One client's connection (see the module docstring)."""

    SUPPORTED_FLAGS: ClassVar[dict[NbdCmd, int]] = {
        NbdCmd.READ: 0,
        NbdCmd.WRITE: NBD_CMD_FLAG_FUA,
        NbdCmd.DISC: 0,
        NbdCmd.FLUSH: 0,
        NbdCmd.TRIM: NBD_CMD_FLAG_FUA,
    }

    def __init__(self, export: Export, *, handshake: bool = True) -> None:
        """``handshake=False``: the peer is the kernel (NBD_CMD_CONNECT), which skips it."""
        self.export = export
        self.state = State.GREETING if handshake else State.TRANSMISSION
        self.no_zeroes = False
        self._in = bytearray()
        self._out = bytearray(
            _GREETING.pack(NBDMAGIC, IHAVEOPT, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES)
            if handshake
            else b""
        )
        self.invalid_requests = 0

    # -- byte streams -----------------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the client."""
        self._in += data

    def data_to_send(self) -> bytes:
        """Everything the connection itself has queued for the client (may be empty)."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def reply(self, request: Request, error: int = 0, data: bytes = b"") -> bytes:
        """The simple reply to ``request``: ``data`` follows only a successful READ.

        Raises:
            LocalProtocolError: a READ's data does not have the requested length.
        """
        if request.cmd == NbdCmd.READ and not error and len(data) != request.length:
            raise LocalProtocolError(f"READ of {request.length} bytes answered with {len(data)}")
        head = _SIMPLE_REPLY.pack(NBD_SIMPLE_REPLY_MAGIC, error, request.handle)
        return head + data if request.cmd == NbdCmd.READ and not error else head

    def next_event(self) -> Event:
        """The next request to serve, ``Disconnect``, or ``NEED_DATA``.

        Raises:
            RemoteProtocolError: the client broke the framing; drop the connection.
        """
        while True:
            if self.state is State.CLOSED:
                return Disconnect()
            step = {
                State.GREETING: self._greeting,
                State.OPTIONS: self._option,
                State.TRANSMISSION: self._request,
            }[self.state]
            event = step()
            if event is not None:
                return event

    # -- handshake --------------------------------------------------------------------
    def _take(self, n: int) -> bytes:
        chunk = bytes(self._in[:n])
        del self._in[:n]
        return chunk

    def _greeting(self) -> Event | None:
        if len(self._in) < 4:
            return NEED_DATA
        (flags,) = struct.unpack(">I", self._take(4))
        if not flags & NBD_FLAG_C_FIXED_NEWSTYLE or flags & ~(
            NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES
        ):
            raise RemoteProtocolError(f"NBD client flags {flags:#x} unsupported (fixed newstyle only)")
        self.no_zeroes = bool(flags & NBD_FLAG_C_NO_ZEROES)
        self.state = State.OPTIONS
        return None

    def _option(self) -> Event | None:
        if len(self._in) < _OPTION.size:
            return NEED_DATA
        magic, option, length = _OPTION.unpack_from(self._in)
        if magic != IHAVEOPT:
            raise RemoteProtocolError(f"NBD option without IHAVEOPT (magic {magic:#x})")
        if length > MAX_OPTION_BYTES:
            if option == NbdOpt.EXPORT_NAME:
                raise RemoteProtocolError(f"NBD export name of {length} bytes")
            # The payload is still to come; refuse once it is all here and skipped.
            if len(self._in) < _OPTION.size + length:
                return NEED_DATA
            self._take(_OPTION.size + length)
            self._option_reply(option, NbdRep.ERR_TOO_BIG, b"option too long")
            return None
        if len(self._in) < _OPTION.size + length:
            return NEED_DATA
        self._take(_OPTION.size)
        return self._handle_option(option, self._take(length))

    def _option_reply(self, option: int, rep: int, data: bytes = b"") -> None:
        self._out += _OPTION_REPLY.pack(NBD_REP_MAGIC, option, rep, len(data)) + data

    def _handle_option(self, option: int, data: bytes) -> Event | None:
        if option == NbdOpt.EXPORT_NAME:
            return self._export_name(data)
        if option == NbdOpt.ABORT:
            self._option_reply(option, NbdRep.ACK)
            self.state = State.CLOSED
            return Disconnect()
        if option == NbdOpt.LIST:
            if data:
                self._option_reply(option, NbdRep.ERR_INVALID, b"LIST takes no data")
                return None
            name = self.export.name.encode()
            self._option_reply(option, NbdRep.SERVER, struct.pack(">I", len(name)) + name)
            self._option_reply(option, NbdRep.ACK)
            return None
        if option in (NbdOpt.INFO, NbdOpt.GO):
            return self._info_or_go(option, data)
        self._option_reply(option, NbdRep.ERR_UNSUP, b"option not supported")
        return None

    def _known_name(self, name: bytes) -> bool:
        return name in (b"", self.export.name.encode())

    def _export_name(self, name: bytes) -> Event | None:
        if not self._known_name(name):
            raise RemoteProtocolError(f"no NBD export named {name!r}")
        self._out += struct.pack(">QH", self.export.size, self.export.transmission_flags)
        if not self.no_zeroes:
            self._out += bytes(124)
        self.state = State.TRANSMISSION
        return None

    def _info_or_go(self, option: int, data: bytes) -> Event | None:
        parsed = _parse_info_request(data)
        if parsed is None:
            self._option_reply(option, NbdRep.ERR_INVALID, b"malformed INFO/GO request")
            return None
        name, wanted = parsed
        if not self._known_name(name):
            self._option_reply(option, NbdRep.ERR_UNKNOWN, b"no such export")
            return None
        export = struct.pack(">HQH", NbdInfo.EXPORT, self.export.size, self.export.transmission_flags)
        self._option_reply(option, NbdRep.INFO, export)
        if NbdInfo.BLOCK_SIZE in wanted:
            self._option_reply(option, NbdRep.INFO, struct.pack(">HIII", NbdInfo.BLOCK_SIZE, *BLOCK_SIZES))
        if NbdInfo.NAME in wanted:
            self._option_reply(option, NbdRep.INFO, struct.pack(">H", NbdInfo.NAME) + self.export.name.encode())
        self._option_reply(option, NbdRep.ACK)
        if option == NbdOpt.GO:
            self.state = State.TRANSMISSION
        return None

    # -- transmission -----------------------------------------------------------------
    def _request(self) -> Event | None:
        if len(self._in) < _REQUEST.size:
            return NEED_DATA
        magic, flags, cmd, handle, offset, length = _REQUEST.unpack_from(self._in)
        if magic != NBD_REQUEST_MAGIC:
            raise RemoteProtocolError(f"NBD request with bad magic {magic:#010x}")
        payload = length if cmd == NbdCmd.WRITE else 0
        if payload > MAX_REQUEST_BYTES:
            raise RemoteProtocolError(f"NBD write of {length} bytes (at most {MAX_REQUEST_BYTES})")
        if len(self._in) < _REQUEST.size + payload:
            return NEED_DATA
        self._take(_REQUEST.size)
        data = self._take(payload)
        error = self._check(cmd, flags, offset, length)
        if error:
            self.invalid_requests += 1
            self._out += _SIMPLE_REPLY.pack(NBD_SIMPLE_REPLY_MAGIC, error, handle)
            return None
        if cmd == NbdCmd.DISC:
            self.state = State.CLOSED
            return Disconnect()
        return Request(NbdCmd(cmd), flags, handle, offset, length, data)

    def _check(self, cmd: int, flags: int, offset: int, length: int) -> int:
        """The error a request gets, 0 if it is to be served."""
        if cmd not in self.SUPPORTED_FLAGS or (cmd == NbdCmd.TRIM and not self.export.trim):
            return NbdError.EINVAL
        if flags & ~self.SUPPORTED_FLAGS[NbdCmd(cmd)]:
            return NbdError.EINVAL
        if cmd in (NbdCmd.DISC, NbdCmd.FLUSH):
            return 0 if offset == 0 and length == 0 else NbdError.EINVAL
        if cmd in (NbdCmd.WRITE, NbdCmd.TRIM) and self.export.read_only:
            return NbdError.EPERM
        if length == 0 or length > MAX_REQUEST_BYTES:
            return NbdError.EINVAL
        if offset + length > self.export.size:
            return NbdError.ENOSPC if cmd == NbdCmd.WRITE else NbdError.EINVAL
        return 0


def _parse_info_request(data: bytes) -> tuple[bytes, set[int]] | None:
    """(export name, requested info types) of an INFO/GO payload, None if malformed."""
    if len(data) < 4:
        return None
    (name_len,) = struct.unpack_from(">I", data)
    if len(data) < 4 + name_len + 2:
        return None
    name = data[4 : 4 + name_len]
    (count,) = struct.unpack_from(">H", data, 4 + name_len)
    rest = data[4 + name_len + 2 :]
    if len(rest) != 2 * count:
        return None
    return name, set(struct.unpack(f">{count}H", rest))


def request_bytes(cmd: int, offset: int, length: int, *, handle: int = 1, flags: int = 0,
                  data: bytes = b"") -> bytes:
    """A transmission request as a client sends it (for tests and the kernel-side checks)."""
    return _REQUEST.pack(NBD_REQUEST_MAGIC, flags, cmd, handle, offset, length) + data

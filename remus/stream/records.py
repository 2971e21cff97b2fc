"""The records of the replication stream, and how each one's body is laid out.

The stream borrows the record layout of libxc's migration stream v2
(docs/specs/libxc-migration-stream.pandoc, tools/libs/guest/
xg_sr_stream_format.h in Xen 4.17): a record is a ``u32 type``, a ``u32
body_length``, the body, and zero padding up to the next 8-octet boundary.
Record headers and bodies are little-endian, as libxc writes them on x86.

Two families of records share the stream:

* libxc's own records (``XenRecType``: PAGE_DATA, CHECKPOINT, the vCPU and
  shared-info records, ...), carried byte for byte as libxc wrote them, so the
  same code carries a Xen domain's ``xc_domain_save`` output and the simulated
  domain's pages;
* the project's records (``RemusRecType``), numbered from ``0x52450000``
  ("RE"), a range libxc never uses: its types stop at 0x12, plus the optional
  bit 0x80000000.

This module only describes and validates bodies: no sockets, no clocks, no
compression (see ``remus.stream.codec`` and ``remus.stream.compression``).
Every ``decode`` raises ``RemoteProtocolError`` on a malformed body.
"""

from __future__ import annotations

import enum
import json
import struct
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Union

from remus.errors import RemoteProtocolError

# --- libxc migration stream v2 constants (xg_sr_stream_format.h, Xen 4.17) ---
IHDR_MARKER = 0xFFFFFFFFFFFFFFFF
IHDR_ID = 0x58454E46  # "XENF"
IHDR_OPT_BIG_ENDIAN = 1 << 0
DHDR_TYPE_X86_PV = 0x00000001
DHDR_TYPE_X86_HVM = 0x00000002
REC_ALIGN = 8
REC_TYPE_OPTIONAL = 0x80000000
PAGE_DATA_PFN_MASK = 0x000FFFFFFFFFFFFF
PAGE_DATA_TYPE_MASK = 0xF000000000000000
PAGE_DATA_TYPE_SHIFT = 32  # the XEN_DOMCTL_PFINFO_* type, shifted up by 32

# XEN_DOMCTL_PFINFO_* (xen/include/public/domctl.h): page types with no data in the stream.
XEN_DOMCTL_PFINFO_XTAB = 0xF << 28
XEN_DOMCTL_PFINFO_XALLOC = 0xE << 28
XEN_DOMCTL_PFINFO_BROKEN = 0xD << 28
_NO_DATA_TYPES = frozenset(
    (XEN_DOMCTL_PFINFO_XTAB, XEN_DOMCTL_PFINFO_XALLOC, XEN_DOMCTL_PFINFO_BROKEN)
)

PAGE_SIZE = 4096
PAGE_SHIFT = 12

#: A PAGE_DATA record or a page batch holds at most this many entries
#: (libxc's MAX_BATCH_SIZE is the same).
MAX_BATCH_PAGES = 1024

# --- this project's stream header and records ---
STREAM_ID = 0x524D5553  # "RMUS"
STREAM_VERSION = 2  # 2: sealed link, ACCEPT, COMMIT with its capture time
STREAM_HEADER_SIZE = 24
REMUS_REC_BASE = 0x52450000


class XenRecType(enum.IntEnum):
    """libxc's record types (REC_TYPE_* in xg_sr_stream_format.h)."""

    END = 0x00
    PAGE_DATA = 0x01
    X86_PV_INFO = 0x02
    X86_PV_P2M_FRAMES = 0x03
    X86_PV_VCPU_BASIC = 0x04
    X86_PV_VCPU_EXTENDED = 0x05
    X86_PV_VCPU_XSAVE = 0x06
    SHARED_INFO = 0x07
    X86_TSC_INFO = 0x08
    HVM_CONTEXT = 0x09
    HVM_PARAMS = 0x0A
    TOOLSTACK = 0x0B
    X86_PV_VCPU_MSRS = 0x0C
    VERIFY = 0x0D
    CHECKPOINT = 0x0E
    CHECKPOINT_DIRTY_PFN_LIST = 0x0F
    STATIC_DATA_END = 0x10
    X86_CPUID_POLICY = 0x11
    X86_MSR_POLICY = 0x12


class RemusRecType(enum.IntEnum):
    """The project's record types (primary to backup unless noted)."""

    #: JSON object naming the domain, its kind and the replication settings; first record.
    SESSION = REMUS_REC_BASE + 0x01
    #: The 24-byte image header and 16-byte domain header that open the domain's own v2 stream.
    DOMAIN_HEADER = REMUS_REC_BASE + 0x02
    #: A checkpoint's pages, XORed against their last sent version and zstd-compressed.
    PAGE_BATCH = REMUS_REC_BASE + 0x03
    #: The simulated domain's vCPU state.
    SIM_VCPU = REMUS_REC_BASE + 0x04
    #: Checkpoint ``seq`` is complete: its record count and CRC-32 follow.
    COMMIT = REMUS_REC_BASE + 0x05
    #: Backup to primary: checkpoint ``seq`` is received, verified and staged.
    ACK = REMUS_REC_BASE + 0x06
    #: Either direction, on the sender's own schedule: "I am alive".
    HEARTBEAT = REMUS_REC_BASE + 0x07
    #: Either direction: orderly end of the session, with a reason.
    CLOSE = REMUS_REC_BASE + 0x08
    #: Backup to primary, once, before ACK 0: the session is taken, and on what terms
    #: (JSON: the receiver's takeover timeout and mode, whether it fences).
    ACCEPT = REMUS_REC_BASE + 0x09
    #: One write to a replicated disk in this checkpoint's epoch (``remus.disk``).
    DISK_WRITE = REMUS_REC_BASE + 0x0A
    #: A replicated disk's size and BLAKE2b digest as of this checkpoint (verification).
    DISK_DIGEST = REMUS_REC_BASE + 0x0B
    #: Backup to primary, before ACK 0: hashes of the extents of a replica it already holds.
    DISK_HASHES = REMUS_REC_BASE + 0x0C
    # 0x0D..0x0F are reserved for disk replication.


class PageKind(enum.IntEnum):
    """How a page batch carries one entry."""

    NO_DATA = 0  #: the PFN type carries no page (XTAB, XALLOC, BROKEN)
    FULL = 1  #: the whole page, as is
    XOR = 2  #: the page XOR its previously sent version


def page_type_has_data(pfn_word: int) -> bool:
    """True if a PAGE_DATA entry of this (type | pfn) word is followed by page contents."""
    page_type = (pfn_word & PAGE_DATA_TYPE_MASK) >> PAGE_DATA_TYPE_SHIFT
    return page_type not in _NO_DATA_TYPES


#: How deeply the JSON of a SESSION record may nest (the primary writes 3 levels).
MAX_JSON_DEPTH = 16


def json_depth(raw: bytes) -> int:
    """How deeply the arrays and objects of a JSON text nest, without parsing it
    (``json.loads`` recurses, so a hostile text of 20,000 ``[`` would exhaust the stack)."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return deepest


def _need(cond: bool, what: str) -> None:
    if not cond:
        raise RemoteProtocolError(what)


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class StreamHeader:
    """The 24 bytes that open each direction of a replication connection.

    Same layout as libxc's image header (big-endian ``u64 marker``, ``u32 id``,
    ``u32 version``, ``u16 options``, 6 reserved bytes) but with the id
    ``"RMUS"``, so a plain libxc stream is never mistaken for ours.
    """

    version: int = STREAM_VERSION

    _FORMAT: ClassVar[struct.Struct] = struct.Struct(">QIIHHI")

    def encode(self) -> bytes:
        return self._FORMAT.pack(IHDR_MARKER, STREAM_ID, self.version, 0, 0, 0)

    @classmethod
    def decode(cls, raw: bytes) -> "StreamHeader":
        marker, ident, version, options, res1, res2 = cls._FORMAT.unpack(raw)
        _need(marker == IHDR_MARKER, "not a remus replication stream (bad marker)")
        if ident == IHDR_ID:
            raise RemoteProtocolError(
                "this is a plain libxc migration stream (XENF), not a remus replication stream"
            )
        _need(ident == STREAM_ID, f"not a remus replication stream (id {ident:#010x})")
        _need(version == STREAM_VERSION, f"unsupported remus stream version {version}")
        _need(options == 0 and res1 == 0 and res2 == 0, "reserved stream header bits are set")
        return cls(version)


@dataclass(frozen=True)
class Session:
    """First record from the primary: who is replicated, and how.

    ``info`` is a JSON object with at least ``domain`` (name), ``kind``
    (``"sim"`` or ``"xen"``) and ``page_size``; ``sim`` domains add their
    settings under ``"sim"``.
    """

    info: Mapping[str, Any]

    TYPE: ClassVar[int] = RemusRecType.SESSION
    MAX_BODY: ClassVar[int] = 64 * 1024

    def encode_body(self) -> bytes:
        body = json.dumps(dict(self.info), sort_keys=True, separators=(",", ":")).encode()
        if len(body) > self.MAX_BODY:
            raise ValueError("session description too large")
        return body

    @classmethod
    def decode_body(cls, body: bytes) -> "Session":
        _need(len(body) <= cls.MAX_BODY, "session record too large")
        _need(json_depth(body) <= MAX_JSON_DEPTH, f"session record nests deeper than {MAX_JSON_DEPTH} levels")
        try:
            info = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise RemoteProtocolError(f"session record is not JSON: {exc}") from None
        _need(isinstance(info, dict), "session record is not a JSON object")
        for key, kind in (("domain", str), ("kind", str), ("page_size", int)):
            _need(isinstance(info.get(key), kind), f"session record lacks {key!r}")
        _need(info["page_size"] == PAGE_SIZE, f"unsupported page size {info['page_size']}")
        return cls(info)


@dataclass(frozen=True)
class DomainHeader:
    """libxc's image header and domain header, which open every v2 stream.

    They are not records in libxc's stream; here they travel as one record so
    the replication stream stays a sequence of records.
    """

    dom_type: int
    xen_major: int
    xen_minor: int
    page_shift: int = PAGE_SHIFT
    image_version: int = 3

    TYPE: ClassVar[int] = RemusRecType.DOMAIN_HEADER
    _IHDR: ClassVar[struct.Struct] = struct.Struct(">QIIHHI")
    _DHDR: ClassVar[struct.Struct] = struct.Struct("<IHHII")
    SIZE: ClassVar[int] = 40

    def encode_body(self) -> bytes:
        return self._IHDR.pack(IHDR_MARKER, IHDR_ID, self.image_version, 0, 0, 0) + self._DHDR.pack(
            self.dom_type, self.page_shift, 0, self.xen_major, self.xen_minor
        )

    @classmethod
    def decode_body(cls, body: bytes) -> "DomainHeader":
        _need(len(body) == cls.SIZE, f"domain header record has {len(body)} bytes, not 40")
        marker, ident, version, options, _r1, _r2 = cls._IHDR.unpack_from(body)
        _need(marker == IHDR_MARKER and ident == IHDR_ID, "domain header: bad libxc image header")
        _need(version in (2, 3), f"domain header: libxc stream version {version} unsupported")
        _need(not options & IHDR_OPT_BIG_ENDIAN, "domain header: big-endian streams unsupported")
        dom_type, page_shift, _res, major, minor = cls._DHDR.unpack_from(body, 24)
        _need(page_shift == PAGE_SHIFT, f"domain header: page shift {page_shift} unsupported")
        return cls(dom_type, major, minor, page_shift, version)

    @classmethod
    def parse_libxc(cls, raw: bytes) -> "DomainHeader":
        """Parse the 40 bytes libxc writes before its first record."""
        return cls.decode_body(bytes(raw))


@dataclass(frozen=True)
class PageData:
    """libxc's PAGE_DATA record: ``u32 count``, ``u32`` reserved,
    ``u64 pfn[count]`` (type in bits 63-60, PFN in bits 51-0), then the
    contents of each page whose type has data, in order."""

    pfns: tuple[int, ...]
    pages: tuple[bytes, ...]

    TYPE: ClassVar[int] = XenRecType.PAGE_DATA

    def __post_init__(self) -> None:
        if sum(map(page_type_has_data, self.pfns)) != len(self.pages):
            raise ValueError("PageData: page count does not match the pfn types")

    def encode_body(self) -> bytes:
        head = struct.pack(f"<II{len(self.pfns)}Q", len(self.pfns), 0, *self.pfns)
        return head + b"".join(self.pages)

    @classmethod
    def decode_body(cls, body: bytes) -> "PageData":
        _need(len(body) >= 8, "PAGE_DATA record too short")
        count, _res = struct.unpack_from("<II", body)
        _need(0 < count <= MAX_BATCH_PAGES, f"PAGE_DATA count {count} out of range")
        _need(len(body) >= 8 + 8 * count, "PAGE_DATA record shorter than its pfn list")
        pfns = struct.unpack_from(f"<{count}Q", body, 8)
        with_data = sum(map(page_type_has_data, pfns))
        start = 8 + 8 * count
        _need(
            len(body) == start + with_data * PAGE_SIZE,
            f"PAGE_DATA record holds {len(body) - start} bytes of pages, expected {with_data * PAGE_SIZE}",
        )
        view = memoryview(body)
        pages = tuple(
            bytes(view[start + i * PAGE_SIZE : start + (i + 1) * PAGE_SIZE]) for i in range(with_data)
        )
        return cls(pfns, pages)

    @property
    def data_bytes(self) -> int:
        return len(self.pages) * PAGE_SIZE


@dataclass(frozen=True)
class PageBatch:
    """Pages of one checkpoint, compressed as one zstd frame.

    Body: ``u32 count``, ``u32 data_pages``, ``u32 frame_length``, ``u32``
    reserved, ``u64 pfn[count]`` (exactly as in PAGE_DATA), ``u8
    kind[count]`` (``PageKind``) padded to 8 octets, then the zstd frame of the
    ``data_pages`` payloads (4096 bytes each, FULL or XOR, in entry order).
    """

    pfns: tuple[int, ...]
    kinds: tuple[int, ...]
    frame: bytes

    TYPE: ClassVar[int] = RemusRecType.PAGE_BATCH

    @property
    def data_pages(self) -> int:
        return sum(1 for k in self.kinds if k != PageKind.NO_DATA)

    def encode_body(self) -> bytes:
        count = len(self.pfns)
        kinds = bytes(self.kinds)
        kinds += b"\0" * (-len(kinds) % 8)
        head = struct.pack(f"<IIII{count}Q", count, self.data_pages, len(self.frame), 0, *self.pfns)
        return head + kinds + self.frame

    @classmethod
    def decode_body(cls, body: bytes) -> "PageBatch":
        _need(len(body) >= 16, "page batch record too short")
        count, data_pages, frame_len, _res = struct.unpack_from("<IIII", body)
        _need(0 < count <= MAX_BATCH_PAGES, f"page batch count {count} out of range")
        kinds_len = count + (-count % 8)
        start = 16 + 8 * count + kinds_len
        _need(len(body) == start + frame_len, "page batch record length does not match its header")
        pfns = struct.unpack_from(f"<{count}Q", body, 16)
        kinds = tuple(body[16 + 8 * count : 16 + 8 * count + count])
        for pfn, kind in zip(pfns, kinds):
            _need(kind in (0, 1, 2), f"page batch: unknown page kind {kind}")
            _need(
                (kind != PageKind.NO_DATA) == page_type_has_data(pfn),
                "page batch: page kind does not match the pfn type",
            )
        _need(sum(1 for k in kinds if k) == data_pages, "page batch: data page count mismatch")
        return cls(pfns, kinds, bytes(body[start:]))


@dataclass(frozen=True)
class SimVcpu:
    """The simulated domain's vCPU: ``u64 counter`` (only moves forward),
    ``u64 rng_state``, ``u64 writes``, then a 32-byte BLAKE2b digest of the
    whole guest memory at the moment it was captured."""

    counter: int
    rng_state: int
    writes: int
    memory_digest: bytes

    TYPE: ClassVar[int] = RemusRecType.SIM_VCPU
    _FORMAT: ClassVar[struct.Struct] = struct.Struct("<QQQ32s")

    def encode_body(self) -> bytes:
        return self._FORMAT.pack(self.counter, self.rng_state, self.writes, self.memory_digest)

    @classmethod
    def decode_body(cls, body: bytes) -> "SimVcpu":
        _need(len(body) == cls._FORMAT.size, "SIM_VCPU record has the wrong size")
        return cls(*cls._FORMAT.unpack(body))


@dataclass(frozen=True)
class Commit:
    """Checkpoint ``seq`` is complete: ``u64 seq``, ``u32 records`` (how many
    records it had, this one excluded), ``u32 crc32`` (of those records'
    bytes on the wire, headers and padding included), ``u64 captured_unix_ms``
    (the primary's wall clock when it suspended the domain for it, 0 if
    unknown: lets the backup tell a checkpoint's real age even after it was
    itself stalled)."""

    seq: int
    records: int
    crc32: int
    captured_unix_ms: int = 0

    TYPE: ClassVar[int] = RemusRecType.COMMIT
    _FORMAT: ClassVar[struct.Struct] = struct.Struct("<QIIQ")

    def encode_body(self) -> bytes:
        return self._FORMAT.pack(self.seq, self.records, self.crc32, self.captured_unix_ms)

    @classmethod
    def decode_body(cls, body: bytes) -> "Commit":
        _need(len(body) == cls._FORMAT.size, "COMMIT record has the wrong size")
        return cls(*cls._FORMAT.unpack(body))


@dataclass(frozen=True)
class Ack:
    """Backup to primary: checkpoint ``seq`` (``u64``) is held by the backup."""

    seq: int

    TYPE: ClassVar[int] = RemusRecType.ACK

    def encode_body(self) -> bytes:
        return struct.pack("<Q", self.seq)

    @classmethod
    def decode_body(cls, body: bytes) -> "Ack":
        _need(len(body) == 8, "ACK record has the wrong size")
        return cls(struct.unpack("<Q", body)[0])


@dataclass(frozen=True)
class Heartbeat:
    """``u64 count``: how many heartbeats the sender has sent before this one."""

    count: int

    TYPE: ClassVar[int] = RemusRecType.HEARTBEAT

    def encode_body(self) -> bytes:
        return struct.pack("<Q", self.count)

    @classmethod
    def decode_body(cls, body: bytes) -> "Heartbeat":
        _need(len(body) == 8, "HEARTBEAT record has the wrong size")
        return cls(struct.unpack("<Q", body)[0])


class CloseReason(enum.IntEnum):
    """Why a side ends the session in order."""

    STOPPED = 0  #: the primary was asked to stop; the guest keeps running there
    REFUSED = 1  #: the backup will not take this session (host not allowed, bad settings)
    ERROR = 2  #: the sender hit an error it explains in the message


@dataclass(frozen=True)
class Close:
    """Orderly end: ``u32 reason`` (``CloseReason``), ``u32`` reserved, UTF-8 message."""

    reason: int
    message: str = ""

    TYPE: ClassVar[int] = RemusRecType.CLOSE
    MAX_BODY: ClassVar[int] = 4096

    def encode_body(self) -> bytes:
        return struct.pack("<II", self.reason, 0) + self.message.encode()[: self.MAX_BODY - 8]

    @classmethod
    def decode_body(cls, body: bytes) -> "Close":
        _need(8 <= len(body) <= cls.MAX_BODY, "CLOSE record has the wrong size")
        reason, _res = struct.unpack_from("<II", body)
        _need(reason in CloseReason.__members__.values(), f"CLOSE: unknown reason {reason}")
        return cls(reason, body[8:].decode("utf-8", "replace"))


#: Most data one DISK_WRITE record carries; longer writes become several records.
DISK_WRITE_MAX_BYTES = 1 << 20
#: Most disks one session replicates.
MAX_DISKS = 64


@dataclass(frozen=True)
class DiskWrite:
    """``u32 disk`` (index in the session's ``disks``), ``u32`` reserved, ``u64 offset``,
    then the data (1 to ``DISK_WRITE_MAX_BYTES`` bytes)."""

    disk: int
    offset: int
    data: bytes = field(repr=False)

    TYPE: ClassVar[int] = RemusRecType.DISK_WRITE
    _HEAD: ClassVar[struct.Struct] = struct.Struct("<IIQ")

    def encode_body(self) -> bytes:
        return self._HEAD.pack(self.disk, 0, self.offset) + self.data

    @classmethod
    def decode_body(cls, body: bytes) -> "DiskWrite":
        _need(cls._HEAD.size < len(body) <= cls._HEAD.size + DISK_WRITE_MAX_BYTES,
              f"DISK_WRITE record of {len(body)} bytes")
        disk, reserved, offset = cls._HEAD.unpack_from(body)
        _need(disk < MAX_DISKS and reserved == 0, "DISK_WRITE: bad disk index or reserved bits")
        return cls(disk, offset, bytes(body[cls._HEAD.size :]))


@dataclass(frozen=True)
class DiskDigest:
    """``u32 disk``, ``u32`` reserved, ``u64 size``, then the 32-byte BLAKE2b digest of
    the whole disk at the checkpoint's epoch boundary."""

    disk: int
    size: int
    digest: bytes

    TYPE: ClassVar[int] = RemusRecType.DISK_DIGEST
    _FORMAT: ClassVar[struct.Struct] = struct.Struct("<IIQ32s")

    def encode_body(self) -> bytes:
        return self._FORMAT.pack(self.disk, 0, self.size, self.digest)

    @classmethod
    def decode_body(cls, body: bytes) -> "DiskDigest":
        _need(len(body) == cls._FORMAT.size, "DISK_DIGEST record has the wrong size")
        disk, reserved, size, digest = cls._FORMAT.unpack(body)
        _need(disk < MAX_DISKS and reserved == 0, "DISK_DIGEST: bad disk index or reserved bits")
        return cls(disk, size, digest)


#: Bytes of a DISK_HASHES hash (BLAKE2b-128) and most hashes in one record.
DISK_HASH_BYTES = 16
DISK_HASHES_MAX = 2048


@dataclass(frozen=True)
class DiskHashes:
    """``u32 disk``, ``u32 extent_bytes``, ``u64 first`` (extent index), then one 16-byte
    BLAKE2b hash per extent from ``first`` on (at most ``DISK_HASHES_MAX``)."""

    disk: int
    extent_bytes: int
    first: int
    hashes: tuple[bytes, ...]

    TYPE: ClassVar[int] = RemusRecType.DISK_HASHES
    _HEAD: ClassVar[struct.Struct] = struct.Struct("<IIQ")

    def encode_body(self) -> bytes:
        return self._HEAD.pack(self.disk, self.extent_bytes, self.first) + b"".join(self.hashes)

    @classmethod
    def decode_body(cls, body: bytes) -> "DiskHashes":
        _need(len(body) >= cls._HEAD.size, "DISK_HASHES record too short")
        disk, extent_bytes, first = cls._HEAD.unpack_from(body)
        rest = body[cls._HEAD.size :]
        count = len(rest) // DISK_HASH_BYTES
        _need(len(rest) % DISK_HASH_BYTES == 0 and 0 < count <= DISK_HASHES_MAX,
              "DISK_HASHES: bad hash list length")
        _need(disk < MAX_DISKS and extent_bytes > 0, "DISK_HASHES: bad disk index or extent size")
        hashes = tuple(bytes(rest[i : i + DISK_HASH_BYTES]) for i in range(0, len(rest), DISK_HASH_BYTES))
        return cls(disk, extent_bytes, first, hashes)


@dataclass(frozen=True)
class Accept:
    """Backup to primary: the session is taken.  A JSON object with at least
    ``takeover_ms`` (after how long without a word from the primary the backup
    may activate the domain; 0 means never by itself, ``--takeover=manual``),
    ``takeover`` (``"auto"`` or ``"manual"``) and ``fencing`` (bool).  The
    primary must never release output after having been out of contact for
    longer than ``takeover_ms``."""

    takeover_ms: int
    takeover: str = "auto"
    fencing: bool = False

    TYPE: ClassVar[int] = RemusRecType.ACCEPT
    MAX_BODY: ClassVar[int] = 4096

    def encode_body(self) -> bytes:
        info = {"takeover_ms": self.takeover_ms, "takeover": self.takeover, "fencing": self.fencing}
        return json.dumps(info, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def decode_body(cls, body: bytes) -> "Accept":
        _need(len(body) <= cls.MAX_BODY, "ACCEPT record too large")
        try:
            info = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise RemoteProtocolError(f"ACCEPT record is not JSON: {exc}") from None
        _need(isinstance(info, dict), "ACCEPT record is not a JSON object")
        takeover_ms = info.get("takeover_ms")
        _need(isinstance(takeover_ms, int) and not isinstance(takeover_ms, bool) and takeover_ms >= 0,
              "ACCEPT record lacks a valid takeover_ms")
        _need(info.get("takeover") in ("auto", "manual"), "ACCEPT record lacks a valid takeover mode")
        _need(isinstance(info.get("fencing"), bool), "ACCEPT record lacks fencing")
        return cls(takeover_ms, info["takeover"], info["fencing"])


@dataclass(frozen=True)
class Checkpoint:
    """libxc's CHECKPOINT record (empty body): the domain records before it form
    a consistent state."""

    TYPE: ClassVar[int] = XenRecType.CHECKPOINT

    def encode_body(self) -> bytes:
        return b""

    @classmethod
    def decode_body(cls, body: bytes) -> "Checkpoint":
        _need(body == b"", "CHECKPOINT record must be empty")
        return cls()


@dataclass(frozen=True)
class XenRecord:
    """Any other libxc record, kept opaque: ``type`` and ``body`` as libxc wrote them."""

    type: int
    body: bytes = field(repr=False)

    @property
    def TYPE(self) -> int:  # noqa: N802 - same spelling as the class attribute of the others
        return self.type

    def encode_body(self) -> bytes:
        return self.body


Record = Union[
    Session, DomainHeader, PageData, PageBatch, SimVcpu, Commit, Ack, Heartbeat, Close, Accept, Checkpoint,
    XenRecord, DiskWrite, DiskDigest, DiskHashes,
]

#: Record classes by wire type; types not listed are libxc's and become ``XenRecord``.
RECORD_CLASSES: dict[int, Any] = {
    cls.TYPE: cls
    for cls in (Session, DomainHeader, PageData, PageBatch, SimVcpu, Commit, Ack, Heartbeat, Close, Accept,
                Checkpoint, DiskWrite, DiskDigest, DiskHashes)
}


def record_type(record: Record) -> int:
    """The wire type of ``record``."""
    return int(record.TYPE)


def decode_record(rtype: int, body: bytes) -> Record:
    """Build the record of wire type ``rtype`` from its body.

    Raises:
        RemoteProtocolError: the type is in the project's range but unknown,
            or the body is malformed.
    """
    cls = RECORD_CLASSES.get(rtype)
    if cls is not None:
        result: Record = cls.decode_body(body)
        return result
    if REMUS_REC_BASE <= rtype < REMUS_REC_BASE + 0x10000:
        raise RemoteProtocolError(f"unknown remus record type {rtype:#010x}")
    return XenRecord(rtype, bytes(body))

"""xl's streams built from the backup's image: the save file ``xl restore`` reads to recreate a
domain, and the checkpointed stream ``xl migrate-receive -r`` reads to keep a standby.

Pure: no files, no processes, no Xen.  ``remus.xen.restore`` feeds the save
file to ``xl restore``; ``remus.xen.standby`` feeds the checkpointed stream
(``checkpointed_opening``, then ``checkpoint_pieces`` per checkpoint: the same
headers and records, with libxc's CHECKPOINT and libxl's CHECKPOINT_END where
the save file has END records; libxc's END only at failover, ``LIBXC_END``) to
``xl migrate-receive -r``.

The file is what ``xl save`` writes (Xen 4.17, tools/xl/xl_saverestore.c and
xl.h; docs/specs/libxl-migration-stream.pandoc and libxc-migration-stream.pandoc)::

    xl header     char magic[32] "Xen saved domain, xl format\\n \\0 \\r",
                  u32 byteorder 0x01020304, u32 mandatory_flags (JSON | STREAMv2),
                  u32 optional_flags 0, u32 optional_data_len
    optional data u32 config length, the libxl domain configuration as JSON
                  with its trailing NUL (xl hands it to libxl as a C string)
    libxl stream  big-endian u64 ident "LibxlFmt", u32 version 2, u32 options 0;
                  a LIBXC_CONTEXT record, after which libxc's own stream follows;
                  then the libxl END record
    libxc stream  a PLAIN (non-checkpointed) v2 stream: image and domain headers,
                  the static records that opened the Remus stream before its
                  first page (X86_PV_INFO, CPUID/MSR policy, STATIC_DATA_END,
                  X86_PV_P2M_FRAMES), every page in its latest version, the state
                  records of the latest checkpoint (X86_TSC_INFO, SHARED_INFO,
                  X86_PV_VCPU_*), END

libxl's stream header and libxc's image header are big-endian; every other
field is host-endian, which is little-endian on the x86 hosts Xen's PV guests
run on.  Only PV domains: an HVM restore also needs the device model's state,
which the Remus stream does not carry here.
"""

from __future__ import annotations

import itertools
import json
import struct
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence

from remus.errors import ActivationError
from remus.backup.image import Image, PageStore
from remus.stream.codec import encode_record
from remus.stream.records import (
    DHDR_TYPE_X86_PV,
    MAX_BATCH_PAGES,
    PAGE_SIZE,
    DomainHeader,
    Record,
    XenRecord,
    XenRecType,
    record_type,
)

# tools/xl/xl.h (Xen 4.17)
XL_SAVEFILE_MAGIC = b"Xen saved domain, xl format\n \0 \r"
SAVEFILE_BYTEORDER_VALUE = 0x01020304
XL_MANDATORY_FLAG_JSON = 1 << 0
XL_MANDATORY_FLAG_STREAMv2 = 1 << 1
_XL_HEADER = struct.Struct("<32sIIII")

# tools/libs/light/libxl_sr_stream_format.h (Xen 4.17)
RESTORE_STREAM_IDENT = 0x4C6962786C466D74  # "LibxlFmt"
RESTORE_STREAM_VERSION = 2
LIBXL_REC_TYPE_END = 0
LIBXL_REC_TYPE_LIBXC_CONTEXT = 1
LIBXL_REC_TYPE_CHECKPOINT_END = 4
_LIBXL_HEADER = struct.Struct(">QII")
_LIBXL_RECORD = struct.Struct("<II")


@dataclass(frozen=True)
class DomainConfig:
    """A domain's libxl configuration, as the primary sent it (``xl list -l``'s ``config``)."""

    name: str
    json: dict[str, Any]

    @classmethod
    def parse(cls, text: object) -> "DomainConfig":
        """Check the configuration a session carried.

        Raises:
            ActivationError: it is not a JSON object naming the domain in ``c_info.name``.
        """
        if not isinstance(text, str):
            raise ActivationError("the primary sent no libxl configuration of the domain")
        try:
            config = json.loads(text)
        except ValueError as exc:
            raise ActivationError(f"the domain's libxl configuration is not JSON: {exc}") from None
        c_info = config.get("c_info") if isinstance(config, dict) else None
        name = c_info.get("name") if isinstance(c_info, dict) else None
        if not isinstance(name, str) or not name:
            raise ActivationError("the domain's libxl configuration names no domain (c_info.name)")
        return cls(name, config)

    def for_restore(self) -> bytes:
        """The configuration as xl's save file holds it: JSON, then a NUL.

        As ``xl save`` does, the domain id is cleared so that libxl picks a
        free one (the old id may still be in use, or recently used).
        """
        config = dict(self.json)
        config["c_info"] = dict(config["c_info"], domid=0)
        return json.dumps(config, separators=(",", ":")).encode() + b"\0"


def xl_header(config: bytes) -> bytes:
    """xl's save-file header and its optional data (the configuration)."""
    optional = struct.pack("<I", len(config)) + config
    flags = XL_MANDATORY_FLAG_JSON | XL_MANDATORY_FLAG_STREAMv2
    return _XL_HEADER.pack(XL_SAVEFILE_MAGIC, SAVEFILE_BYTEORDER_VALUE, flags, 0, len(optional)) + optional


def libxl_header() -> bytes:
    """The libxl stream header (big-endian, whatever the host)."""
    return _LIBXL_HEADER.pack(RESTORE_STREAM_IDENT, RESTORE_STREAM_VERSION, 0)


def libxl_record(rtype: int) -> bytes:
    """An empty libxl record (END, LIBXC_CONTEXT, CHECKPOINT_END)."""
    return _LIBXL_RECORD.pack(rtype, 0)


#: libxc's END record (8 octets: one write, never split by a pipe).  It closes a save file's
#: libxc stream.  Written to a standby after a complete checkpoint, it is the failover:
#: libxc's record loop stops at END and completes the domain from the last checkpoint at once,
#: as at the end of the stream, but without waiting for every writer of the pipe to close
#: (xg_sr_restore.c ``restore``; libxl then completes its stream, libxl_stream_read.c).
LIBXC_END = encode_record(XenRecord(XenRecType.END, b""))


def check_restorable(image: Image) -> DomainHeader:
    """The image's domain header, once the image is known to make a PV restore stream.

    Raises:
        ActivationError: no complete checkpoint, not a PV domain, or records a
            restore cannot do without are missing.
    """
    header = image.header
    if image.seq == 0 or header is None:
        raise ActivationError("no complete checkpoint to restore")
    if header.dom_type != DHDR_TYPE_X86_PV:
        raise ActivationError(f"only x86 PV domains can be restored (libxc domain type {header.dom_type})")
    static = {record_type(r) for r in image.static_records()}
    state = {record_type(r) for r in image.state_records()}
    for needed, where in ((XenRecType.X86_PV_INFO, static), (XenRecType.X86_PV_P2M_FRAMES, static),
                          (XenRecType.X86_PV_VCPU_BASIC, state)):
        if needed not in where:
            raise ActivationError(f"checkpoint {image.seq} cannot be restored: it has no {needed.name} record")
    return header


def libxc_stream(image: Image) -> Iterator[bytes]:
    """A PLAIN libxc v2 stream of the image, in pieces.

    A piece is the headers, a whole non-page record, the head of a PAGE_DATA
    record (record header, count, pfn words) or one page: the image's own
    ``bytes``, never copied, so a writer can hand them to ``os.writev`` as
    they are.  The image is checked at once; the pieces are made as they are
    asked for.

    Raises:
        ActivationError: as ``check_restorable``.
    """
    return _libxc_pieces(image, check_restorable(image))


def _libxc_pieces(image: Image, header: DomainHeader) -> Iterator[bytes]:
    yield header.encode_body()
    for record in image.static_records():
        yield encode_record(record)
    yield from page_data(image.pages, image.pages if isinstance(image.pages, PageStore) else sorted(image.pages))
    for record in image.state_records():
        yield encode_record(record)
    yield LIBXC_END


def page_data(pages: Mapping[int, tuple[int, Optional[bytes]]], pfns: Iterable[int]) -> Iterator[bytes]:
    """PAGE_DATA records of ``pfns`` (in that order), in pieces: the head of each record
    (record header, count, pfn words) and then its pages, the ``bytes`` of ``pages`` as they are.
    ``pfns`` is consumed a record at a time; ``pages`` is read as each record is built."""
    pfns = iter(pfns)
    while True:
        entries = [pages[pfn] for pfn in itertools.islice(pfns, MAX_BATCH_PAGES)]
        if not entries:
            return
        datas = [data for _word, data in entries if data is not None]
        # PAGE_DATA (see PageData): 8-octet aligned without padding, pages being 4096 octets.
        count = len(entries)
        head = struct.pack(f"<IIII{count}Q", XenRecType.PAGE_DATA, 8 + 8 * count + PAGE_SIZE * len(datas),
                           count, 0, *(word for word, _data in entries))
        yield head
        yield from datas


def save_file(image: Image, config: DomainConfig) -> Iterator[bytes]:
    """The whole xl save file, in pieces (see ``libxc_stream``).

    The image is checked at once; the records are built as they are asked for.

    Raises:
        ActivationError: as ``check_restorable``.
    """
    opening = xl_header(config.for_restore()) + libxl_header() + libxl_record(LIBXL_REC_TYPE_LIBXC_CONTEXT)
    return itertools.chain((opening,), libxc_stream(image), (libxl_record(LIBXL_REC_TYPE_END),))


# -- the checkpointed stream of a standby (``remus.xen.standby``) -----------------------------
#: The last piece of every checkpoint: libxc's CHECKPOINT and libxl's CHECKPOINT_END, 16 bytes
#: to be written in one write (a pipe write of at most PIPE_BUF bytes is never split), so xl
#: never sees the end of the stream between them.
CHECKPOINT_TAIL = encode_record(XenRecord(XenRecType.CHECKPOINT, b"")) + libxl_record(LIBXL_REC_TYPE_CHECKPOINT_END)


def checkpointed_opening(config: DomainConfig) -> bytes:
    """What ``xl migrate-receive -r`` reads before libxc's stream: xl's header with the
    configuration, libxl's stream header and its LIBXC_CONTEXT record."""
    return xl_header(config.for_restore()) + libxl_header() + libxl_record(LIBXL_REC_TYPE_LIBXC_CONTEXT)


def checkpoint_pieces(pages: Mapping[int, tuple[int, Optional[bytes]]], pfns: Iterable[int],
                      state: Sequence[Record], opening: Sequence[Record] = (),
                      header: Optional[DomainHeader] = None) -> Iterator[bytes]:
    """One checkpoint of a REMUS libxc stream, in pieces, ending with ``CHECKPOINT_TAIL``.

    The first checkpoint of a stream passes ``header`` (libxc's image and domain
    headers) and ``opening`` (the static records, sent once: libxc refuses them
    twice); every checkpoint carries the pages ``pfns`` (their latest
    contents in ``pages``) and ``state`` (TSC, shared info, vCPU records).
    """
    if header is not None:
        yield header.encode_body()
    for record in opening:
        yield encode_record(record)
    yield from page_data(pages, pfns)
    for record in state:
        yield encode_record(record)
    yield CHECKPOINT_TAIL

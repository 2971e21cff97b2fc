"""The control socket between ``remus`` and a per-disk server process (``remus.disk.daemon``).

A Xen guest's disk is served by its own process, started by the
``block-remus`` hotplug script at ``xl create``; the epochs are recorded
there.  ``remus`` drives them through a unix socket, one request at a time,
each a command byte, a ``u64`` length and a payload:

====  =========================================  ==========================================
byte  request (payload)                          answer's payload
====  =========================================  ==========================================
``I`` describe the disk                          JSON {"path", "size"}
``S`` protection starts (record from now)        (empty)
``H`` the backup's extent hashes (DISK_HASHES    (empty)
      records, framed): the first boundary
      sends only the extents that differ
``B`` epoch boundary (``u32`` disk index)        the epoch's records, framed back to back
``X`` protection ends                            (empty)
====  =========================================  ==========================================

Every answer is ``K`` + ``u64 length`` + payload, or ``E`` + ``u64 length`` +
a UTF-8 error message.  When remus's connection closes (remus stopped or
died), recording stops.  ``serve_control`` answers on the server's side;
``ControlledDisk`` is the checkpointed device on ``remus``'s side (the same
hooks as ``remus.disk.device.DiskDevice``).
"""

from __future__ import annotations

import json
import logging
import socket
import struct
from typing import Any, Callable, Sequence

from remus.disk.epochs import RecordingImage, collect_hashes
from remus.errors import DiskError, RemoteProtocolError
from remus.stream.codec import encode_record
from remus.stream.records import REC_ALIGN, DiskHashes, Record, decode_record

log = logging.getLogger(__name__)

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
#: Longest request payload a disk server takes (DISK_HASHES of a 16 TiB disk).
MAX_REQUEST_BYTES = 512 << 20
_REC_HEAD = struct.Struct("<II")


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(min(n - len(data), 1 << 20))
        if not chunk:
            raise DiskError("the disk server closed its control socket")
        data += chunk
    return bytes(data)


def split_records(data: bytes) -> list[Record]:
    """The records framed back to back in ``data`` (header, body, padding each).

    Raises:
        RemoteProtocolError: ``data`` is not whole records.
    """
    records: list[Record] = []
    offset = 0
    while offset < len(data):
        if len(data) - offset < _REC_HEAD.size:
            raise RemoteProtocolError("truncated record from the disk server")
        rtype, length = _REC_HEAD.unpack_from(data, offset)
        start = offset + _REC_HEAD.size
        if start + length > len(data):
            raise RemoteProtocolError("truncated record from the disk server")
        records.append(decode_record(rtype, data[start : start + length]))
        offset = start + length + (-length % REC_ALIGN)
    return records


def answer(target: RecordingImage, command: bytes, payload: bytes) -> bytes:
    """The server's answer to one request (see the module docstring)."""
    try:
        if command == b"I":
            return _ok(json.dumps({"path": target.image.path, "size": target.size}).encode())
        if command == b"S":
            target.start()
            return _ok(b"")
        if command == b"H":
            hashes = [r for r in split_records(payload) if isinstance(r, DiskHashes)]
            target.peer_hashes = lambda: collect_hashes(hashes, hashes[0].disk if hashes else 0)
            return _ok(b"")
        if command == b"X":
            target.stop()
            return _ok(b"")
        if command == b"B" and len(payload) == _U32.size:
            (disk,) = _U32.unpack(payload)
            return _ok(b"".join(encode_record(r) for r in target.boundary(disk)))
        message = f"unknown control request {command!r}"
    except (DiskError, RemoteProtocolError) as exc:
        message = str(exc)
    raw = message.encode()
    return b"E" + _U64.pack(len(raw)) + raw


def _ok(payload: bytes) -> bytes:
    return b"K" + _U64.pack(len(payload)) + payload


def serve_control(conn: socket.socket, target: RecordingImage) -> None:
    """Answer requests on ``conn`` until the peer closes it; then stop recording if it started."""
    started = False
    with conn:
        try:
            while True:
                head = conn.recv(1)
                if not head:
                    return
                (length,) = _U64.unpack(_recv_exact(conn, _U64.size))
                if length > MAX_REQUEST_BYTES:
                    log.warning("control request of %d bytes refused; dropping the connection", length)
                    return
                payload = _recv_exact(conn, length)
                started = started or head == b"S"
                conn.sendall(answer(target, head, payload))
        except (OSError, DiskError) as exc:
            log.warning("control connection failed: %s", exc)
        finally:
            if started:
                target.stop()


class ControlledDisk:
    """Disk ``index`` of the session, recorded by a server process behind ``control_path``."""

    def __init__(self, index: int, control_path: str, timeout_s: float = 30.0) -> None:
        """Connect and ask what the disk is.

        Raises:
            DiskError: the server is not there (the hotplug script did not start it).
        """
        self.index = index
        self.control_path = control_path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout_s)
        try:
            self.sock.connect(control_path)
        except OSError as exc:
            self.sock.close()
            raise DiskError(
                f"no remus disk server at {control_path} ({exc.strerror}): "
                "was the domain created with script=block-remus?"
            ) from None
        self.info: dict[str, Any] = json.loads(self._call(b"I"))
        self._pending: list[Record] = []
        #: The backup's DISK_HASHES (``link_to_channel`` sets it), sent before the first boundary.
        self.peer_hashes: Callable[[], Sequence[DiskHashes]] = list
        self._first = True

    @property
    def name(self) -> str:
        return f"disk{self.index}:{self.info.get('path')}"

    def session_entry(self) -> dict[str, object]:
        return {"path": self.info["path"], "size": self.info["size"]}

    def _call(self, command: bytes, payload: bytes = b"") -> bytes:
        self.sock.sendall(command + _U64.pack(len(payload)) + payload)
        status = _recv_exact(self.sock, 1)
        (length,) = _U64.unpack(_recv_exact(self.sock, 8))
        payload = _recv_exact(self.sock, length)
        if status == b"K":
            return payload
        if status == b"E":
            raise DiskError(f"disk server {self.control_path}: {payload.decode(errors='replace')}")
        raise RemoteProtocolError(f"disk server {self.control_path} answered {status!r}")

    def install(self) -> None:
        self._first = True
        self._call(b"S")

    def postsuspend(self) -> None:
        if self._first:
            self._first = False
            mine = [h for h in self.peer_hashes() if h.disk == self.index]
            if mine:
                self._call(b"H", b"".join(encode_record(h) for h in mine))
        self._pending = split_records(self._call(b"B", _U32.pack(self.index)))

    def preresume(self) -> None:
        pass

    def records(self, seq: int) -> Sequence[Record]:
        pending, self._pending = self._pending, []
        return pending

    def commit(self) -> None:
        pass

    def release(self) -> None:
        try:
            self._call(b"X")
        except (OSError, DiskError) as exc:
            log.warning("stopping disk recording at %s: %s", self.control_path, exc)
        finally:
            self.sock.close()

"""The control socket between ``remus`` and a per-disk server process (``remus.disk.daemon``).

A Xen guest's disk is served by its own process, started by the
``block-remus`` hotplug script at ``xl create``; the epochs are recorded
there.  ``remus`` drives them through a unix socket, one request at a time:

====  ====================================  ==========================================
byte  request                               answer's payload
====  ====================================  ==========================================
``I`` describe the disk                     JSON {"path", "size"}
``S`` protection starts (record from now)   (empty)
``B`` epoch boundary (guest suspended)      the epoch's records, framed back to back
``X`` protection ends                       (empty)
====  ====================================  ==========================================

Every answer is ``K`` + ``u64 length`` + payload, or ``E`` + ``u64 length`` +
a UTF-8 error message.  ``serve_control``
answers on the server's side; ``ControlledDisk`` is the checkpointed device
on ``remus``'s side (the same hooks as ``remus.disk.device.DiskDevice``).
"""

from __future__ import annotations

import json
import logging
import socket
import struct
from typing import Any, Sequence

from remus.disk.epochs import RecordingImage
from remus.errors import DiskError, RemoteProtocolError
from remus.stream.codec import encode_record
from remus.stream.records import REC_ALIGN, Record, decode_record

log = logging.getLogger(__name__)

_U64 = struct.Struct("<Q")
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


def answer(target: RecordingImage, disk: int, command: bytes) -> bytes:
    """The server's answer to one request byte (see the module docstring)."""
    try:
        if command == b"I":
            return _ok(json.dumps({"path": target.image.path, "size": target.size}).encode())
        if command == b"S":
            target.start()
            return _ok(b"")
        if command == b"X":
            target.stop()
            return _ok(b"")
        if command == b"B":
            return _ok(b"".join(encode_record(r) for r in target.boundary(disk)))
        message = f"unknown control request {command!r}"
    except DiskError as exc:
        message = str(exc)
    raw = message.encode()
    return b"E" + _U64.pack(len(raw)) + raw


def _ok(payload: bytes) -> bytes:
    return b"K" + _U64.pack(len(payload)) + payload


def serve_control(conn: socket.socket, target: RecordingImage, disk: int = 0) -> None:
    """Answer requests on ``conn`` until the peer closes it."""
    with conn:
        while True:
            command = conn.recv(1)
            if not command:
                return
            conn.sendall(answer(target, disk, command))


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

    @property
    def name(self) -> str:
        return f"disk{self.index}:{self.info.get('path')}"

    def session_entry(self) -> dict[str, object]:
        return {"path": self.info["path"], "size": self.info["size"]}

    def _call(self, command: bytes) -> bytes:
        self.sock.sendall(command)
        status = _recv_exact(self.sock, 1)
        (length,) = _U64.unpack(_recv_exact(self.sock, 8))
        payload = _recv_exact(self.sock, length)
        if status == b"K":
            return payload
        if status == b"E":
            raise DiskError(f"disk server {self.control_path}: {payload.decode(errors='replace')}")
        raise RemoteProtocolError(f"disk server {self.control_path} answered {status!r}")

    def install(self) -> None:
        self._call(b"S")

    def postsuspend(self) -> None:
        self._pending = split_records(self._call(b"B"))

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

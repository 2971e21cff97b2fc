"""A threaded NBD server over one raw disk image: the data path of a replicated disk.

``ImageFile`` is the data path and nothing else: ``pread``/``pwrite`` on the
image's file descriptor and ``fdatasync`` for FLUSH and FUA, so it can move
to C without changing its callers.  ``NbdServer`` accepts connections on a
listening socket (unix or TCP) or takes an already connected one (the
kernel's end of a socketpair) and serves each in its own thread: it reads
bytes, lets ``remus.disk.nbd`` turn them into requests, serves them one by
one against a ``BlockTarget`` and writes the replies.  A connection that
breaks the protocol is logged and dropped; the server and its other
connections go on.

Writes go through ``BlockTarget.write``: the plain ``ImageFile`` writes and
returns; a ``remus.disk.epochs.RecordingImage`` also records the write in
the current epoch, before the reply leaves (the epoch rule in
``remus.disk.epochs`` depends on that order).  This module never decides
which epoch a write belongs to and never talks to the replication stream.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Callable, Optional, Protocol, Union

from remus.disk.nbd import (
    Disconnect,
    Export,
    NbdCmd,
    NbdError,
    NbdServerConnection,
    NeedData,
    Request,
)
from remus.errors import DiskError, RemoteProtocolError

log = logging.getLogger(__name__)

#: Bytes read from a connection at a time.
RECV_BYTES = 1 << 20


class BlockTarget(Protocol):
    """What requests are served against."""

    @property
    def size(self) -> int:
        """Size in bytes."""

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset``."""

    def write(self, offset: int, data: bytes, fua: bool) -> None:
        """Write ``data`` at ``offset``; on stable storage before returning if ``fua``."""

    def flush(self) -> None:
        """Everything written so far is on stable storage."""


class ImageFile:
    """A raw image file, accessed with pread/pwrite/fdatasync only."""

    def __init__(self, path: str, *, read_only: bool = False) -> None:
        """Open ``path``.

        Raises:
            DiskError: the image cannot be opened.
        """
        self.path = path
        self.read_only = read_only
        try:
            self.fd = os.open(path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
        except OSError as exc:
            raise DiskError(f"cannot open disk image {path}: {exc.strerror}") from None
        self.size = os.fstat(self.fd).st_size

    def read(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        if len(data) != length:  # the file shrank under us
            raise OSError(5, f"short read at {offset}")
        return data

    def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        view = memoryview(data)
        while view:
            done = os.pwrite(self.fd, view, offset)
            view, offset = view[done:], offset + done
        if fua:
            os.fdatasync(self.fd)

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


Address = Union[str, tuple[str, int]]


class NbdServer:
    """Serves ``target`` as export ``name`` to every connection (see the module docstring)."""

    def __init__(self, target: BlockTarget, name: str = "", *, read_only: bool = False) -> None:
        self.target = target
        self.export = Export(name, target.size, read_only=read_only)
        self._listener: Optional[socket.socket] = None
        self._threads: list[threading.Thread] = []
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closing = False
        self.address: Optional[Address] = None
        self.dropped = 0

    # -- lifecycle ----------------------------------------------------------------------
    def listen_unix(self, path: str) -> str:
        """Listen on a unix socket at ``path``; return it."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
        self._listen(sock, path)
        return path

    def listen_tcp(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        """Listen on ``host:port`` (0: any free port); return the address."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        addr = sock.getsockname()
        self._listen(sock, (addr[0], addr[1]))
        return (addr[0], addr[1])

    def _listen(self, sock: socket.socket, address: Address) -> None:
        sock.listen(8)
        self._listener = sock
        self.address = address
        self._spawn(self._accept_loop, sock)

    def serve_socket(self, sock: socket.socket, *, handshake: bool = True) -> threading.Thread:
        """Serve one already connected socket in a thread.

        ``handshake=False`` for the kernel's socketpair end: it sends requests at once.
        """
        return self._spawn(lambda s: self._serve(s, handshake), sock)

    def close(self) -> None:
        """Stop accepting, shut every connection down, wait for the threads."""
        self._closing = True
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
            if isinstance(self.address, str):
                try:
                    os.unlink(self.address)
                except FileNotFoundError:
                    pass
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in self._threads:
            thread.join()

    def __enter__(self) -> "NbdServer":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _spawn(self, target: Callable[[socket.socket], None], sock: socket.socket) -> threading.Thread:
        thread = threading.Thread(target=target, args=(sock,), daemon=True, name="nbd")
        self._threads.append(thread)
        thread.start()
        return thread

    def _accept_loop(self, listener: socket.socket) -> None:
        while not self._closing:
            try:
                conn, _peer = listener.accept()
            except OSError:
                return
            self._spawn(self._serve, conn)

    # -- one connection ------------------------------------------------------------------
    def _serve(self, sock: socket.socket, handshake: bool = True) -> None:
        with self._lock:
            self._conns.add(sock)
        conn = NbdServerConnection(self.export, handshake=handshake)
        try:
            self._converse(sock, conn)
        except RemoteProtocolError as exc:
            self.dropped += 1
            log.warning("NBD client dropped: %s", exc)
        except OSError as exc:
            if not self._closing:
                log.warning("NBD connection failed: %s", exc)
        finally:
            with self._lock:
                self._conns.discard(sock)
            sock.close()

    def _converse(self, sock: socket.socket, conn: NbdServerConnection) -> None:
        greeting = conn.data_to_send()
        if greeting:
            sock.sendall(greeting)
        while True:
            event = conn.next_event()
            pending = conn.data_to_send()
            if pending:
                sock.sendall(pending)
            if isinstance(event, Disconnect):
                if not self.export.read_only:
                    self.target.flush()
                return
            if isinstance(event, NeedData):
                data = sock.recv(RECV_BYTES)
                if not data:
                    return
                conn.receive_data(data)
                continue
            sock.sendall(self._answer(conn, event))

    def _answer(self, conn: NbdServerConnection, request: Request) -> bytes:
        try:
            if request.cmd == NbdCmd.READ:
                return conn.reply(request, 0, self.target.read(request.offset, request.length))
            if request.cmd == NbdCmd.WRITE:
                self.target.write(request.offset, request.data, request.fua)
            elif request.cmd == NbdCmd.FLUSH:
                self.target.flush()
            else:
                return conn.reply(request, NbdError.EINVAL)
            return conn.reply(request)
        except OSError as exc:
            log.error("NBD %s at %d failed: %s", request.cmd.name, request.offset, exc)
            return conn.reply(request, NbdError.ENOSPC if exc.errno == 28 else NbdError.EIO)

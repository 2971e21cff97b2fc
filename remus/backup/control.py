"""The receiver's local control socket: ``remus-receiver status`` and ``activate``.

A Unix stream socket (default ``/run/remus/receiver.sock``, mode 0600, so only
root, or whoever runs the receiver, may use it).  A client sends one JSON
object on one line (``{"op": "status"}`` or ``{"op": "activate", "domain":
"vm1"}``) and reads one JSON object on one line back, then the server closes
the connection.  ``ControlSocket`` is the server's end, polled from the
receiver's own loop (never blocking it); ``request`` is the client's.

Only this module knows the wire form; what the answers mean is the server's.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import time
from typing import Any, Callable

from remus.errors import RemusError, TransportError

DEFAULT_CONTROL_SOCKET = "/run/remus/receiver.sock"
#: A request is one short line; anything longer is refused unread.
MAX_REQUEST_BYTES = 4096
#: A client that has not sent its line by then is dropped.
REQUEST_TIMEOUT_S = 5.0

Handler = Callable[[dict[str, Any]], dict[str, Any]]


class ControlSocket:
    """The listening end, owned by the receiver (see the module docstring)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._clients: dict[socket.socket, tuple[bytearray, float]] = {}
        self.listener = _listen(path)

    def sockets(self) -> list[socket.socket]:
        """What the receiver's select() should watch for this socket."""
        return [self.listener, *self._clients]

    def handle(self, readable: list[socket.socket], handler: Handler) -> None:
        """Accept new clients, answer those whose request is complete, drop stale ones."""
        now = time.monotonic()
        if self.listener in readable:
            try:
                conn, _ = self.listener.accept()
                conn.setblocking(False)
                self._clients[conn] = (bytearray(), now + REQUEST_TIMEOUT_S)
            except OSError:
                pass
        for conn in list(self._clients):
            buf, deadline = self._clients[conn]
            if conn in readable:
                try:
                    data = conn.recv(MAX_REQUEST_BYTES)
                except OSError:
                    data = b""
                if not data:
                    self._drop(conn)
                    continue
                buf += data
            if b"\n" in buf:
                self._answer(conn, bytes(buf.split(b"\n", 1)[0]), handler)
            elif len(buf) > MAX_REQUEST_BYTES or now > deadline:
                self._drop(conn)

    def close(self) -> None:
        for conn in list(self._clients):
            self._drop(conn)
        self.listener.close()
        try:
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                os.unlink(self.path)
        except OSError:
            pass

    def _answer(self, conn: socket.socket, line: bytes, handler: Handler) -> None:
        try:
            request = json.loads(line.decode("utf-8"))
            if not isinstance(request, dict):
                raise ValueError("not a JSON object")
            reply = handler(request)
        except (ValueError, UnicodeDecodeError) as exc:
            reply = {"ok": False, "error": f"bad request: {exc}"}
        try:
            conn.setblocking(True)
            conn.settimeout(1.0)
            conn.sendall(json.dumps(reply).encode() + b"\n")
        except OSError:
            pass
        self._drop(conn)

    def _drop(self, conn: socket.socket) -> None:
        self._clients.pop(conn, None)
        conn.close()


def _listen(path: str) -> socket.socket:
    """Bind ``path``, replacing a stale socket but never a live receiver's.

    Raises:
        TransportError: another receiver answers there, or the path cannot be used.
    """
    directory = os.path.dirname(path) or "."
    try:
        os.makedirs(directory, mode=0o755, exist_ok=True)
    except OSError as exc:
        raise TransportError(f"cannot create {directory} for the control socket: {exc.strerror}; "
                             "use --control=PATH") from None
    if os.path.lexists(path):
        if _answers(path):
            raise TransportError(f"another remus-receiver is running (its control socket is {path}); "
                                 "give this one its own --control=PATH")
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise TransportError(f"{path} exists and is not a socket; use --control=PATH")
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise TransportError(f"cannot create the control socket {path}: {exc.strerror}; "
                             "use --control=PATH") from None
    finally:
        os.umask(old_umask)
    sock.listen(8)
    sock.setblocking(False)
    return sock


def _answers(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def request(path: str, message: dict[str, Any], timeout_s: float = 600.0) -> dict[str, Any]:
    """Send one request to the receiver at ``path`` and return its answer.

    Raises:
        TransportError: no receiver answers at ``path`` (the message says so plainly).
        RemusError: the answer is not what a receiver sends.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    try:
        try:
            sock.connect(path)
        except FileNotFoundError:
            raise TransportError(f"no remus-receiver is running here (no control socket {path})") from None
        except OSError as exc:
            if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
                raise TransportError(f"no remus-receiver is running here ({path} does not answer)") from None
            raise TransportError(f"cannot reach the receiver at {path}: {exc.strerror or exc}") from None
        sock.sendall(json.dumps(message).encode() + b"\n")
        reply = bytearray()
        while b"\n" not in reply:
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    except socket.timeout:
        raise TransportError(f"the receiver at {path} did not answer within {timeout_s:.0f} s") from None
    finally:
        sock.close()
    try:
        answer = json.loads(bytes(reply).split(b"\n", 1)[0].decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        answer = None
    if not isinstance(answer, dict):
        raise RemusError(f"the receiver at {path} sent no valid answer")
    return answer


__all__ = ["DEFAULT_CONTROL_SOCKET", "ControlSocket", "Handler", "request"]

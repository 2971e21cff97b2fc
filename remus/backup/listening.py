"""Where primaries come from: the listening socket and ``--hosts-allow``.

``listen_socket`` binds the receiver's port (every IPv6 and IPv4 address by
default).  ``address_only`` and ``hosts_allow_matcher`` implement
``--hosts-allow`` as xend-relocation-hosts-allow did (regular expressions
matched against the whole address), with one change: a pattern may match a
host *name* only when that name is forward-confirmed, and the lookups block,
so the server runs them off its loop.  Nothing here reads or writes a stream.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from typing import Any, Callable, Optional

from remus.errors import TransportError
from remus.transport import display_address


def hosts_allow_matcher(patterns: Optional[str]) -> Callable[[str], bool]:
    """Like xend-relocation-hosts-allow: space-separated regular expressions, each
    matched against the whole address of the connecting primary or, only when the
    address does not match, against its host name, which must be forward-confirmed
    (the name's addresses include the peer's).  The name lookup blocks: the server
    runs it off its loop.

    Raises:
        re.error: a pattern is not a valid regular expression.
    """
    if not patterns:
        return lambda host: True
    compiled = [re.compile(p) for p in patterns.split()]

    def allowed(addr: str) -> bool:
        if any(rx.fullmatch(addr) for rx in compiled):
            return True
        name = confirmed_name(addr)
        return name is not None and any(rx.fullmatch(name) for rx in compiled)

    return allowed


def confirmed_name(addr: str) -> Optional[str]:
    """The reverse name of ``addr`` if that name resolves back to ``addr``; else None."""
    try:
        name = socket.gethostbyaddr(addr)[0]
        forward = {info[4][0] for info in socket.getaddrinfo(name, None)}
    except OSError:
        return None
    return name if addr in {peer_host((a,)) for a in forward} else None


def address_only(patterns: Optional[str]) -> Callable[[str], Optional[bool]]:
    """The part of hosts-allow that needs no lookup: True/False when the address
    decides, None when only a name lookup could (some pattern may match a name)."""
    if not patterns:
        return lambda host: True
    compiled = [re.compile(p) for p in patterns.split()]
    return lambda host: True if any(rx.fullmatch(host) for rx in compiled) else None


def listen_socket(address: Optional[str], port: int) -> socket.socket:
    """A listening socket on ``address:port`` (default: every IPv6 and IPv4 address).

    Raises:
        TransportError: the port is taken, the address is not local, and the like.
    """
    where = display_address(address or "*", port)
    try:
        if address is None:
            try:
                sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                bind_to: Any = ("::", port)
            except OSError:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                bind_to = ("0.0.0.0", port)
        else:
            family, kind, proto, _name, bind_to = socket.getaddrinfo(
                address.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )[0]
            sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(bind_to)
        sock.listen(16)
        sock.setblocking(False)
        return sock
    except socket.gaierror as exc:
        raise TransportError(f"cannot listen on {where}: {exc.strerror}") from None
    except OSError as exc:
        if exc.errno == 98:
            raise TransportError(f"cannot listen on {where}: the port is already in use") from None
        raise TransportError(f"cannot listen on {where}: {exc.strerror or exc}") from None


def peer_host(addr: Any) -> str:
    host = str(addr[0])
    try:
        mapped = ipaddress.ip_address(host)
        if isinstance(mapped, ipaddress.IPv6Address) and mapped.ipv4_mapped:
            return str(mapped.ipv4_mapped)
    except ValueError:
        pass
    return host


def close_quietly(sock: socket.socket) -> None:
    """Close ``sock``, ignoring errors (it is being dropped anyway)."""
    try:
        sock.close()
    except OSError:
        pass

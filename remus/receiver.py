"""The backup host's server: take replication sessions, hold checkpoints, fail over.

``Receiver.serve`` listens on a TCP port (all addresses, IPv6 and IPv4, by
default), accepts one primary at a time (subject to ``hosts_allow``), and
feeds what it sends to a ``BackupSession`` (``remus.backup``), sending back
its ACKs and a HEARTBEAT every ``HEARTBEAT_INTERVAL_S``.

When the primary is lost (EOF, reset, an invalid stream, or nothing from it
for ``heartbeat_timeout_s``) the receiver activates the domain from the last
*committed* checkpoint, never from a partial one, and says so in one line.
An activated simulated guest runs inside this process until ``stop`` is set
(SIGINT/SIGTERM in the front end).  A Xen session gets a hot standby when it
opens (``remus.xen.standby``: ``xl migrate-receive -r`` fed every committed
and acknowledged checkpoint, or the ``start_standby`` given); failover hands
it the end of its stream and the domain runs on its own.  Only when no standby
could be kept is the domain restored with ``xl restore`` (``remus.xen.restore``,
or the ``restore_xen`` given).  A session the primary closes in order is not a
failover: the primary keeps the domain, and the standby is destroyed.

Messages go through ``say`` (one line each) and ``on_event`` (JSON-able
dicts); this module prints nothing itself.
"""

from __future__ import annotations

import enum
import ipaddress
import logging
import re
import select
import socket
import time
from dataclasses import dataclass
from typing import AbstractSet, Any, Callable, Mapping, Optional, Protocol

from remus.backup import (
    BackupSession,
    ClosedByPrimary,
    Committed,
    Opened,
    Refused,
    SendBack,
    State,
    StreamEnded,
)
from remus.clock import StopFlag
from remus.errors import RemoteProtocolError, RemusError, TransportError
from remus.image import Image
from remus.stream.codec import encode_record
from remus.stream.records import Close, CloseReason, StreamHeader
from remus.transport import HEARTBEAT_INTERVAL_S, Heartbeats, LockedSocket, display_address, tune

log = logging.getLogger(__name__)

_POLL_S = 0.05
_RECV_BYTES = 1 << 20

#: ``restore_xen(session_info, image)`` recreates a Xen domain from the committed image and
#: returns what to report about it (``domid``, ``restore_s``, ...); see ``remus.xen.restore``.
XenRestorer = Callable[[Mapping[str, Any], Image], dict[str, Any]]


# ---- standby hook (issue 10; the lead ports this into remus/backup/activation.py) ----------
class Standby(Protocol):
    """A domain kept ready on this host, checkpoint by checkpoint (``remus.xen.standby``)."""

    def committed(self, image: Image, seq: int, changed_pfns: AbstractSet[int]) -> None:
        """Checkpoint seq is committed and acked; keep the ready domain in step (may merge)."""

    def activate(self) -> dict[str, Any]:
        """Failover: run the domain from the last committed checkpoint; details for the report."""

    def discard(self) -> None:
        """Orderly close, refused or broken session: destroy whatever was prepared; run nothing."""


#: ``start_standby(session_info)`` starts the standby of a Xen session (raises RemusError if it cannot).
StandbyStarter = Callable[[Mapping[str, Any]], Standby]


def start_xen_standby(info: Mapping[str, Any]) -> Standby:
    from remus.xen.standby import XenStandby

    return XenStandby.start(info)
# ---- end of standby hook -------------------------------------------------------------------


class Ending(enum.Enum):
    ORDERLY = "closed by the primary"
    REFUSED = "refused"
    LOST = "primary lost"
    STOPPED = "receiver stopped"


@dataclass
class SessionResult:
    ending: Ending
    reason: str
    session: BackupSession
    last_commit_at: float = 0.0


def hosts_allow_matcher(patterns: Optional[str]) -> Callable[[str], bool]:
    """Like xend-relocation-hosts-allow: space-separated regular expressions, each
    matched against the whole address or host name of the connecting primary.

    Raises:
        re.error: a pattern is not a valid regular expression.
    """
    if not patterns:
        return lambda host: True
    compiled = [re.compile(p) for p in patterns.split()]

    def allowed(addr: str) -> bool:
        if any(rx.fullmatch(addr) for rx in compiled):
            return True
        try:  # only when the address itself does not match: a reverse lookup can be slow
            name = socket.gethostbyaddr(addr)[0]
        except OSError:
            return False
        return any(rx.fullmatch(name) for rx in compiled)

    return allowed


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
        sock.listen(4)
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


class Receiver:
    """The backup side (see the module docstring)."""

    def __init__(
        self,
        *,
        port: int,
        listen: Optional[str] = None,
        hosts_allow: Optional[str] = None,
        heartbeat_timeout_s: float = 3.0,
        once: bool = False,
        stop: Optional[StopFlag] = None,
        say: Callable[[str], None] = lambda line: None,
        on_event: Callable[[dict[str, Any]], None] = lambda event: None,
        on_progress: Optional[Callable[[BackupSession], None]] = None,
        restore_xen: Optional[XenRestorer] = None,
        start_standby: Optional[StandbyStarter] = start_xen_standby,
    ) -> None:
        self.port = port
        self.listen = listen
        self.allowed = hosts_allow_matcher(hosts_allow)
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.once = once
        self.stop = stop or StopFlag()
        self.say = say
        self.on_event = on_event
        self.on_progress = on_progress
        self.restore_xen = restore_xen
        self.start_standby = start_standby  # standby hook: None keeps only the cold path
        self.standby: Optional[Standby] = None
        self.activated: Any = None
        self.bound_port: Optional[int] = None
        self._listener: Optional[socket.socket] = None

    def bind(self) -> int:
        """Start listening (``serve`` does it if needed); return the port bound."""
        if self._listener is None:
            self._listener = listen_socket(self.listen, self.port)
            self.bound_port = self._listener.getsockname()[1]
        assert self.bound_port is not None
        return self.bound_port

    def serve(self) -> int:
        """Serve until stopped (or one session with ``once``); the exit status.

        0: stopped on request or after an orderly session with ``once``;
        1: a session ended with nothing to activate under ``once``, or an
        activation failed.

        Raises:
            TransportError: the port cannot be listened on.
        """
        self.bind()
        assert self._listener is not None
        listener = self._listener
        where = display_address(self.listen or "*", self.bound_port or self.port)
        self.say(f"listening on {where}")
        self.on_event({"event": "listening", "port": self.bound_port})
        try:
            while not self.stop.is_set():
                readable, _, _ = select.select([listener], [], [], 0.2)
                if not readable:
                    continue
                conn, addr = listener.accept()
                ending: Optional[Ending] = None
                try:
                    result = self._session(conn, addr)
                    ending = result.ending
                finally:
                    if ending is not Ending.LOST:  # standby hook: a lost session keeps it for _fail_over
                        self._discard_standby()
                if result.ending is Ending.LOST and result.session.state in (State.HEADER, State.SESSION):
                    # A port probe or a stray client: no session was ever opened.
                    self.say(f"connection from {peer_host(addr)} ended before opening a session: "
                             f"{result.reason}")
                    continue
                if result.ending is Ending.LOST:
                    return self._fail_over(result)
                if self.once and result.ending is not Ending.REFUSED:
                    return 0 if result.ending in (Ending.ORDERLY, Ending.STOPPED) else 1
            return 0
        finally:
            self._discard_standby()  # standby hook: never leave one behind
            listener.close()
            self._listener = None

    # -- one session -----------------------------------------------------------------------
    def _session(self, conn: socket.socket, addr: Any) -> SessionResult:
        host = peer_host(addr)
        session = BackupSession()
        with conn:
            tune(conn)
            out = LockedSocket(conn)
            if not self.allowed(host):
                reason = f"host {host} is not allowed by --hosts-allow"
                self.say(f"refused a session from {host}: {reason}")
                self.on_event({"event": "refused", "peer": host, "reason": reason})
                try:
                    out.send(StreamHeader().encode() + encode_record(Close(CloseReason.REFUSED, reason)))
                except OSError:
                    pass
                return SessionResult(Ending.REFUSED, reason, session)
            heartbeats = Heartbeats(out, HEARTBEAT_INTERVAL_S)
            try:
                out.send(StreamHeader().encode())
                heartbeats.start()
                return self._pump(conn, out, host, session)
            finally:
                heartbeats.stop()

    def _pump(self, conn: socket.socket, out: LockedSocket, host: str, session: BackupSession) -> SessionResult:
        last_heard = time.monotonic()
        last_commit = 0.0
        name = "?"
        changed: set[int] = set()  # standby hook: pages changed by the commits of one batch

        def lost(reason: str) -> SessionResult:
            return SessionResult(Ending.LOST, reason, session, last_commit)

        while True:
            if self.stop.is_set():
                return SessionResult(Ending.STOPPED, "receiver stopped", session, last_commit)
            try:
                watched = [conn] if self._listener is None else [conn, self._listener]
                readable, _, _ = select.select(watched, [], [], _POLL_S)
                if self._listener in readable:
                    self._refuse_busy(name, host)
                data = conn.recv(_RECV_BYTES) if conn in readable else None
            except OSError as exc:
                return lost(f"connection failed: {exc.strerror or exc}")
            now = time.monotonic()
            if data is None:
                quiet = now - last_heard
                if quiet > self.heartbeat_timeout_s:
                    return lost(f"nothing from {host} for {quiet:.1f} s (heartbeat timeout)")
                continue
            last_heard = now
            try:
                outputs = session.receive_data(data)
            except RemoteProtocolError as exc:
                self.say(f"protocol error from {host}: {exc}")
                self.on_event({"event": "protocol-error", "peer": host, "error": str(exc)})
                return lost(f"invalid stream ({exc})")
            for output in outputs:
                if isinstance(output, SendBack):
                    try:
                        out.send(encode_record(output.record))
                    except OSError as exc:
                        return lost(f"connection failed: {exc.strerror or exc}")
                elif isinstance(output, Opened):
                    name = f"{output.info['kind']}:{output.info['domain']}"
                    self.say(f"session from {host}: protecting {name}")
                    self.on_event({"event": "session", "peer": host, "domain": name})
                    self._start_standby(session, name)  # standby hook
                elif isinstance(output, Refused):
                    self.say(f"refused a session from {host}: {output.reason}")
                    self.on_event({"event": "refused", "peer": host, "reason": output.reason})
                    return SessionResult(Ending.REFUSED, output.reason, session)
                elif isinstance(output, Committed):
                    last_commit = now
                    changed |= output.changed_pfns  # standby hook
                    self.on_event({"event": "commit", "domain": name, "seq": output.seq})
                elif isinstance(output, ClosedByPrimary):
                    self.say(f"{name}: session closed by the primary ({output.message or 'no reason'}); "
                             f"last checkpoint {session.image.seq}; nothing activated")
                    self.on_event({"event": "closed", "domain": name, "seq": session.image.seq,
                                   "message": output.message})
                    return SessionResult(Ending.ORDERLY, output.message, session, last_commit)
                elif isinstance(output, StreamEnded):
                    cut = f", {output.partial_bytes} bytes into a record" if output.partial_bytes else ""
                    return lost(f"connection closed by {host} (EOF{cut})")
            if changed and self.standby is not None:  # standby hook: after the ACKs went out
                self.standby.committed(session.image, session.image.seq, frozenset(changed))
            changed.clear()
            if self.on_progress is not None:
                self.on_progress(session)

    def _refuse_busy(self, name: str, host: str) -> None:
        """Turn away a second primary while a session is running."""
        assert self._listener is not None
        other, addr = self._listener.accept()
        reason = f"this receiver is busy protecting {name} from {host}"
        self.say(f"refused a session from {peer_host(addr)}: {reason}")
        with other:
            try:
                other.sendall(StreamHeader().encode() + encode_record(Close(CloseReason.REFUSED, reason)))
            except OSError:
                pass

    # -- standby hook ---------------------------------------------------------------------------
    def _start_standby(self, session: BackupSession, name: str) -> None:
        if session.kind != "xen" or self.start_standby is None:
            return
        try:
            self.standby = self.start_standby(session.info)
        except RemusError as exc:
            self.say(f"{name}: no hot standby ({exc}); a failover would restore it with xl restore")
            self.on_event({"event": "standby-failed", "domain": name, "error": str(exc)})

    def _discard_standby(self) -> None:
        standby, self.standby = self.standby, None
        if standby is not None:
            standby.discard()

    # -- failover ------------------------------------------------------------------------------
    def _fail_over(self, result: SessionResult) -> int:
        session = result.session
        info = session.info
        name = f"{info.get('kind', '?')}:{info.get('domain', '?')}"
        seq = session.image.seq
        if seq == 0:
            self._discard_standby()  # standby hook
            self.say(f"primary lost ({result.reason}); no complete checkpoint of {name} was received: "
                     "nothing to activate")
            self.on_event({"event": "nothing-to-activate", "domain": name, "reason": result.reason})
            return 1
        age = time.monotonic() - result.last_commit_at
        try:
            details = self._activate(session)
        except RemusError as exc:
            self.say(f"primary lost ({result.reason}); activating {name} from checkpoint {seq} FAILED: {exc}")
            self.on_event({"event": "activation-failed", "domain": name, "seq": seq, "error": str(exc)})
            return 1
        seq = details.get("standby_seq", seq)  # standby hook: the checkpoint the standby was given last
        runs_as = ""
        if "domid" in details:
            runs_as = f"; it runs as domain {details['domid']}, restored in {details.get('restore_s', 0):.1f} s"
        self.say(f"primary lost ({result.reason}); activated {name} from checkpoint {seq} "
                 f"({age:.2f} s old){runs_as}")
        self.on_event(dict({"event": "activated", "domain": name, "seq": seq, "age_s": age,
                            "reason": result.reason}, **details))
        if self.activated is not None:  # a simulated guest runs here until we are stopped
            while not self.stop.wait(0.5):
                pass
            self.activated.close()
            self.activated = None
        return 0

    def _activate(self, session: BackupSession) -> dict[str, Any]:
        standby, self.standby = self.standby, None  # standby hook: the hot path first
        if standby is not None:
            try:
                return standby.activate()
            except RemusError as exc:
                self.say(f"the hot standby could not be activated ({exc}); restoring with xl restore")
        if session.kind == "xen":
            if self.restore_xen is not None:
                return self.restore_xen(session.info, session.image)
            from remus.xen.restore import restore_domain

            return restore_domain(session.info, session.image)
        from remus.sim.domain import SimulatedDomain, spec_from_session

        spec = spec_from_session(session.info)
        vcpu = session.image.sim_vcpu()
        assert vcpu is not None  # BackupSession refuses sim checkpoints without one
        # activate() hashes the image and refuses it unless it matches the digest the
        # primary computed when it captured this checkpoint.
        self.activated = SimulatedDomain.activate(spec, session.image.memory(spec.pages), vcpu)
        return {"counter": vcpu.counter, "memory_digest": vcpu.memory_digest.hex(), "verified": True}

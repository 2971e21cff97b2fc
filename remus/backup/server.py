"""The backup host's server: authenticate primaries, hold their checkpoints, fail over once.

Theory of operation.  ``Receiver.serve`` runs one loop around ``select``
that never blocks on a peer.  It watches:

* the TCP listener (every IPv6 and IPv4 address unless ``listen``);
* *pending* connections: strangers until they complete the link handshake
  (``remus.link``) within ``HANDSHAKE_TIMEOUT_S``.  At most ``MAX_PENDING``
  exist at once (the oldest is dropped for a newcomer) and each holds only
  the handshake's small fixed buffer, so idle or slow clients cannot keep a
  real primary out;
* the *live* session: one authenticated primary, its sealed stream fed to a
  sans-IO ``BackupSession`` whose ACKs go back sealed, with HEARTBEATs from a
  thread of their own.  Only an authenticated primary makes the receiver
  busy; a second one is refused in plain words;
* the control socket (``remus.backup.control``): ``status`` and ``activate``.

The timing rule that keeps one copy of the guest: the primary gives up on
its backup after ``give_up_ms`` of silence (its ``--ack-timeout``, carried
in the session record); this receiver may take over only after
``give_up_ms + TAKEOVER_MARGIN_MS`` of silence from it, or after the longer
``takeover_timeout_s`` it was given (a shorter one is raised, and it says
so).  The ACCEPT record tells the primary which timeout holds, so a primary
that finds itself out of contact for longer holds still instead of running on.

How a session ends decides what happens to the domain:

* CLOSE from the primary (whatever follows it): orderly; nothing is activated.
* EOF, reset, or silence past the takeover timeout: the primary is lost.
  With ``takeover="auto"`` the domain is activated from the last committed
  checkpoint, after ``fence`` succeeded when one is given (run through
  ``remus.fence``, retried every ``FENCE_RETRY_S`` while it fails; the
  checkpoint is kept meanwhile).  With ``"manual"`` the checkpoint is held
  until ``remus-receiver activate``.
* A stream that fails its seal, a protocol error, a refused session: broken;
  nothing is activated (an attacker in the path must not be able to cause a
  failover), and the receiver serves the next primary.

After an activation the receiver keeps serving (unless ``once``); it refuses
new primaries for a domain it runs.  Messages go through ``say`` (one line
each) and ``on_event`` (JSON-able dicts with wall-clock ``time``); this
module prints nothing itself.
"""

from __future__ import annotations

import concurrent.futures
import enum
import logging
import os
import select
import socket
import threading
import time
from typing import Any, Callable, Mapping, Optional, Sequence

from remus import heap
from remus.backup.activation import HotStarter, XenRestorer, default_max_memory, open_standby
from remus.backup.control import ControlSocket
from remus.backup.listening import (
    address_only,
    close_gently,
    close_quietly,
    hosts_allow_matcher,
    listen_socket,
    peer_host,
)
from remus.backup.peers import SEND_TIMEOUT_S, Heartbeats, Held, Live, Outcome, Pending, Running, SealedOut
from remus.backup.session import (
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
from remus.errors import DiskError, RemoteProtocolError, RemusError
from remus.link.blocking import SealedLink
from remus.link.handshake import Responder
from remus.settings import DEFAULT_ACK_TIMEOUT_MS, TAKEOVER_MARGIN_MS
from remus.stream.codec import encode_record
from remus.stream.records import PAGE_SIZE, Accept, Ack, Close, CloseReason, StreamHeader
from remus.transport import display_address, tune

log = logging.getLogger(__name__)

_POLL_S = 0.05
_RECV_BYTES = 1 << 20
#: Strangers allowed to be mid-handshake at once; the oldest is dropped for a newcomer.
MAX_PENDING = 8
#: A stranger must finish the handshake within this.
HANDSHAKE_TIMEOUT_S = 5.0
#: A failed fence command is tried again after this long.
FENCE_RETRY_S = 10.0
#: ``activate`` refuses while the primary was heard this recently: it is alive.
ALIVE_WITHIN_S = 1.0


def _hung_up(sock: socket.socket) -> bool:
    """True once the peer's FIN has arrived: all it will ever send is in our receive queue.

    Linux's POLLRDHUP says so even while data is still unread; where there is none, False
    (the stream's end is then seen when it is read, as before).  Never reads or blocks.
    """
    rdhup = getattr(select, "POLLRDHUP", 0)
    if not rdhup:
        return False
    poller = select.poll()
    poller.register(sock, rdhup)
    return any(events & rdhup for _, events in poller.poll(0))


class Phase(enum.Enum):
    """What the receiver is doing (``status``)."""

    LISTENING = "listening"
    PROTECTING = "protecting"
    FENCING = "fencing"
    HOLDING = "holding"
    ACTIVE = "active"


# --------------------------------------------------------------------------- the receiver


class Receiver:
    """The backup side (see the module docstring)."""

    def __init__(
        self,
        *,
        port: int,
        key: bytes,
        listen: Optional[str] = None,
        hosts_allow: Optional[str] = None,
        takeover_timeout_s: Optional[float] = None,
        takeover: str = "auto",
        fence: Optional[str] = None,
        fence_delay_s: float = 0.0,
        fence_timeout_s: float = 60.0,
        max_memory: Optional[int] = None,
        control: Optional[str] = None,
        once: bool = False,
        stop: Optional[StopFlag] = None,
        say: Callable[[str], None] = lambda line: None,
        on_event: Callable[[dict[str, Any]], None] = lambda event: None,
        on_progress: Optional[Callable[[BackupSession], None]] = None,
        restore_xen: Optional[XenRestorer] = None,
        disk_root: str = "",
        start_hot_xen: Optional[HotStarter] = None,
    ) -> None:
        if takeover not in ("auto", "manual"):
            raise ValueError(f"takeover must be auto or manual, not {takeover!r}")
        self.port = port
        self.key = key
        self.listen = listen
        self.hosts_allow = hosts_allow
        self._address_decides = address_only(hosts_allow)
        self._allowed = hosts_allow_matcher(hosts_allow)
        self.takeover_timeout_s = takeover_timeout_s
        self.takeover = takeover
        self.fence = fence
        self.fence_delay_s = fence_delay_s
        self.fence_timeout_s = fence_timeout_s
        self.max_memory = default_max_memory() if max_memory is None else max_memory
        self.control_path = control
        self.once = once
        self.stop = stop or StopFlag()
        self.say = say
        self._emit = on_event
        self.on_progress = on_progress
        self.restore_xen = restore_xen
        self.disk_root = disk_root  # disk replicas under this directory (remus.disk.replica)
        self.start_hot_xen = start_hot_xen  # hot standby (issue 10): None: remus.xen.standby unless restore_xen
        self.bound_port: Optional[int] = None
        self._listener: Optional[socket.socket] = None
        self._control: Optional[ControlSocket] = None
        self._pending: list[Pending] = []
        self._live: Optional[Live] = None
        self._held: Optional[Held] = None
        self._running: dict[str, Running] = {}
        self._outcome = Outcome()
        self._lookups: Optional[concurrent.futures.ThreadPoolExecutor] = None

    # -- public ------------------------------------------------------------------------
    def bind(self) -> int:
        """Start listening (``serve`` does it if needed); return the port bound."""
        if self._listener is None:
            self._listener = listen_socket(self.listen, self.port)
            self.bound_port = self._listener.getsockname()[1]
        assert self.bound_port is not None
        return self.bound_port

    @property
    def activated(self) -> Any:
        """The simulated domain this receiver runs, if any (tests read its state)."""
        for running in self._running.values():
            domain = getattr(running.standby, "domain", None)
            if domain is not None:
                return domain
        return None

    def serve(self) -> int:
        """Serve until stopped (or one session with ``once``); the exit status.

        0: stopped on request, or with ``once`` an orderly session or an
        activation; 1: with ``once`` a session that ended with nothing to
        activate, or an activation that failed.

        Raises:
            TransportError: the port or the control socket cannot be used.
        """
        self.bind()
        try:
            if self.control_path:
                self._control = ControlSocket(self.control_path)
            self._announce()
            while not self.stop.is_set() and self._outcome.status is None:
                self._turn()
            if self._outcome.run_until_stopped:
                while not self.stop.wait(0.2):
                    if self._control is not None:
                        self._poll_control_only()
            return self._outcome.status or 0
        finally:
            self._shut_down()

    def on_event(self, event: dict[str, Any]) -> None:
        """Hand ``event`` on, stamped with the wall-clock time."""
        self._emit(dict(event, time=round(time.time(), 3)))

    # -- the loop ----------------------------------------------------------------------
    def _announce(self) -> None:
        where = display_address(self.listen or "*", self.bound_port or self.port)
        self.say(f"listening on {where}")
        self.on_event({"event": "listening", "port": self.bound_port})
        if self.takeover == "auto" and not self.fence:
            self.say("no --fence: if the link to a primary fails silently while the primary keeps "
                     "running, both hosts can run the guest (see remus-receiver --help, --fence)")

    def _watched(self) -> list[socket.socket]:
        assert self._listener is not None
        # A stranger that finished its handshake waits for its hosts-allow lookup unread.
        watched = [self._listener, *(p.sock for p in self._pending if not p.responder.done)]
        if self._live is not None:
            watched.append(self._live.sock)
        if self._control is not None:
            watched.extend(self._control.sockets())
        return watched

    def _turn(self) -> None:
        try:
            readable, _, _ = select.select(self._watched(), [], [], _POLL_S)
        except (OSError, ValueError):  # a socket closed under us: rebuild the list next turn
            readable = []
        assert self._listener is not None
        if self._listener in readable:
            self._accept()
        for pending in list(self._pending):
            self._advance(pending, pending.sock in readable)
        live = self._live
        if live is not None:
            self._serve_live(live, live.sock in readable)
        self._tend_held()
        if self._control is not None:
            self._control.handle(readable, self._control_request)

    def _poll_control_only(self) -> None:
        assert self._control is not None
        try:
            readable, _, _ = select.select(self._control.sockets(), [], [], 0)
        except (OSError, ValueError):
            return
        self._control.handle(readable, self._control_request)

    # -- strangers -----------------------------------------------------------------------
    def _accept(self) -> None:
        assert self._listener is not None
        try:
            sock, addr = self._listener.accept()
        except OSError:
            return
        host = peer_host(addr)
        allowed = self._address_decides(host)
        lookup = None
        if allowed is None:
            if self._lookups is None:
                self._lookups = concurrent.futures.ThreadPoolExecutor(2, "remus-hosts-allow")
            lookup = self._lookups.submit(self._allowed, host)
        sock.setblocking(False)
        if len(self._pending) >= MAX_PENDING:
            oldest = self._pending.pop(0)
            log.info("dropping the oldest unauthenticated connection (from %s)", oldest.host)
            close_quietly(oldest.sock)
        self._pending.append(Pending(sock, host, Responder(self.key), time.monotonic() + HANDSHAKE_TIMEOUT_S,
                                      allowed, lookup))

    def _advance(self, pending: Pending, readable: bool) -> None:
        if pending.allowed is None and pending.lookup is not None and pending.lookup.done():
            pending.allowed = bool(pending.lookup.result())
        if readable and not pending.responder.done:
            try:
                data = pending.sock.recv(max(1, pending.responder.bytes_needed))
            except BlockingIOError:
                data = None
            except OSError as exc:
                self._drop_pending(pending, f"connection failed: {exc.strerror or exc}", quiet=True)
                return
            if data == b"":  # a port probe, or a stranger that gave up: not worth a log line
                self._drop_pending(pending, "closed before authenticating", quiet=True)
                return
            if data is not None:
                try:
                    pending.responder.receive_data(data)
                    outgoing = pending.responder.data_to_send()
                    if outgoing:
                        pending.sock.sendall(outgoing)
                except RemusError as exc:
                    self._drop_pending(pending, str(exc))
                    return
                except OSError as exc:
                    self._drop_pending(pending, f"connection failed: {exc.strerror or exc}", quiet=True)
                    return
        if pending.responder.done and pending.allowed is not None:
            # A peer not allowed by hosts-allow hears why only once it proved it holds the key.
            self._pending.remove(pending)
            self._authenticated(pending)
        elif time.monotonic() > pending.deadline:
            self._drop_pending(pending, f"no authentication within {HANDSHAKE_TIMEOUT_S:.0f} s")

    def _drop_pending(self, pending: Pending, reason: str, quiet: bool = False) -> None:
        if pending in self._pending:
            self._pending.remove(pending)
        close_quietly(pending.sock)
        if not quiet:
            self.say(f"rejected a connection from {pending.host}: {reason}")
            self.on_event({"event": "rejected", "peer": pending.host, "reason": reason})

    def _authenticated(self, pending: Pending) -> None:
        sock = pending.sock
        sock.setblocking(True)
        sock.settimeout(SEND_TIMEOUT_S)
        tune(sock)
        link = SealedLink.from_keys(pending.responder.result, pending.responder.unused_data)
        out = SealedOut(sock, link)
        if not pending.allowed:
            self._refuse_connection(sock, out, pending.host, f"host {pending.host} is not allowed by --hosts-allow")
            return
        if self._live is not None:
            reason = f"this receiver is busy protecting {self._live.name} from {self._live.host}"
            self._refuse_connection(sock, out, pending.host, reason)
            return
        try:
            out.send(StreamHeader().encode())
        except OSError:
            close_quietly(sock)
            return
        session = BackupSession(self.max_memory, self.disk_root)
        heartbeats = Heartbeats(out)
        self._live = Live(sock, pending.host, link, session, out, heartbeats, time.monotonic())
        heartbeats.start()

    def _refuse_connection(self, sock: socket.socket, out: SealedOut, host: str, reason: str) -> None:
        self.say(f"refused a session from {host}: {reason}")
        self.on_event({"event": "refused", "peer": host, "reason": reason})
        try:
            out.send(StreamHeader().encode() + encode_record(Close(CloseReason.REFUSED, reason)))
            out.link.send_final(sock)
        except OSError:
            pass
        close_gently(sock)

    # -- the live session ------------------------------------------------------------------
    @staticmethod
    def _warming(live: Live) -> bool:
        return live.standby is not None and live.standby.warming()

    def _release_acks(self, live: Live) -> bool:
        """Send the held ACKs once the standby is warm; False if the connection failed."""
        if not live.held_acks or self._warming(live):
            return True
        acks, live.held_acks = live.held_acks, []
        try:
            for ack in acks:
                live.out.send(encode_record(ack))
        except OSError as exc:
            self._lost(live, f"connection failed: {exc.strerror or exc}")
            return False
        return True

    def _serve_live(self, live: Live, readable: bool) -> None:
        if not self._release_acks(live):
            return
        if readable:
            try:
                data = live.sock.recv(_RECV_BYTES)
            except socket.timeout:
                data = None
            except OSError as exc:
                self._lost(live, f"connection failed: {exc.strerror or exc}")
                return
            if data is not None:
                live.last_heard = time.monotonic()
                if data and live.session.state is State.OPEN and _hung_up(live.sock):
                    live.session.primary_hung_up()  # what is left in flight is never committed
                self._feed(live, data)
                return
        quiet = time.monotonic() - live.last_heard
        if live.session.state is State.OPEN and live.takeover_s:
            if quiet > live.takeover_s:
                self._lost(live, f"nothing from {live.host} for {quiet:.1f} s (takeover timeout "
                                 f"{live.takeover_s:.1f} s)")
        elif quiet > HANDSHAKE_TIMEOUT_S:
            self._broken(live, f"no session record within {HANDSHAKE_TIMEOUT_S:.0f} s")

    def _feed(self, live: Live, data: bytes) -> None:
        """Open the sealed frames in ``data`` (``b""``: EOF) and feed their plaintext on."""
        try:
            plaintexts = live.link.receive_data(data)
        except RemusError as exc:
            if data:
                self._broken(live, f"the link failed its check: {exc}")
                return
            plaintexts = []  # EOF inside a frame: the primary died in the middle of a write
        for plain in plaintexts:
            if not self._feed_session(live, plain):
                return
        if not data:
            self._feed_session(live, b"")

    def _feed_session(self, live: Live, plain: bytes) -> bool:
        """Feed plaintext (``b""``: EOF) to the session; False once the session ended."""
        try:
            outputs = live.session.receive_data(plain)
        except (RemoteProtocolError, DiskError) as exc:
            self._broken(live, f"invalid stream ({exc})")
            return False
        for output in outputs:
            if not self._on_output(live, output):
                return False
        if any(isinstance(o, Committed) and heap.worth_trimming(len(o.changed_pfns) * PAGE_SIZE) for o in outputs):
            heap.trim()  # a large checkpoint's staging is freed now: give the heap back
        if self.on_progress is not None:
            self.on_progress(live.session)
        return True

    def _on_output(self, live: Live, output: object) -> bool:
        if isinstance(output, SendBack):
            record = output.record
            if isinstance(record, Ack) and record.seq > 0 and (live.held_acks or self._warming(live)):
                live.held_acks.append(record)  # sent once the standby has the first checkpoint
                return True
            try:
                live.out.send(encode_record(record))
            except OSError as exc:
                self._lost(live, f"connection failed: {exc.strerror or exc}")
                return False
        elif isinstance(output, Opened):
            return self._opened(live, output.info)
        elif isinstance(output, Refused):
            self.say(f"refused a session from {live.host}: {output.reason}")
            self.on_event({"event": "refused", "peer": live.host, "reason": output.reason})
            self._end_live(live, send_final=True)
            return False
        elif isinstance(output, Committed):
            live.commit_mono = time.monotonic()
            live.commit_captured = output.captured_unix
            if live.standby is not None:
                try:
                    live.standby.committed(live.session.image, output.seq, output.changed_pfns)
                except RemusError as exc:
                    self.say(f"{live.name}: keeping the standby in step failed: {exc}")
            self.on_event({"event": "commit", "domain": live.name, "seq": output.seq})
        elif isinstance(output, ClosedByPrimary):
            self._closed(live, output.message)
            return False
        elif isinstance(output, StreamEnded):
            cut = f", {output.partial_bytes} bytes into a record" if output.partial_bytes else ""
            count = live.session.not_taken
            if count:
                cut += (f"; {count} checkpoint{'s' if count > 1 else ''} that arrived after it hung up "
                        "not taken: never acknowledged")
            self._lost(live, f"connection closed by {live.host} (EOF{cut})")
            return False
        return True

    def _opened(self, live: Live, info: Mapping[str, Any]) -> bool:
        name = f"{info['kind']}:{info['domain']}"
        live.name = name
        give_up_ms = info.get("give_up_ms", DEFAULT_ACK_TIMEOUT_MS)
        if not isinstance(give_up_ms, int) or isinstance(give_up_ms, bool) or not 0 < give_up_ms <= 3_600_000:
            return self._refuse_live(live, f"bad give_up_ms {give_up_ms!r}")
        floor_s = (give_up_ms + TAKEOVER_MARGIN_MS) / 1000.0
        takeover_s = floor_s if self.takeover_timeout_s is None else self.takeover_timeout_s
        if takeover_s < floor_s:
            self.say(f"{name}: the primary gives up after {give_up_ms / 1000:.1f} s, so the takeover timeout "
                     f"is raised from {takeover_s:.1f} s to {floor_s:.1f} s (give-up + "
                     f"{TAKEOVER_MARGIN_MS / 1000:.0f} s)")
            takeover_s = floor_s
        live.takeover_s = takeover_s
        if name in self._running:
            running = self._running[name]
            return self._refuse_live(
                live, f"{name} runs on this host since its activation from checkpoint {running.seq} at "
                      f"{time.strftime('%H:%M:%S', time.localtime(running.since_unix))}; stop it here before "
                      "protecting it again")
        try:
            live.standby = open_standby(info, restore_xen=self.restore_xen, disks=live.session.disks,
                                        start_hot_xen=self.start_hot_xen)
        except RemusError as exc:
            return self._refuse_live(live, f"cannot take domain {info.get('domain')!r}: {exc}")
        if self._held is not None and self._held.name == name:
            self.say(f"{name}: a new session from {live.host} replaces the held checkpoint "
                     f"{self._held.session.image.seq}")
            self._drop_held()
        self.say(f"session from {live.host}: protecting {name} (takeover after {takeover_s:.1f} s of silence, "
                 f"{self.takeover}{', fencing' if self.fence else ''})")
        self.on_event({"event": "session", "peer": live.host, "domain": name, "takeover_s": takeover_s})
        try:
            accept = Accept(0 if self.takeover == "manual" else int(takeover_s * 1000), self.takeover,
                            bool(self.fence))
            live.out.send(encode_record(accept))
        except OSError as exc:
            self._lost(live, f"connection failed: {exc.strerror or exc}")
            return False
        return True

    def _refuse_live(self, live: Live, reason: str) -> bool:
        self.say(f"refused a session from {live.host}: {reason}")
        self.on_event({"event": "refused", "peer": live.host, "reason": reason})
        try:
            live.out.send(encode_record(Close(CloseReason.REFUSED, reason)))
        except OSError:
            pass
        self._end_live(live, send_final=True)
        return False

    # -- how a session ends ---------------------------------------------------------------
    def _end_live(self, live: Live, send_final: bool = False) -> None:
        live.heartbeats.stop()
        if send_final:
            try:
                live.link.send_final(live.sock)
            except OSError:
                pass
            close_gently(live.sock)
        else:
            close_quietly(live.sock)
        if live.session.disks is not None:  # synced and closed; a held session hands them over as is
            live.session.disks.close()
        if self._live is live:
            self._live = None

    def _closed(self, live: Live, message: str) -> None:
        self.say(f"{live.name}: session closed by the primary ({message or 'no reason'}); "
                 f"last checkpoint {live.session.image.seq}; nothing activated")
        self.on_event({"event": "closed", "domain": live.name, "seq": live.session.image.seq,
                       "message": message})
        self._end_live(live, send_final=True)
        if live.standby is not None:
            live.standby.discard()
        if self.once:
            self._outcome.status = 0

    def _broken(self, live: Live, reason: str) -> None:
        seq = live.session.image.seq
        self.say(f"session from {live.host} broken: {reason}; {live.name if live.name != '?' else 'nothing'} "
                 f"not activated (checkpoint {seq} dropped)")
        self.on_event({"event": "broken", "peer": live.host, "domain": live.name, "reason": reason})
        self._end_live(live)
        if live.standby is not None:
            live.standby.discard()
        if self.once and live.session.state is not State.HEADER:
            self._outcome.status = 1

    def _lost(self, live: Live, reason: str) -> None:
        self._end_live(live)
        session = live.session
        if session.state in (State.HEADER, State.SESSION) or live.standby is None:
            self.say(f"connection from {live.host} ended before opening a session: {reason}")
            self.on_event({"event": "no-session", "peer": live.host, "reason": reason})
            return
        if session.image.seq == 0:
            self.say(f"primary lost ({reason}); no complete checkpoint of {live.name} was received: "
                     "nothing to activate")
            self.on_event({"event": "nothing-to-activate", "domain": live.name, "reason": reason})
            live.standby.discard()
            if self.once:
                self._outcome.status = 1
            return
        self._held = Held(live.name, live.host, session, live.standby, reason, time.monotonic(),
                           live.commit_mono, live.commit_captured)
        if self.takeover == "manual":
            self.say(f"primary lost ({reason}); holding {live.name} at checkpoint {session.image.seq} "
                     f"({self._age(self._held):.2f} s old): --takeover=manual, run "
                     f"'remus-receiver activate {live.name}' once the primary is known to be down")
            self.on_event({"event": "holding", "domain": live.name, "seq": session.image.seq, "reason": reason})
        elif self.fence:
            self._held.fence_not_before = time.monotonic() + self.fence_delay_s
            self.say(f"primary lost ({reason}); fencing {live.host} before activating {live.name}")
        else:
            self._activate_held("primary lost")

    # -- fencing and activation ---------------------------------------------------------------
    def _tend_held(self) -> None:
        held = self._held
        if held is None or self.takeover == "manual" or not self.fence:
            return
        if held.fence_thread is None:
            if time.monotonic() >= held.fence_not_before:
                self._start_fence(held)
            return
        if held.fence_thread.is_alive():
            return
        result = held.fence_result
        held.fence_thread = None
        if result is not None and result.ok:
            self.say(f"fenced {held.host} ({self.fence!r} exited 0 after {result.seconds:.1f} s)")
            self.on_event({"event": "fenced", "peer": held.host, "domain": held.name})
            self._activate_held("primary lost and fenced")
        else:
            why = "did not run" if result is None else result.describe()
            self.say(f"fencing {held.host} failed ({why}); {held.name} stays at checkpoint "
                     f"{held.session.image.seq}, not activated; retrying in {FENCE_RETRY_S:.0f} s "
                     f"(or 'remus-receiver activate {held.name}')")
            self.on_event({"event": "fence-failed", "peer": held.host, "domain": held.name, "why": why})
            held.fence_not_before = time.monotonic() + FENCE_RETRY_S

    def _start_fence(self, held: Held) -> None:
        from remus.fence import run_fence

        assert self.fence is not None
        info = held.session.info
        env = {"REMUS_ROLE": "backup", "REMUS_PEER": held.host, "REMUS_DOMAIN": str(info.get("domain", "")),
               "REMUS_DOMAIN_KIND": str(info.get("kind", "")), "REMUS_PORT": str(self.bound_port or self.port)}
        command = self.fence
        timeout_s = self.fence_timeout_s
        held.fence_tries += 1

        def run() -> None:
            held.fence_result = run_fence(command, env, timeout_s)

        held.fence_thread = threading.Thread(target=run, name="remus-fence", daemon=True)
        held.fence_thread.start()

    @staticmethod
    def _age(held: "Held | Live") -> float:
        """How old the last committed checkpoint is: by this host's clock since it was committed
        here, or by the primary's clock since it was captured, whichever is older (a stalled
        receiver commits late what was captured long ago)."""
        local = time.monotonic() - held.commit_mono
        remote = time.time() - held.commit_captured if held.commit_captured else 0.0
        return max(local, remote)

    def _activate_held(self, why: str) -> bool:
        held = self._held
        assert held is not None
        self._held = None
        seq = held.session.image.seq
        age = self._age(held)
        started = time.monotonic()
        try:
            details = held.standby.activate()
        except RemusError as exc:
            self.say(f"{why} ({held.reason}); activating {held.name} from checkpoint {seq} FAILED: {exc}")
            self.on_event({"event": "activation-failed", "domain": held.name, "seq": seq, "error": str(exc)})
            if self.once:
                self._outcome.status = 1
            return False
        took = time.monotonic() - started
        runs_as = ""
        if "domid" in details:
            runs_as = f"; it runs as domain {details['domid']}, restored in {details.get('restore_s', took):.1f} s"
        self.say(f"{why} ({held.reason}); activated {held.name} from checkpoint {seq} ({age:.2f} s old){runs_as}")
        self.on_event(dict({"event": "activated", "domain": held.name, "seq": seq, "age_s": round(age, 3),
                            "reason": held.reason, "activate_s": round(took, 3)}, **details))
        self._running[held.name] = Running(held.name, held.standby, time.time(), seq)
        if self.once:
            self._outcome.status = 0
            self._outcome.run_until_stopped = getattr(held.standby, "domain", None) is not None
        return True

    def _drop_held(self) -> None:
        held = self._held
        if held is not None:
            held.standby.discard()
            self._held = None

    # -- control -------------------------------------------------------------------------------
    def _control_request(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        if op == "status":
            return dict(self.status(), ok=True)
        if op == "activate":
            domain = request.get("domain")
            if not isinstance(domain, str) or not domain:
                return {"ok": False, "error": "activate needs a domain"}
            return self._commanded_activation(domain)
        return {"ok": False, "error": f"unknown request {op!r}"}

    def status(self) -> dict[str, Any]:
        """What ``remus-receiver status`` shows (JSON-able)."""
        answer: dict[str, Any] = {"pid": os.getpid(), "takeover": self.takeover, "fencing": bool(self.fence),
                                  "domain": None, "primary": None, "seq": 0, "age_s": None,
                                  "running": sorted(self._running)}
        live, held = self._live, self._held
        if live is not None and live.session.state is State.OPEN:
            answer.update(state=Phase.PROTECTING.value, domain=live.name, primary=live.host,
                          seq=live.session.image.seq, takeover_s=live.takeover_s,
                          heard_s=round(time.monotonic() - live.last_heard, 3))
            if live.commit_mono:
                answer["age_s"] = round(self._age(live), 3)
        elif held is not None:
            answer.update(state=(Phase.FENCING if self.fence and self.takeover == "auto" else Phase.HOLDING).value,
                          domain=held.name, primary=held.host, seq=held.session.image.seq,
                          age_s=round(self._age(held), 3), reason=held.reason)
        elif self._running:
            answer.update(state=Phase.ACTIVE.value, domain=sorted(self._running)[0])
            answer["seq"] = self._running[answer["domain"]].seq
        else:
            answer["state"] = Phase.LISTENING.value
        return answer

    def _commanded_activation(self, domain: str) -> dict[str, Any]:
        def same(name: str) -> bool:
            return domain == name or domain == name.split(":", 1)[1]

        if any(same(name) for name in self._running):
            return {"ok": False, "error": f"{domain} already runs here (activated earlier)"}
        live = self._live
        if live is not None and same(live.name):
            quiet = time.monotonic() - live.last_heard
            if quiet < ALIVE_WITHIN_S:
                return {"ok": False, "error": f"the primary at {live.host} is alive (heard {quiet:.2f} s ago) "
                                              f"and protects {live.name}: stop or fence it first"}
            self._lost(live, f"activation commanded after {quiet:.1f} s of silence")
            if self._held is None:
                return {"ok": False, "error": f"no committed checkpoint of {live.name} to activate"}
        held = self._held
        if held is None or not same(held.name):
            return {"ok": False, "error": f"no committed checkpoint of {domain} is held here"}
        name, seq = held.name, held.session.image.seq
        if self._activate_held("activation commanded"):
            return {"ok": True, "domain": name, "seq": seq}
        return {"ok": False, "error": f"activating {name} from checkpoint {seq} failed (see the receiver's log)"}

    # -- shutting down -------------------------------------------------------------------------
    def _shut_down(self) -> None:
        for pending in self._pending:
            close_quietly(pending.sock)
        self._pending.clear()
        live = self._live
        if live is not None:
            self.say(f"receiver stopped while protecting {live.name}; nothing activated")
            self._end_live(live)
            if live.standby is not None:
                live.standby.discard()
        self._drop_held()
        for running in self._running.values():
            running.standby.close()
        self._running.clear()
        if self._control is not None:
            self._control.close()
            self._control = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._lookups is not None:
            self._lookups.shutdown(wait=False, cancel_futures=True)


__all__: Sequence[str] = ["Receiver", "hosts_allow_matcher", "listen_socket", "peer_host"]  # the last three from .listening

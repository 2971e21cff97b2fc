"""The receiver's bookkeeping of its peers: strangers, the live primary, a held checkpoint,
the domains it runs; and the sealed writer and heartbeats of the live session.

Plain records plus one thread (``Heartbeats``); the decisions are ``remus.backup.server``'s.
"""

from __future__ import annotations

import concurrent.futures
import socket
import threading
from dataclasses import dataclass, field
from typing import Any, Optional

from remus.backup.activation import Standby
from remus.backup.session import BackupSession
from remus.link.blocking import SealedLink
from remus.link.handshake import Responder
from remus.stream.codec import encode_record
from remus.stream.records import Heartbeat, Record
from remus.transport import HEARTBEAT_INTERVAL_S

#: A write to a primary that takes longer than this ends its session (it stopped reading).
SEND_TIMEOUT_S = 2.0


@dataclass
class Pending:
    """A stranger: connected, not yet authenticated."""

    sock: socket.socket
    host: str
    responder: Responder
    deadline: float
    allowed: Optional[bool]
    lookup: Optional["concurrent.futures.Future[bool]"] = None


class SealedOut:
    """``send(bytes)`` for the heartbeat thread and the loop: sealed, under the link's lock."""

    def __init__(self, sock: socket.socket, link: SealedLink) -> None:
        self.sock = sock
        self.link = link

    def send(self, data: bytes) -> None:
        self.link.send(self.sock, data)


class Heartbeats:
    """HEARTBEAT records every ``interval_s`` until stopped or the socket fails."""

    def __init__(self, out: SealedOut, interval_s: float = HEARTBEAT_INTERVAL_S) -> None:
        self._out = out
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="remus-backup-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=SEND_TIMEOUT_S + 1)

    def _run(self) -> None:
        count = 0
        while not self._stop.wait(self._interval_s):
            try:
                self._out.send(encode_record(Heartbeat(count)))
            except OSError:
                return
            count += 1


@dataclass
class Live:
    """The authenticated primary being served."""

    sock: socket.socket
    host: str
    link: SealedLink
    session: BackupSession
    out: SealedOut
    heartbeats: Heartbeats
    last_heard: float
    takeover_s: float = 0.0
    name: str = "?"
    standby: Optional[Standby] = None
    #: Local monotonic time of the last commit, and the primary's wall clock of its capture.
    commit_mono: float = 0.0
    commit_captured: float = 0.0
    #: ACKs held while the standby takes in the first checkpoint (``Standby.warming``), in order.
    held_acks: list[Record] = field(default_factory=list)


@dataclass
class Held:
    """A lost primary's last committed checkpoint, waiting for fencing or ``activate``."""

    name: str
    host: str
    session: BackupSession
    standby: Standby
    reason: str
    lost_at: float
    commit_mono: float
    commit_captured: float
    fence_thread: Optional[threading.Thread] = None
    fence_result: Any = None
    fence_not_before: float = 0.0
    fence_tries: int = 0


@dataclass
class Running:
    """A domain this receiver activated (a simulated guest runs inside this process)."""

    name: str
    standby: Standby
    since_unix: float
    seq: int


@dataclass
class Outcome:
    """What ``serve`` should do after a session ended (``once``)."""

    status: Optional[int] = None
    run_until_stopped: bool = False
    details: dict[str, Any] = field(default_factory=dict)

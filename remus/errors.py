"""Every exception remus raises on purpose.

Each class says when it is raised and what the user can do about it.  Only
``remus.cli`` (and the other command front ends) turn these into messages and
exit codes; library code raises and never prints.  Any other exception that
escapes is a bug.
"""

from __future__ import annotations


class RemusError(Exception):
    """Base class: a failure with a message fit to show a user as is."""


class UsageError(RemusError):
    """The command line (or a ``sim:`` domain spec) is malformed.

    The front ends report it in one line and exit 2.
    """


class DomainNotFound(RemusError):
    """No domain has the given name or id.  The front ends exit 1."""


class DomainError(RemusError):
    """An operation on the protected domain failed (suspend, capture, resume).

    The message names the domain and the operation.
    """


class CheckpointError(RemusError):
    """A checkpoint could not be completed.

    ``phase`` names the step that failed (``suspend``, ``postsuspend``,
    ``capture``, ``preresume``, ``resume``, ``send``, ``ack``, ``commit``,
    ``wait``), ``seq`` the checkpoint number and ``__cause__`` the error that
    caused it.  The engine has already resumed the domain and released every
    output buffer when this reaches the caller.
    """

    def __init__(self, phase: str, seq: int, message: str) -> None:
        super().__init__(f"checkpoint {seq} failed in {phase}: {message}")
        self.phase = phase
        self.seq = seq


class TransportError(RemusError):
    """The replication connection could not be set up or broke."""


class BackupLost(TransportError):
    """The backup stopped answering (EOF, reset, or heartbeat timeout), or ended the session.

    Raised on the primary.  ``orderly`` is True when the backup itself ended
    the session with a CLOSE record (it will not take over, so no fencing is
    needed).  The engine has told the backup CLOSE (best effort) and, unless
    it raised ``HoldStill`` instead, released the output: the domain runs on
    there, no longer protected.
    """

    def __init__(self, message: str, *, orderly: bool = False) -> None:
        super().__init__(message)
        self.orderly = orderly


class Interrupted(TransportError):
    """A second stop request (SIGINT/SIGTERM) cut a wait short: connecting, the
    session's acceptance, or a checkpoint's ack.

    Raised on the primary by ``TcpChannel``.  The engine treats it as a stop
    that cannot wait: it resumes the domain, sends CLOSE, then releases the
    held output.  It never reaches a user.
    """


class HoldStill(RemusError):
    """The backup may already be running the domain: the primary must not let it run on.

    Raised on the primary when it was out of contact with its backup for longer
    than the backup's takeover timeout (it was stalled or stopped, or heard
    nothing), or when ``--fence`` was given and the fence command did not
    confirm that the backup is fenced.  The engine then leaves the domain
    paused (Xen) or stopped (simulated), its output held and the channel
    aborted.  ``reason`` says what happened; ``since_unix`` is the wall-clock
    time from which the backup may have been running the domain (0 if
    unknown).  The remedy: check the backup, then destroy the domain here or
    unpause it (and clean up its output buffers).
    """

    def __init__(self, reason: str, since_unix: float = 0.0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.since_unix = since_unix


class PrimaryLost(TransportError):
    """The primary stopped sending (EOF, reset, or heartbeat timeout).

    Raised on the backup; it triggers failover.
    """


class ProtocolError(RemusError):
    """The replication stream broke the stream format's rules.

    Never raised directly: see the two subclasses, which say which side is at
    fault.
    """


class LocalProtocolError(ProtocolError):
    """This process tried to send something the format does not allow (a bug)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes that are not a valid stream (bad magic, a length
    over the documented bound, a record out of order, a checksum mismatch)."""


class AuthenticationFailed(RemoteProtocolError):
    """The peer did not prove it holds the link key, or a sealed frame failed.

    Raised by ``remus.link`` during the handshake (a wrong key, garbage, the
    old unauthenticated protocol, a replayed or reflected handshake, a cut
    handshake) and after it (a frame that was tampered with, reordered,
    replayed, injected or cut).  Nothing the peer sent is used: the session
    ends with nothing committed.  The message says which check failed.
    """


class KeyFileError(RemusError):
    """The link key file is missing, unreadable, too short or too open, or
    could not be written.

    The message names the file and the fix (``remus-keygen``, ``chmod 600``,
    ``--force``).  The front ends exit 1 before anything else happens.
    """


class ActivationError(RemusError):
    """The backup could not activate the domain from its last checkpoint.

    Raised on the backup at failover.  The message says what failed and what,
    if anything, was left behind (a Xen domain that could not be cleaned up).
    """


class XlError(RemusError):
    """Xen's ``xl`` command could not be run, did not finish in time, or failed.

    The message names the command and carries what xl said on stderr.
    """


class XenUnavailable(RemusError):
    """A Xen domain was asked for but Xen cannot be used from this process.

    The message names what is missing (the hypervisor interface
    ``/dev/xen/privcmd``, a library such as ``libxenguest.so.4.17``, root
    privileges) and how to get it.
    """


class XenError(RemusError):
    """A call into libxenctrl, libxenguest or libxenstore failed.

    ``op`` is the C function, ``code`` its return value and ``errno`` the
    error number it left behind.
    """

    def __init__(self, op: str, code: int, errno: int, detail: str = "") -> None:
        import os

        reason = os.strerror(errno) if errno else "no errno"
        extra = f": {detail}" if detail else ""
        super().__init__(f"{op} failed (rc={code}, errno={errno} {reason}){extra}")
        self.op = op
        self.code = code
        self.errno = errno


class DiskError(RemusError):
    """A replicated disk cannot be served, recorded or applied (the message names the disk)."""


class DiskUnavailable(DiskError):
    """This host lacks what a kernel block device needs (the nbd module, CAP_SYS_ADMIN)."""


class NetbufError(RemusError):
    """Network output buffering could not be set up, driven or torn down."""


class NetbufUnavailable(NetbufError):
    """This kernel or host cannot buffer output (no sch_plug, no ifb, not root).

    The message says which, and how to get it.
    """

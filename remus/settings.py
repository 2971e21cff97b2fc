"""The effective settings of one ``remus`` run, as the command line gives them.

Pure data; ``remus.cli`` builds it, ``remus.run`` acts on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

DEFAULT_INTERVAL_MS = 200
DEFAULT_PORT = 8002  # xend-relocation-port
DEFAULT_DESTINATION = "localhost"
DEFAULT_ACK_TIMEOUT_MS = 5000
#: The timing rule that keeps one copy of the guest: a backup may take over only after
#: ``give-up + TAKEOVER_MARGIN_MS`` of silence from the primary, where give-up is the
#: primary's --ack-timeout, which the session record carries as ``give_up_ms``.
TAKEOVER_MARGIN_MS = 2000
#: The shared key of the link to the backup (issue 8: loaded and used by ``remus.link``).
DEFAULT_KEY_FILE = "/etc/remus/authkey"
#: How long ``--fence=CMD`` may run before it counts as failed.
DEFAULT_FENCE_TIMEOUT_MS = 30_000


@dataclass(frozen=True)
class Settings:
    """The effective settings of one ``remus`` run."""

    domain: str
    destination: str = DEFAULT_DESTINATION
    interval_ms: int = DEFAULT_INTERVAL_MS
    port: int = DEFAULT_PORT
    blackhole: bool = False
    net_buffering: bool = True
    compression: bool = True
    timer: bool = False
    stats_json: Optional[str] = None
    ack_timeout_ms: int = DEFAULT_ACK_TIMEOUT_MS
    fence: Optional[str] = None
    fence_timeout_ms: int = DEFAULT_FENCE_TIMEOUT_MS
    key_file: str = DEFAULT_KEY_FILE
    #: False with --no-disk: writable disks are neither replicated nor refused.
    disk_replication: bool = True
    warnings: tuple[str, ...] = field(default=(), compare=False)

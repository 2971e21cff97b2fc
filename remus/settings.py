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
    #: False with --no-disk: writable disks are neither replicated nor refused.
    disk_replication: bool = True
    warnings: tuple[str, ...] = field(default=(), compare=False)

"""What the checkpoint engine needs from a domain, whatever kind it is.

A ``Domain`` is a running guest the engine can stop, copy and restart.  The
engine drives it strictly in this order, once per checkpoint::

    prepare_suspend()  ->  suspend()  ->  capture()  ->  resume()

and calls ``close()`` exactly once at the end, on every exit path, after
``hold()`` when the backup may already run the guest.  Kinds of
domain live elsewhere (``remus.sim`` for the built-in simulated guest,
``remus.xen`` for real Xen domains); ``remus.domains.open_domain`` picks one
from the command line's domain argument.  This module never touches a guest
itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Protocol, Sequence

from remus.devices import CheckpointDevice
from remus.stream.records import Record


@dataclass(frozen=True)
class Capture:
    """What one pause of the guest produced.

    ``records`` are the domain's stream records for this checkpoint in the
    libxc v2 layout (``DomainHeader`` first in the first capture, then
    PAGE_DATA and state records, then ``Checkpoint``).  ``dirty_pages`` counts
    the pages they carry.  A domain whose records need work that does not
    need the guest stopped (hashing, say) passes ``finish`` instead: the
    engine calls it after the guest resumed, and it returns the records.
    """

    records: Sequence[Record]
    dirty_pages: int
    finish: Optional[Callable[[], Sequence[Record]]] = None

    def final_records(self) -> Sequence[Record]:
        """The records to send (calls ``finish`` if there is one)."""
        return self.finish() if self.finish is not None else self.records


@dataclass(frozen=True)
class DomainInfo:
    """How a domain describes itself in the replication session header."""

    kind: str
    name: str
    details: Mapping[str, Any] = field(default_factory=dict)


class Domain(Protocol):
    """A guest under protection.  Implementations: ``SimulatedDomain``, ``XenDomain``."""

    @property
    def info(self) -> DomainInfo:
        """Kind, name and the details the backup needs to activate it."""

    @property
    def suspended(self) -> bool:
        """True between a successful ``suspend`` and the next ``resume``."""

    def devices(self, net_buffering: bool, interval_ms: int) -> Sequence[CheckpointDevice]:
        """The domain's own checkpointed devices (its output buffers), disks first.

        With ``net_buffering`` False the domain's output must pass unbuffered.
        ``interval_ms`` lets a buffer size itself for one epoch's output.
        """

    def prepare_suspend(self) -> None:
        """Wait until the guest can be stopped at once; never stops it.

        A Xen domain's first checkpoint begins here with libxc's live copy of the
        whole guest, which can take minutes while the guest runs; the engine times
        the checkpoint's pause from the return of this call.  Other domains return
        at once.  Raises ``DomainError``.
        """

    def suspend(self) -> None:
        """Stop the guest.  Raises ``DomainError`` if it does not stop in time."""

    def capture(self) -> Capture:
        """Copy what changed since the last capture.  Only while suspended."""

    def resume(self) -> None:
        """Let the guest run again.  Raises ``DomainError``."""

    def hold(self) -> str:
        """The backup may be running this domain: stop the guest where it is (if it runs)
        and keep it stopped, its output held; ``close`` will then neither resume it nor
        release its output.  Returns what the guest was left as ("paused", "stopped").

        Raises:
            RemusError: the guest could not be stopped.
        """

    def close(self) -> None:
        """End protection: resume the guest if it is suspended (unless ``hold`` was
        called), free handles.

        Never raises for a guest that is merely already running.
        """

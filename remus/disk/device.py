"""A replicated disk as a checkpointed device of the engine (``remus.devices``).

``DiskDevice`` wraps the ``RecordingImage`` its NBD server serves:

    install()       protection starts: writes are recorded from now on
    postsuspend()   the guest is stopped: the epoch boundary (``remus.disk.epochs``)
    records(seq)    the closed epoch's DISK_WRITE records (the whole disk the
                    first time), which the engine sends in checkpoint ``seq``
                    before its COMMIT
    commit()        nothing: the primary's image already holds the writes
    release()       writes pass through unrecorded again

The device never touches the network and never blocks the guest's writes
beyond the one lock the boundary shares with the write path.
"""

from __future__ import annotations

from typing import Any, Sequence, TypeVar

from remus.disk.epochs import ExtentHashes, RecordingImage, collect_hashes
from remus.stream.records import Record

D = TypeVar("D")


class DiskDevice:
    """Disk ``index`` of the session (its position in the SESSION's ``disks``)."""

    def __init__(self, index: int, target: RecordingImage, *, digest: bool = False) -> None:
        self.index = index
        self.target = target
        self.digest = digest
        self._pending: list[Record] = []

    @property
    def name(self) -> str:
        return f"disk{self.index}:{self.target.image.path}"

    def session_entry(self) -> dict[str, object]:
        """This disk's entry in the SESSION record's ``disks`` list."""
        return {"path": self.target.image.path, "size": self.target.size}

    def install(self) -> None:
        self.target.start()

    def postsuspend(self) -> None:
        self._pending = self.target.boundary(self.index, self.digest)

    def preresume(self) -> None:
        pass

    def records(self, seq: int) -> Sequence[Record]:
        pending, self._pending = self._pending, []
        return pending

    def commit(self) -> None:
        pass

    def release(self) -> None:
        self._pending = []
        self.target.stop()


def link_to_channel(devices: list[D], channel: Any) -> list[D]:
    """Let each disk's first synchronisation use the extent hashes the backup sent on ``channel``.

    A channel without ``disk_hashes`` (``--blackhole``) leaves every disk to a full first sync.
    """
    from remus.disk.control import ControlledDisk

    for device in devices:
        if isinstance(device, DiskDevice):
            device.target.peer_hashes = _hashes_of(channel, device.index)
        elif isinstance(device, ControlledDisk):
            device.peer_hashes = lambda: list(getattr(channel, "disk_hashes", []))
    return devices


def _hashes_of(channel: Any, index: int) -> Any:
    def peer_hashes() -> ExtentHashes:
        return collect_hashes(getattr(channel, "disk_hashes", []), index)

    return peer_hashes

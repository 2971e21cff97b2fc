"""Checkpointed devices: the hooks an output buffer (or a disk) gets at each checkpoint.

Order within a checkpoint, as driven by ``remus.engine``::

    install()                      once, before the first checkpoint
    postsuspend()                  guest stopped: a new output epoch begins
    records(seq)                   (optional) records to send in checkpoint seq, before its COMMIT
    preresume()                    checkpoint captured, guest about to run
    commit()                       backup acknowledged the checkpoint: release its epoch
    release()                      once, on every exit path

``release`` must let all held output go and undo ``install``; it must be safe
to call after a failed or partial ``install`` and more than once.  This module
holds the protocol and ``DeviceSet``, which calls a list of devices in order
and releases all of them even when some fail.  It never talks to the kernel.
"""

from __future__ import annotations

import logging
from typing import Protocol, Sequence

from remus.stream.records import Record

log = logging.getLogger(__name__)


class CheckpointDevice(Protocol):
    """One device whose effects must follow the checkpoint's epochs."""

    @property
    def name(self) -> str:
        """Short name used in messages (``plug:vif3.0``, ``sim-output``)."""

    def install(self) -> None:
        """Prepare to buffer; raises ``RemusError`` subclasses with the reason."""

    def postsuspend(self) -> None:
        """The guest is stopped: output produced from now on is a new epoch."""

    def preresume(self) -> None:
        """The checkpoint is captured; the guest is about to resume."""

    def commit(self) -> None:
        """The backup holds the last checkpoint: release the epoch it closed."""

    def release(self) -> None:
        """Let everything go and uninstall; idempotent, tolerant of partial installs."""


class RecordingDevice(CheckpointDevice, Protocol):
    """A device that also sends records in each checkpoint (a replicated disk's writes)."""

    def records(self, seq: int) -> Sequence[Record]:
        """Records for checkpoint ``seq``; called once per checkpoint, after capture."""


class DeviceSet:
    """Devices called in list order (disks before network, as Remus requires)."""

    def __init__(self, devices: Sequence[CheckpointDevice]) -> None:
        self.devices = list(devices)

    def install(self) -> None:
        for device in self.devices:
            device.install()

    def postsuspend(self) -> None:
        for device in self.devices:
            device.postsuspend()

    def records(self, seq: int) -> list[Record]:
        """The records of every device that has a ``records`` method, in device order."""
        out: list[Record] = []
        for device in self.devices:
            records = getattr(device, "records", None)
            if records is not None:
                out.extend(records(seq))
        return out

    def preresume(self) -> None:
        for device in self.devices:
            device.preresume()

    def commit(self) -> None:
        for device in self.devices:
            device.commit()

    def release(self) -> list[BaseException]:
        """Release every device; return (and log) the errors instead of stopping at one."""
        errors: list[BaseException] = []
        for device in self.devices:
            try:
                device.release()
            except Exception as exc:  # every device must get its release call
                log.error("releasing %s failed: %s", device.name, exc)
                errors.append(exc)
        return errors

"""Ownership records: which remus process set up buffering on which interface.

One small JSON file per buffered interface, ``<state_dir>/<ifname>``
(``/run/remus/netbuf/vif3.0``), written before anything is created and
rewritten after each step, so that whoever finds it later knows exactly
what to undo: the IFB's name, the vif's ifindex, the steps done, and the
owner's pid with its start time (so a recycled pid is not mistaken for the
owner).  ``/run`` is a tmpfs: records vanish on reboot, as do the devices.

This module reads and writes those files and checks whether an owner is
alive; it never talks to the kernel's network stack.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Optional

#: Where records live unless told otherwise.
DEFAULT_STATE_DIR = "/run/remus/netbuf"

#: Install steps, in the order they are done (teardown goes backwards).
STEPS = ("ifb", "plug", "ingress", "redirect")


class RecordError(ValueError):
    """A record file exists but cannot be read as one."""


def process_start_time(pid: int) -> Optional[str]:
    """Field 22 of ``/proc/<pid>/stat`` (start time in clock ticks), or None if no such process."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) is parenthesised and may hold spaces: split after the last ')'.
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else None


@dataclass(frozen=True)
class Ownership:
    """What one remus process set up for one interface."""

    vif: str
    vif_index: int
    ifb: str
    pid: int
    pid_start: Optional[str]
    done: tuple[str, ...] = field(default=())

    @classmethod
    def mine(cls, vif: str, vif_index: int, ifb: str) -> "Ownership":
        """A fresh record owned by this process, nothing done yet."""
        pid = os.getpid()
        return cls(vif, vif_index, ifb, pid, process_start_time(pid))

    def with_step(self, step: str) -> "Ownership":
        if step not in STEPS:
            raise ValueError(f"unknown install step {step!r}")
        return replace(self, done=self.done + (step,))

    def owner_alive(self) -> bool:
        """True while the process that wrote this record still runs (same pid, same start time)."""
        start = process_start_time(self.pid)
        return start is not None and (self.pid_start is None or start == self.pid_start)

    def to_json(self) -> str:
        return json.dumps(dict(asdict(self), done=list(self.done)), sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str) -> "Ownership":
        """Parse a record; ``source`` names the file in the error.

        Raises:
            RecordError: not a record this version wrote.
        """
        try:
            data = json.loads(text)
            record = cls(
                vif=str(data["vif"]),
                vif_index=int(data["vif_index"]),
                ifb=str(data["ifb"]),
                pid=int(data["pid"]),
                pid_start=None if data["pid_start"] is None else str(data["pid_start"]),
                done=tuple(str(s) for s in data["done"]),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise RecordError(f"{source} is not a remus netbuf record ({exc})") from None
        if any(step not in STEPS for step in record.done):
            raise RecordError(f"{source} lists an unknown install step: {record.done}")
        return record


class RecordStore:
    """The record files in one directory."""

    def __init__(self, state_dir: str = DEFAULT_STATE_DIR) -> None:
        self.state_dir = state_dir

    def path(self, vif: str) -> str:
        return os.path.join(self.state_dir, vif)

    def create(self, record: Ownership) -> bool:
        """Write ``record`` if no record exists for its vif; False if one does.

        Raises:
            OSError: the directory cannot be made or written (not root?).
        """
        os.makedirs(self.state_dir, mode=0o755, exist_ok=True)
        try:
            fd = os.open(self.path(record.vif), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(record.to_json())
        return True

    def update(self, record: Ownership) -> None:
        """Replace the vif's record atomically (write aside, then rename)."""
        path = self.path(record.vif)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(record.to_json())
        os.replace(tmp, path)

    def read(self, vif: str) -> Optional[Ownership]:
        """The vif's record, or None if there is none.

        Raises:
            RecordError: the file is not a record.
        """
        path = self.path(vif)
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            return None
        return Ownership.from_json(text, path)

    def remove(self, vif: str) -> None:
        """Delete the vif's record if there is one."""
        try:
            os.unlink(self.path(vif))
        except FileNotFoundError:
            pass

    def names(self) -> list[str]:
        """The vifs that have records, sorted (temporary files skipped)."""
        try:
            entries = os.listdir(self.state_dir)
        except FileNotFoundError:
            return []
        return sorted(e for e in entries if not e.endswith(".tmp") and not e.startswith("."))

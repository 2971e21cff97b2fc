"""A Xen domain's disks, as remus sees them: which are replicated, and whether it may go on.

``vbds`` reads each virtual disk's backend from xenstore (``mode``,
``script``, ``params``); a disk is *replicated* when its hotplug script is
``block-remus`` (``remus.disk.daemon`` then serves it and records its
epochs behind ``control_path``).  ``disk_policy`` is the one rule:

* a writable disk that is not replicated is refused, with one line naming
  the disk and the fix (``script=block-remus``);
* with ``--no-disk`` (``replicate=False``) nothing is replicated or
  refused, and one warning says what that risks;
* read-only disks need nothing; ``--blackhole`` (no backup) never asks.

This module reads xenstore through the caller's reader and never starts or
stops a disk server.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Optional, Protocol

from remus.errors import DomainError

log = logging.getLogger(__name__)

#: Where block-remus's disk servers listen for remus (block-remus: REMUS_DISK_RUN_DIR).
RUN_DIR = "/run/remus/disk"
SCRIPT_NAME = "block-remus"


class StoreReader(Protocol):
    def read(self, path: str) -> Optional[str]: ...

    def directory(self, path: str) -> list[str]: ...


@dataclass(frozen=True)
class Vbd:
    """One virtual disk of a guest, from its backend's xenstore entries."""

    domid: int
    devid: str
    name: str
    writable: bool
    script: str
    params: str

    @property
    def replicated(self) -> bool:
        return os.path.basename(self.script) == SCRIPT_NAME

    def describe(self) -> str:
        return f"{self.name} ({self.params})" if self.params else self.name


def vbds(store: StoreReader, domid: int) -> list[Vbd]:
    """The guest's virtual disks.  A backend's ``mode`` is ``w`` (read-write) or ``r``."""
    out = []
    base = f"/local/domain/{domid}/device/vbd"
    for devid in store.directory(base):
        backend = store.read(f"{base}/{devid}/backend") or ""

        def read(key: str) -> str:
            return (store.read(f"{backend}/{key}") or "") if backend else ""

        out.append(Vbd(domid, devid, read("dev") or f"vbd {devid}", read("mode") != "r",
                       read("script"), read("params")))
    return out


def control_path(vbd: Vbd, run_dir: Optional[str] = None) -> str:
    """The control socket block-remus's server for ``vbd`` listens on."""
    return os.path.join(run_dir or RUN_DIR, f"{vbd.domid}-{vbd.devid}.sock")


def disk_policy(domain: str, disks: list[Vbd], replicate: bool) -> list[Vbd]:
    """The disks to replicate; refuses an unreplicated writable disk (see the module docstring).

    Raises:
        DomainError: a writable disk is not replicated and ``replicate`` is True.
    """
    if not replicate:
        writable = [d.describe() for d in disks if d.writable]
        if writable:
            log.warning("--no-disk: the disks of domain %s are not replicated (%s): after a failover "
                        "the backup runs its memory over disks that do not match it", domain,
                        ", ".join(writable))
        return []
    for disk in disks:
        if disk.writable and not disk.replicated:
            raise DomainError(
                f"domain {domain}: writable disk {disk.describe()} is not replicated: give it "
                f"script={SCRIPT_NAME} in the domain's configuration (or pass --no-disk to protect "
                "memory only)"
            )
    return [d for d in disks if d.replicated and d.writable]

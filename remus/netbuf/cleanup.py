"""Removing what a killed remus left behind: its IFBs, plugs and redirects.

A remus stopped by SIGKILL (or a crash of the machine's Python) cannot run
its ``release``: the guest's output then stays held in a plug that nobody
will release.  Every ``install`` leaves an ownership record
(``remus.netbuf.owners``); ``clean_stale`` reads them, and for each one
whose owner process is gone it releases everything held and removes what
the record lists, exactly as ``release`` would have.  Records of running
remus processes are left alone.

The front end is ``bin/remus-netbuf-cleanup``; a new remus also does this
for a vif it is about to buffer.  Nothing here prints.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from remus.errors import NetbufError
from remus.netbuf.netlink import RtnlSocket
from remus.netbuf.owners import DEFAULT_STATE_DIR, RecordError, RecordStore
from remus.netbuf.plug import teardown


class Outcome(enum.Enum):
    """What became of one record."""

    CLEANED = "cleaned up"
    WOULD_CLEAN = "would clean up (dry run)"
    IN_USE = "in use by a running remus, left alone"
    NO_RECORD = "no record"
    FAILED = "failed"


@dataclass(frozen=True)
class Cleanup:
    """One record's outcome: ``detail`` says what was found or what failed."""

    vif: str
    outcome: Outcome
    detail: str = ""


def clean_stale(
    state_dir: str = DEFAULT_STATE_DIR,
    *,
    vifs: Optional[Sequence[str]] = None,
    dry_run: bool = False,
    rtnl_factory: Callable[[], RtnlSocket] = RtnlSocket,
) -> list[Cleanup]:
    """Undo the buffering of every record (or of ``vifs``) whose owner is dead.

    Raises:
        OSError: no netlink socket could be opened (the records are untouched).
    """
    store = RecordStore(state_dir)
    names = list(vifs) if vifs is not None else store.names()
    results: list[Cleanup] = []
    rtnl: Optional[RtnlSocket] = None
    try:
        for vif in names:
            try:
                record = store.read(vif)
            except RecordError as exc:
                results.append(Cleanup(vif, Outcome.FAILED, str(exc)))
                continue
            if record is None:
                results.append(Cleanup(vif, Outcome.NO_RECORD))
                continue
            what = f"pid {record.pid}, {record.ifb}, steps {', '.join(record.done) or 'none'}"
            if record.owner_alive():
                results.append(Cleanup(vif, Outcome.IN_USE, what))
                continue
            if dry_run:
                results.append(Cleanup(vif, Outcome.WOULD_CLEAN, what))
                continue
            if rtnl is None:
                rtnl = rtnl_factory()
            try:
                teardown(rtnl, record)
            except NetbufError as exc:
                results.append(Cleanup(vif, Outcome.FAILED, str(exc)))
                continue
            store.remove(vif)
            results.append(Cleanup(vif, Outcome.CLEANED, what))
    finally:
        if rtnl is not None:
            rtnl.close()
    return results

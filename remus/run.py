"""Running ``remus`` once its settings are known: open, protect, report, clean up.

This is the only place that turns engine outcomes into messages and exit
statuses (0: stopped on request; 1: a checkpoint failed, the backup was lost,
the primary holds still because the backup may run the domain, or the domain
could not be opened).  Messages go to stderr, one line each, and each ending
says what became of the domain: a Xen domain runs on (or is left paused); a
simulated guest never outlives remus.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from typing import Callable, Optional

from remus.channel import BlackholeChannel, Channel
from remus.clock import StopFlag
from remus.disk.device import link_to_channel
from remus.domain import Domain
from remus.domains import open_domain
from remus.engine import Engine
from remus.errors import BackupLost, CheckpointError, HoldStill, RemusError, UsageError
from remus.fence import run_fence
from remus.report import Reporter
from remus.settings import Settings
from remus.signals import stop_on_signals


def _say(message: str) -> None:
    print(f"remus: {message}", file=sys.stderr, flush=True)


def open_channel(settings: Settings, key: Optional[bytes], stop: Optional[StopFlag] = None) -> Channel:
    """``--blackhole`` or an authenticated TCP connection to the receiver."""
    if settings.blackhole:
        return BlackholeChannel()
    from remus.transport import TcpChannel

    assert key is not None
    return TcpChannel(settings.destination, settings.port, key=key, ack_timeout_ms=settings.ack_timeout_ms,
                      stop=stop, death_watch=True)


def load_link_key(settings: Settings) -> Optional[bytes]:
    """The key shared with the backup (none for ``--blackhole``).

    Raises:
        KeyFileError: missing, unreadable, too short or readable by others.
    """
    if settings.blackhole:
        return None
    from remus.link.keys import load_key

    return load_key(settings.key_file)


def session_info(settings: Settings) -> dict[str, object]:
    """What the session record says about this run (the domain adds its own part)."""
    return {
        "interval_ms": settings.interval_ms,
        "compression": settings.compression,
        "net_buffering": settings.net_buffering,
        "timer": settings.timer,
        "give_up_ms": settings.ack_timeout_ms,  # the backup's takeover timeout must exceed it
    }


def runs_on(domain: Domain) -> str:
    """What becomes of a domain whose protection ended with it running."""
    name = domain.info.name
    if domain.info.kind == "sim":
        return f"the simulated guest {name} ends with remus"
    return f"domain {name} runs on here, unprotected"


def hold_message(domain: Domain, exc: HoldStill) -> str:
    """The one line of a primary that holds still: what happened, and how to decide."""
    name = domain.info.name
    since = time.strftime(" since %H:%M:%S", time.localtime(exc.since_unix)) if exc.since_unix else ""
    if domain.info.kind == "sim":
        return (f"holding still: {exc.reason}; the backup may be running {name}{since}: check it; "
                f"the simulated guest {name} here was stopped and ends with remus, its held output "
                "never released")
    return (f"holding still: {exc.reason}; the backup may be running {name}{since}: check it; then "
            f"`xl destroy {name}` here, or `xl unpause {name}` and `remus-netbuf-cleanup`; until then "
            f"{name} stays paused here and its output held")


def fencer(settings: Settings, name: str) -> Optional[Callable[[str], None]]:
    """The engine's ``fence`` callback for ``--fence=CMD`` (None without it)."""
    command = settings.fence
    if command is None or settings.blackhole:
        return None
    env = {"REMUS_ROLE": "primary", "REMUS_PEER": settings.destination, "REMUS_PORT": str(settings.port),
           "REMUS_DOMAIN": name}

    def fence(reason: str) -> None:
        _say(f"backup lost ({reason}); fencing it with: {command}")
        result = run_fence(command, env, settings.fence_timeout_ms / 1000.0)
        if not result.ok:
            raise HoldStill(f"the backup was lost ({reason}) and not fenced: {result.describe()}", time.time())
        _say(f"backup fenced: {result.describe()}")

    return fence


def run(settings: Settings) -> int:
    """Protect ``settings.domain`` until stopped; return the exit status."""
    logging.basicConfig(level=logging.WARNING, format="remus: %(message)s", stream=sys.stderr)
    try:
        key = load_link_key(settings)  # before anything else happens
    except RemusError as exc:
        _say(str(exc))
        return 1
    stop = StopFlag()
    with stop_on_signals(stop):
        try:
            domain = open_domain(settings.domain, for_backup=not settings.blackhole,
                                 disk_replication=settings.disk_replication)
        except UsageError as exc:
            _say(f"error: {exc}")
            return 2
        except RemusError as exc:
            _say(str(exc))
            return 1
        with contextlib.closing(domain):
            if stop.is_set():
                _say(f"stopped ({stop.reason}) before protection began; {runs_on(domain)}")
                return 0
            return _protect(settings, domain, stop, key)


def _protect(settings: Settings, domain: Domain, stop: StopFlag, key: Optional[bytes]) -> int:
    name = domain.info.name
    try:
        # The reporter is made inside this try (an unwritable --stats-json is one line and exit 1),
        # and it watches the channel (the first checkpoint's progress); the disks' first
        # synchronisation reads the backup's extent hashes from the channel itself.
        reporter = Reporter(f"{domain.info.kind}:{name}", sys.stderr, settings.stats_json)
        channel = open_channel(settings, key, stop)
        engine = Engine(
            domain,
            reporter.watch(channel),
            interval_ms=settings.interval_ms,
            timer=settings.timer,
            compression=settings.compression,
            devices=link_to_channel(list(domain.devices(settings.net_buffering, settings.interval_ms)), channel),
            session=session_info(settings),
            stop=stop,
            on_checkpoint=reporter,
            fence=fencer(settings, name),
        )
    except RemusError as exc:
        _say(str(exc))
        return 1
    status = 1
    outcome = ""  # toolkit (issue 12): why the run ended, for the reporter's stop/lost event
    try:
        engine.run()
        status = 0
        outcome = stop.reason or "requested"
    except HoldStill as exc:
        outcome = str(exc)
        _say(hold_message(domain, exc))
    except BackupLost as exc:
        outcome = str(exc)
        _say(f"{exc}; {runs_on(domain)}, its output released")
    except (CheckpointError, RemusError) as exc:
        outcome = str(exc)
        _say(f"{exc}; {runs_on(domain)}, its output released")
    finally:
        reporter.finish(engine.statistics(), outcome, lost=status != 0)
    if status == 0:
        told = ""
        if not settings.blackhole and not engine.opened:
            told = "the backup had not accepted the session yet; "
        elif not settings.blackhole:
            told = ("the backup confirmed the end of the session; " if engine.close_confirmed else
                    "the backup did not confirm the end of the session (check that it did not take over); ")
        _say(f"stopped ({stop.reason or 'requested'}); {told}{runs_on(domain)}, its output released")
        if stop.reason == "SIGTERM":
            print("*** signalled ***")
    return status

"""Running ``remus`` once its settings are known: open, protect, report, clean up.

This is the only place that turns engine outcomes into messages and exit
statuses (0: stopped on request; 1: a checkpoint failed, the backup was lost,
or the domain could not be opened).  Messages go to stderr, one line each.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Optional

from remus.channel import BlackholeChannel, Channel
from remus.clock import StopFlag
from remus.domains import open_domain
from remus.engine import Engine
from remus.errors import BackupLost, CheckpointError, RemusError, UsageError
from remus.report import Reporter
from remus.settings import Settings
from remus.signals import stop_on_signals


def _say(message: str) -> None:
    print(f"remus: {message}", file=sys.stderr)


def open_channel(settings: Settings, key: Optional[bytes]) -> Channel:
    """``--blackhole`` or an authenticated TCP connection to the receiver."""
    if settings.blackhole:
        return BlackholeChannel()
    from remus.transport import TcpChannel

    assert key is not None
    return TcpChannel(settings.destination, settings.port, key=key, ack_timeout_ms=settings.ack_timeout_ms)


def load_link_key(settings: Settings) -> Optional[bytes]:
    """The key shared with the backup (none for ``--blackhole``).

    Raises:
        KeyFileError: missing, unreadable, too short or readable by others.
    """
    if settings.blackhole:
        return None
    from remus.link.keys import DEFAULT_KEY_FILE, load_key

    return load_key(settings.key_file or DEFAULT_KEY_FILE)


def run(settings: Settings) -> int:
    """Protect ``settings.domain`` until stopped; return the exit status."""
    logging.basicConfig(level=logging.WARNING, format="remus: %(message)s", stream=sys.stderr)
    try:
        key = load_link_key(settings)
    except RemusError as exc:
        _say(str(exc))
        return 1
    stop = StopFlag()
    with stop_on_signals(stop):
        try:
            domain = open_domain(settings.domain, for_backup=not settings.blackhole)
        except UsageError as exc:
            _say(f"error: {exc}")
            return 2
        except RemusError as exc:
            _say(str(exc))
            return 1
        with contextlib.closing(domain):
            name = domain.info.name
            label = f"{domain.info.kind}:{name}"
            reporter = Reporter(label, sys.stderr, settings.stats_json)
            try:
                channel = open_channel(settings, key)
                engine = Engine(
                    domain,
                    channel,
                    interval_ms=settings.interval_ms,
                    timer=settings.timer,
                    compression=settings.compression,
                    devices=list(domain.devices(settings.net_buffering, settings.interval_ms)),
                    session={
                        "interval_ms": settings.interval_ms,
                        "compression": settings.compression,
                        "net_buffering": settings.net_buffering,
                        "timer": settings.timer,
                        "give_up_ms": settings.ack_timeout_ms,
                    },
                    stop=stop,
                    on_checkpoint=reporter,
                )
            except RemusError as exc:
                _say(str(exc))
                return 1
            status = 1
            try:
                engine.run()
                status = 0
            except BackupLost as exc:
                _say(f"{exc}; domain {name} is no longer protected (it keeps running here)")
            except CheckpointError as exc:
                _say(f"{exc}; domain {name} keeps running here, unprotected")
            except RemusError as exc:
                _say(f"{exc}; domain {name} keeps running here, unprotected")
            except KeyboardInterrupt:
                _say(f"interrupted; domain {name} resumed and its output released")
                status = 0
            finally:
                reporter.finish(engine.statistics())
            if status == 0 and stop.reason == "SIGTERM":
                print("*** signalled ***")
            return status

"""Usage: remus-receiver [options]

Receive remus checkpoints on the backup host and fail over when the primary
is lost.  Replaces xend's relocation server (port 8002).

Options:
  -h, --help              show this help message and exit
  -p PORT, --port=PORT    listen on PORT (default 8002)
  --listen=ADDR           listen on ADDR only (default: every IPv6 and IPv4
                          address)
  --hosts-allow=REGEX     accept only primaries whose address or name matches
                          one of these space-separated regular expressions
                          (like xend-relocation-hosts-allow; default: any)
  --heartbeat-timeout=MS  fail over after MS milliseconds without data or a
                          heartbeat from the primary (default 3000)
  --once                  handle one session, then exit
  --events-json=FILE      append one JSON line per session event (session,
                          commit, activation) to FILE
  --disk-root=DIR         keep replicated disks under DIR (DIR/var/lib/...)
                          instead of at the primary's paths (a backup on the
                          same host)
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any, Optional, Sequence

from docopt import docopt

from remus.clock import StopFlag
from remus.errors import RemusError, UsageError

HELP = __doc__ or ""


def _int(value: str, option: str, low: int, high: int) -> int:
    try:
        number = int(value, 10)
    except ValueError:
        raise UsageError(f"option {option}: invalid integer value: {value!r}") from None
    if not low <= number <= high:
        raise UsageError(f"option {option}: {number} is out of range ({low}-{high})")
    return number


def parse(argv: Sequence[str]) -> dict[str, Any]:
    """Options of ``remus-receiver argv...``.

    Raises:
        UsageError: malformed arguments or values.
        SystemExit: ``-h`` (status 0, help printed by docopt).
    """
    try:
        args = docopt(HELP, list(argv), True)
    except SystemExit as exc:
        if exc.code is None or exc.code == 0:
            raise
        first = str(exc.code).strip().splitlines()[0] if str(exc.code).strip() else "malformed arguments"
        raise UsageError(first) from None
    hosts_allow = args["--hosts-allow"]
    if hosts_allow:
        try:
            for pattern in hosts_allow.split():
                re.compile(pattern)
        except re.error as exc:
            raise UsageError(f"option --hosts-allow: {pattern!r} is not a regular expression: {exc}") from None
    return {
        "port": _int(args["--port"] or "8002", "--port", 1, 65535),
        "listen": args["--listen"],
        "hosts_allow": hosts_allow,
        "heartbeat_timeout_s": _int(args["--heartbeat-timeout"] or "3000", "--heartbeat-timeout", 1, 3_600_000)
        / 1000.0,
        "once": bool(args["--once"]),
        "events_json": args["--events-json"],
        "disk_root": args["--disk-root"] or "",
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The ``remus-receiver`` command; returns the exit status (2 on usage errors)."""
    import logging

    from remus.receiver import Receiver
    from remus.signals import stop_on_signals

    try:
        options = parse(sys.argv[1:] if argv is None else argv)
    except UsageError as exc:
        print(f"remus-receiver: error: {exc} (see remus-receiver --help)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="remus-receiver: %(message)s", stream=sys.stderr)
    events_path = options.pop("events_json")
    events = open(events_path, "a", encoding="utf-8") if events_path else None

    def say(line: str) -> None:
        print(f"remus-receiver: {line}", file=sys.stderr, flush=True)

    def on_event(event: dict[str, Any]) -> None:
        if events is not None:
            events.write(json.dumps(event) + "\n")
            events.flush()

    stop = StopFlag()
    try:
        with stop_on_signals(stop):
            return Receiver(stop=stop, say=say, on_event=on_event, **options).serve()
    except RemusError as exc:
        say(str(exc))
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        if events is not None:
            events.close()


if __name__ == "__main__":
    sys.exit(main())

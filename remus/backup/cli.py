"""Usage:
  remus-receiver [options] [--control=SOCK]
  remus-receiver status [--control=SOCK] [--json]
  remus-receiver activate <domain> [--control=SOCK]
  remus-receiver (-h | --help | --version)

Receive remus checkpoints on the backup host and fail over when the primary
is lost.  Replaces xend's relocation server (port 8002).  Only a primary that
holds the same key (remus-keygen) can open a session.

  status      show what the running receiver does (its domain, primary, last
              committed checkpoint and its age)
  activate    run DOMAIN here from the last committed checkpoint now (the
              commanded takeover: make sure the primary is down first)

Options:
  -h, --help              show this help message and exit
  --version               show the version and exit
  -p PORT, --port=PORT    listen on PORT (default 8002)
  --listen=ADDR           listen on ADDR only (default: every IPv6 and IPv4
                          address)
  --key-file=FILE         the key shared with the primary (default
                          /etc/remus/authkey; make one with remus-keygen)
  --hosts-allow=REGEX     accept only primaries whose address, or forward-
                          confirmed name, matches one of these space-separated
                          regular expressions (default: any that has the key)
  --heartbeat-timeout=MS  take over after MS milliseconds without a word from
                          the primary (default and minimum: the primary's
                          --ack-timeout + 2000)
  --takeover=MODE         auto: activate by itself when the primary is lost;
                          manual: only on 'remus-receiver activate' (default
                          auto)
  --fence=CMD             when the primary is lost, run CMD with sh first and
                          activate only if it exits 0 (REMUS_PEER, REMUS_PORT,
                          REMUS_DOMAIN and REMUS_ROLE=backup are set)
  --fence-delay=MS        wait MS milliseconds before fencing, so that a
                          primary that fences this host first wins (default 0)
  --fence-timeout=MS      deadline of the fence command (default 60000)
  --max-memory=SIZE       refuse sessions declaring more guest memory (K, M or
                          G suffix; default half of this host's MemAvailable)
  --control=SOCK          control socket for status and activate (default
                          /run/remus/receiver.sock)
  --once                  handle one session, then exit
  --events-json=FILE      append one JSON line per event (session, commit,
                          activation, ...) to FILE
  --disk-root=DIR         keep replicated disks under DIR (DIR/var/lib/...)
                          instead of at the primary's paths (a backup on the
                          same host)
  --json                  status: print the answer as one JSON object
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import IO, Any, NoReturn, Optional, Sequence

from remus import cli_common
from remus.backup.control import DEFAULT_CONTROL_SOCKET
from remus.cli_common import Args, opt_int, opt_size, size_bytes
from remus.clock import StopFlag
from remus.errors import RemusError, UsageError

HELP = __doc__ or ""
PROG = "remus-receiver"


def _size(args: Args, option: str) -> Optional[int]:
    """``--max-memory``'s value in bytes (None when absent)."""
    if args.get(option) is None:
        return None
    return size_bytes(option, opt_size(args, option, "1M", 1 << 20, 1 << 50))


def parse(argv: Sequence[str]) -> dict[str, Any]:
    """What ``remus-receiver argv...`` asks for: ``{"command": "serve"|"status"|"activate", ...}``.

    Raises:
        UsageError: malformed arguments or values.
        ShowText: ``-h`` or ``--version``.
    """
    args = cli_common.parse(HELP, PROG, argv)
    control = args["--control"] or DEFAULT_CONTROL_SOCKET
    if args["status"]:
        return {"command": "status", "control": control, "json": bool(args["--json"])}
    if args["activate"]:
        return {"command": "activate", "control": control, "domain": args["<domain>"]}
    if args["--json"]:
        raise UsageError("--json goes with the status command")
    hosts_allow = args["--hosts-allow"]
    if hosts_allow:
        for pattern in hosts_allow.split():
            try:
                re.compile(pattern)
            except re.error as exc:
                raise UsageError(f"option --hosts-allow: {pattern!r} is not a regular expression: {exc}") from None
    takeover = args["--takeover"] or "auto"
    if takeover not in ("auto", "manual"):
        raise UsageError(f"option --takeover: {takeover!r} is neither auto nor manual")
    timeout = args["--heartbeat-timeout"]
    return {
        "command": "serve",
        "port": opt_int(args, "--port", 8002, 1, 65535),
        "listen": args["--listen"],
        "key_file": args["--key-file"],
        "hosts_allow": hosts_allow,
        "takeover_timeout_s": None if timeout is None else opt_int(args, "--heartbeat-timeout", 0, 1, 3_600_000) / 1000,
        "takeover": takeover,
        "fence": args["--fence"],
        "fence_delay_s": opt_int(args, "--fence-delay", 0, 0, 3_600_000) / 1000,
        "fence_timeout_s": opt_int(args, "--fence-timeout", 60000, 1, 3_600_000) / 1000,
        "max_memory": _size(args, "--max-memory"),
        "control": control,
        "once": bool(args["--once"]),
        "events_json": args["--events-json"],
        "disk_root": args["--disk-root"] or "",
    }


def _say(line: str) -> None:
    print(f"{PROG}: {line}", file=sys.stderr, flush=True)


def _status(options: dict[str, Any]) -> int:
    from remus.backup.control import request

    try:
        answer = request(options["control"], {"op": "status"}, timeout_s=10.0)
    except RemusError as exc:
        _say(str(exc))
        return 1
    if options["json"]:
        print(json.dumps(answer, sort_keys=True))
        return 0
    lines = [f"state: {answer.get('state')}"]
    for key in ("domain", "primary", "seq", "age_s", "heard_s", "takeover_s", "reason"):
        if answer.get(key) not in (None, ""):
            lines.append(f"{key.replace('_s', ' (s)')}: {answer[key]}")
    lines.append(f"takeover: {answer.get('takeover')}{', fencing' if answer.get('fencing') else ''}")
    if answer.get("running"):
        lines.append(f"running here: {' '.join(answer['running'])}")
    lines.append(f"pid: {answer.get('pid')}")
    print("\n".join(lines))
    return 0


def _activate(options: dict[str, Any]) -> int:
    from remus.backup.control import request

    try:
        answer = request(options["control"], {"op": "activate", "domain": options["domain"]})
    except RemusError as exc:
        _say(str(exc))
        return 1
    if not answer.get("ok"):
        _say(f"not activated: {answer.get('error', 'no reason given')}")
        return 1
    print(f"activated {answer.get('domain')} from checkpoint {answer.get('seq')}")
    return 0


def _serve(options: dict[str, Any]) -> int:
    import logging

    from remus.backup.server import Receiver
    from remus.link.keys import DEFAULT_KEY_FILE, load_key
    from remus.signals import stop_on_signals

    logging.basicConfig(level=logging.WARNING, format=f"{PROG}: %(message)s", stream=sys.stderr)
    events: Optional[IO[str]] = None
    try:
        events_path = options.pop("events_json")
        if events_path:
            try:
                events = open(events_path, "a", encoding="utf-8")
            except OSError as exc:
                raise UsageError(f"cannot open --events-json file {events_path}: {exc.strerror}") from None
        key = load_key(options.pop("key_file") or DEFAULT_KEY_FILE)
        opened = events

        def on_event(event: dict[str, Any]) -> None:
            if opened is not None:
                opened.write(json.dumps(event) + "\n")
                opened.flush()

        stop = StopFlag()
        options.pop("command")
        with stop_on_signals(stop):
            return Receiver(key=key, stop=stop, say=_say, on_event=on_event, **options).serve()
    except RemusError as exc:
        _say(str(exc))
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        if events is not None:
            events.close()


def main(argv: Optional[Sequence[str]] = None, *, quick_exit: bool = False) -> int:
    """The ``remus-receiver`` command; returns the exit status (2 on usage errors).

    With ``quick_exit`` (the installed command) a ``--once`` receiver does not return: once it
    has closed its files it exits at the lowest CPU priority without tearing its interpreter
    down (``_leave_quietly``).
    """
    try:
        options = parse(sys.argv[1:] if argv is None else argv)
    except UsageError as exc:
        print(f"{PROG}: error: {exc} (see {PROG} --help)", file=sys.stderr)
        return 2
    except cli_common.ShowText as shown:
        sys.stdout.write(shown.text)
        return 0
    if options["command"] == "status":
        return _status(options)
    if options["command"] == "activate":
        return _activate(options)
    once = options["once"]
    status = _serve(options)
    if quick_exit and once:
        _leave_quietly(status)
    return status


def _leave_quietly(status: int) -> NoReturn:
    """Exit now, yielding dom0's CPU to whatever else runs: the session is over.

    After a ``--once`` session (a failover, typically) what is left is the teardown of the
    receiver's memory, the image of the whole guest among it; the domain that was just started
    should not wait for it.  So every thread drops to the lowest priority and the process exits
    without the interpreter's own teardown, its output flushed and its files already closed.
    """
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    try:
        for tid in os.listdir("/proc/self/task"):
            os.setpriority(os.PRIO_PROCESS, int(tid), 19)
    except OSError:
        pass
    os._exit(status)


def run() -> NoReturn:
    """The installed command's entry point."""
    sys.exit(main(quick_exit=True))


if __name__ == "__main__":
    run()

"""Usage: remus [options] domain [destination]

Options:
  -h, --help            show this help message and exit
  -i MS, --interval=MS  checkpoint every MS milliseconds
  -p PORT, --port=PORT  send stream to port PORT
  --blackhole           replicate to /dev/null (no disk checkpoints, only
                        memory & net buffering)
  --no-net              run without net buffering (benchmark option)
  --no-compression      run without checkpoint compression
  --timer               force pause at checkpoint interval (experimental)

Additional options (not in the xm-era remus):
  --stats-json=FILE     append one JSON line per checkpoint, then a summary, to
                        FILE
  --ack-timeout=MS      give up on the backup after MS milliseconds without an
                        ack or heartbeat from it (default 5000)
  --fence=CMD           when the backup is lost, let the domain run on only
                        after CMD (run by sh) exited 0; else keep it paused
  --fence-timeout=MS    fail the fence if CMD runs longer than MS milliseconds
                        (default 30000)
  --key-file=FILE       the key shared with the backup (default
                        /etc/remus/authkey; not needed with --blackhole)
  --no-disk             protect a Xen domain without replicating its disks
                        (unsafe, like xl remus -d: after a failover its disks
                        no longer match its memory)
  --version             show the version and exit
"""

# The text above is printed by -h: the first block is, byte for byte, what the
# xm-era optparse-based remus printed (at its default 80 columns).  New options
# go only in the second block, and only under names that leave every prefix
# the old tool accepted meaning what it meant (see tests/test_cli.py).

from __future__ import annotations

import sys
from typing import Mapping, Optional, Sequence

from docopt import docopt

from remus import __version__
from remus.cli_common import Opt, ShowText, match_long, options_table
from remus.errors import UsageError
from remus.settings import (
    DEFAULT_ACK_TIMEOUT_MS,
    DEFAULT_DESTINATION,
    DEFAULT_FENCE_TIMEOUT_MS,
    DEFAULT_INTERVAL_MS,
    DEFAULT_KEY_FILE,
    DEFAULT_PORT,
    Settings,
)

HELP = __doc__ or ""
OLD_HELP = HELP.split("\n\nAdditional options")[0] + "\n"

#: What docopt parses: the help's option lists under a usage that, like
#: optparse, takes options anywhere, repeated (the last one wins), and any
#: number of positional arguments (the first two are used).
GRAMMAR = "Usage:\n  remus [options]... [<args>...]\n" + HELP[HELP.index("\n\nOptions:") :]

__all__ = ["HELP", "MissingDomain", "Settings", "ShowText", "main", "parse"]


class MissingDomain(UsageError):
    """No domain argument: the old tool printed "Missing domain" and its help, and exited 1."""

    def __init__(self) -> None:
        super().__init__("Missing domain")


# --------------------------------------------------------------------------- options table


# The options HELP declares, read as docopt reads them (``remus.cli_common``); the scan below
# walks them as optparse did.
_TABLE = options_table(HELP)
_SHORT = {o.short: o for o in _TABLE if o.short}


def _parse_optparse_int(option: str, value: str) -> int:
    """Convert like optparse's ``type='int'``: 0x.. hex, 0b.. binary, a leading 0 octal."""
    text = value.lower()
    if text[:2] == "0x":
        radix = 16
    elif text[:2] == "0b":
        radix = 2
    elif text[:1] == "0" and len(text) > 1:
        radix = 8
    else:
        radix = 10
    try:
        return int(value, radix)
    except ValueError:
        raise UsageError(f"option {option}: invalid integer value: {value!r}") from None


def _scan(argv: Sequence[str]) -> Optional[tuple[str, int]]:
    """Walk ``argv`` as optparse does, left to right, up to the first thing it acts on.

    Returns ``("help" | "version", index)`` when optparse would print and exit
    before seeing anything wrong, ``None`` when no such option comes first.
    Raises ``UsageError`` for the first malformed option, with optparse's words.
    Values are converted here too, because optparse converts each one as it
    reads it: ``-i abc -h`` is an error, ``-h -i abc`` prints the help.
    """
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            return None
        if arg.startswith("--"):
            name, eq, value = arg.partition("=")
            opt = match_long(_TABLE, name)
            assert opt.long is not None
            if opt.long in ("--help", "--version"):
                if eq:
                    raise UsageError(f"{opt.long} option does not take a value")
                return (opt.long[2:], i)
            if opt.takes_value:
                if not eq:
                    if i + 1 >= len(argv):
                        raise UsageError(f"{opt.long} option requires 1 argument")
                    i += 1
                    value = argv[i]
                _check_value(opt, opt.long, value)
            elif eq:
                raise UsageError(f"{opt.long} option does not take a value")
        elif arg.startswith("-") and arg != "-":
            for j, ch in enumerate(arg[1:], start=1):
                short = _SHORT.get("-" + ch)
                if short is None:
                    raise UsageError(f"no such option: -{ch}")
                if short.short == "-h":
                    return ("help", i)
                if short.takes_value:
                    value = arg[j + 1 :]
                    if not value:
                        if i + 1 >= len(argv):
                            raise UsageError(f"-{ch} option requires 1 argument")
                        i += 1
                        value = argv[i]
                    _check_value(short, f"-{ch}", value)
                    break
        i += 1
    return None


def _check_value(opt: Opt, spelled: str, value: str) -> None:
    if opt.long in ("--interval", "--port", "--ack-timeout", "--fence-timeout"):
        _parse_optparse_int(spelled, value)


# --------------------------------------------------------------------------- parse


def parse(argv: Sequence[str]) -> Settings:
    """The settings ``remus argv...`` runs with.

    Every argument vector the xm-era optparse parser accepted gives the same
    settings; values it silently ignored (``-i 0``, ``-p 0``) keep the default
    and add a warning to ``Settings.warnings``.

    Raises:
        ShowText: ``-h``/``--help`` or ``--version`` came first.
        MissingDomain: no domain argument (the command exits 1, as before).
        UsageError: anything else malformed (the command exits 2).
    """
    argv = list(argv)
    action = _scan(argv)
    if action is not None:
        what, _index = action
        raise ShowText(HELP if what == "help" else f"remus {__version__}\n")
    try:
        parsed: Mapping[str, object] = docopt(GRAMMAR, argv, False)
    except SystemExit as exc:  # DocoptExit; _scan has already caught what optparse rejects
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "malformed arguments"
        raise UsageError(first) from None
    return _settings(parsed)


def _last(parsed: Mapping[str, object], key: str) -> Optional[str]:
    values = parsed[key]
    assert isinstance(values, list)
    return values[-1] if values else None


def _int_option(parsed: Mapping[str, object], key: str, label: str, default: int, high: int, unit: str,
                warnings: list[str], ignored_zero: Optional[str] = None) -> int:
    """An integer option's value: optparse's conversion, then 1..high.

    With ``ignored_zero`` a 0 keeps the default (the old tool tested the value
    for truth) and adds a warning.
    """
    raw = _last(parsed, key)
    if raw is None:
        return default
    value = _parse_optparse_int(label, raw)
    if value == 0 and ignored_zero:
        warnings.append(f"{ignored_zero} is ignored (as by the old remus): using {default}")
        return default
    if not 0 < value <= high:
        raise UsageError(f"option {label}: {value} is not between 1 and {high} {unit}")
    return value


def _settings(parsed: Mapping[str, object]) -> Settings:
    args = list(parsed["<args>"])  # type: ignore[call-overload]
    if "--" in args:
        args.remove("--")  # the separator itself (only the first "--" is one)
    if not args:
        raise MissingDomain()
    warnings: list[str] = []
    if len(args) > 2:
        warnings.append(f"ignoring extra arguments: {' '.join(args[2:])}")

    interval_ms = _int_option(parsed, "--interval", "-i/--interval", DEFAULT_INTERVAL_MS, 3_600_000,
                              "milliseconds", warnings, ignored_zero="-i 0")
    port = _int_option(parsed, "--port", "-p/--port", DEFAULT_PORT, 65535, "(a TCP port)", warnings,
                       ignored_zero="-p 0")
    ack_timeout_ms = _int_option(parsed, "--ack-timeout", "--ack-timeout", DEFAULT_ACK_TIMEOUT_MS,
                                 3_600_000, "milliseconds", warnings)
    fence_timeout_ms = _int_option(parsed, "--fence-timeout", "--fence-timeout", DEFAULT_FENCE_TIMEOUT_MS,
                                   3_600_000, "milliseconds", warnings)
    fence = _last(parsed, "--fence")
    if fence is not None and not fence.strip():
        raise UsageError("option --fence: the command is empty")

    return Settings(
        domain=args[0],
        destination=args[1] if len(args) > 1 else DEFAULT_DESTINATION,
        interval_ms=interval_ms,
        port=port,
        blackhole=bool(parsed["--blackhole"]),
        net_buffering=not parsed["--no-net"],
        compression=not parsed["--no-compression"],
        timer=bool(parsed["--timer"]),
        stats_json=_last(parsed, "--stats-json"),
        ack_timeout_ms=ack_timeout_ms,
        fence=fence,
        fence_timeout_ms=fence_timeout_ms,
        key_file=_last(parsed, "--key-file") or DEFAULT_KEY_FILE,
        disk_replication=not parsed["--no-disk"],
        warnings=tuple(warnings),
    )


# --------------------------------------------------------------------------- main


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The ``remus`` command.  Returns the exit status.

    0: stopped on request (SIGINT/SIGTERM) with the domain running; 1: a
    checkpoint failed, the backup was lost, or the domain could not be
    opened (and, as before, a missing domain); 2: a usage error.
    """
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        settings = parse(args)
    except ShowText as shown:
        sys.stdout.write(shown.text)
        return 0
    except MissingDomain as exc:
        print(exc)
        sys.stdout.write(HELP)
        return 1
    except UsageError as exc:
        print(f"remus: error: {exc} (see remus --help)", file=sys.stderr)
        return 2
    for warning in settings.warnings:
        print(f"remus: warning: {warning}", file=sys.stderr)
    from remus.run import run  # imported late: parsing must not load the engine

    return run(settings)


if __name__ == "__main__":
    sys.exit(main())

"""The one command-line front end every remus command uses (except ``remus`` itself).

A command is its docopt usage text (the module docstring), a program name and
a body ``(args) -> exit status``.  ``run_command`` gives every command the same
edges, on Debian's docopt 0.6.2 and on docopt-ng alike:

* ``-h``/``--help`` prints the usage text, ``--version`` prints
  ``PROG VERSION``; both exit 0 and win wherever they stand before ``--``;
* an unknown, ambiguous or malformed option is named in one line on stderr,
  ``PROG: error: no such option: --bogus (see PROG --help)``, and the command
  exits 2 (so does any ``UsageError`` the body raises, for example from the
  value converters below, which name the option: ``option --seconds: ...``);
* a ``RemusError`` or ``OSError`` from the body is one line and exit 1;
* SIGINT or SIGTERM is a stop request: one line and exit 0, a second one
  while the command winds down is ignored.

Options are checked against the usage text's own option lines before docopt
sees the arguments, because the two docopt flavours word (and 0.6.2 often
omits) the name of what was wrong.  ``remus`` keeps its own parser
(``remus.cli``): its help and its answers are the xm-era tool's, byte for byte.

Nothing here knows any command's options; nothing here runs a command's work.
"""

from __future__ import annotations

import re
import signal
import sys
from dataclasses import dataclass
from types import FrameType
from typing import Any, Callable, Mapping, Optional, Sequence

from docopt import docopt

from remus import __version__
from remus.errors import RemusError, UsageError

__all__ = [
    "Args",
    "ShowText",
    "StopRequested",
    "opt_float",
    "opt_int",
    "opt_size",
    "parse",
    "run_command",
]

Args = Mapping[str, Any]


class ShowText(Exception):
    """``--help`` or ``--version``: print ``text`` on stdout and exit 0."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


class StopRequested(BaseException):
    """SIGTERM arrived (SIGINT arrives as ``KeyboardInterrupt``).  Never raised outside ``run_command``."""


# --------------------------------------------------------------------------- the option table


@dataclass(frozen=True)
class Opt:
    """One option of a usage text: its short and long spellings, and whether it takes a value."""

    short: Optional[str]
    long: Optional[str]
    takes_value: bool


def options_table(doc: str) -> list[Opt]:
    """The options the usage text declares, one per indented line starting with ``-``."""
    table = []
    for line in doc.splitlines():
        m = re.match(r"\s+(-\S.*?)(?:\s{2,}|$)", line)
        if not m:
            continue
        short = long = None
        takes_value = False
        for part in re.split(r",\s*|\s+", m.group(1)):
            name, eq, _value = part.partition("=")
            if name.startswith("--"):
                long = name
                takes_value = takes_value or bool(eq)
            elif name.startswith("-"):
                short = name
            elif part:
                takes_value = True  # "-i MS"
        table.append(Opt(short, long, takes_value))
    return table


def match_long(table: Sequence[Opt], name: str) -> Opt:
    """Resolve a long option the way optparse does: exact, else a unique prefix.  Raises ``UsageError``."""
    longs = {o.long: o for o in table if o.long}
    if name in longs:
        return longs[name]
    candidates = sorted(n for n in longs if n.startswith(name))
    if len(candidates) == 1:
        return longs[candidates[0]]
    if not candidates:
        raise UsageError(f"no such option: {name}")
    raise UsageError(f"ambiguous option: {name} ({', '.join(candidates)}?)")


def _scan(table: Sequence[Opt], argv: Sequence[str]) -> Optional[str]:
    """Check every option in ``argv``; return ``"help"``/``"version"`` if one was asked for.

    Raises:
        UsageError: the first unknown, ambiguous or malformed option, named.
    """
    shorts = {o.short: o for o in table if o.short}
    asked: Optional[str] = None
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            break
        if arg in ("-h", "--help"):
            return "help"
        if arg == "--version":
            asked = asked or "version"
        elif arg.startswith("--"):
            name, eq, _value = arg.partition("=")
            opt = match_long(table, name)
            if opt.long in ("--help", "--version"):
                if eq:
                    raise UsageError(f"{opt.long} option does not take a value")
                asked = "help" if opt.long == "--help" else asked or "version"
            elif opt.takes_value and not eq:
                if i + 1 >= len(argv):
                    raise UsageError(f"{opt.long} option requires a value")
                i += 1
            elif not opt.takes_value and eq:
                raise UsageError(f"{opt.long} option does not take a value")
        elif arg.startswith("-") and arg != "-":
            for j, ch in enumerate(arg[1:], start=1):
                opt_or_none = shorts.get("-" + ch)
                if opt_or_none is None:
                    raise UsageError(f"no such option: -{ch}")
                if ch == "h":
                    return "help"
                if opt_or_none.takes_value:
                    if j == len(arg) - 1:
                        if i + 1 >= len(argv):
                            raise UsageError(f"-{ch} option requires a value")
                        i += 1
                    break
        i += 1
    return asked


def parse(doc: str, prog: str, argv: Sequence[str], version: str = __version__) -> Args:
    """The options and arguments of ``prog argv...`` as docopt returns them.

    Raises:
        ShowText: ``--help`` or ``--version`` was given.
        UsageError: an option or the arguments do not fit the usage text.
    """
    argv = list(argv)
    asked = _scan(options_table(doc), argv)
    if asked == "help":
        raise ShowText(doc if doc.endswith("\n") else doc + "\n")
    if asked == "version":
        raise ShowText(f"{prog} {version}\n")
    try:
        return dict(docopt(doc, argv, False))
    except SystemExit:  # DocoptExit: options were checked above, so the arguments are wrong
        usage = " ".join(doc.split("\n\n")[0].split()[1:])
        raise UsageError(f"wrong arguments; usage: {usage}") from None


# --------------------------------------------------------------------------- value converters


def _raw(args: Args, option: str, default: Optional[str]) -> Optional[str]:
    value = args.get(option)
    if isinstance(value, list):
        value = value[-1] if value else None
    return default if value is None else str(value)


def opt_int(args: Args, option: str, default: int, low: int, high: int) -> int:
    """``option``'s value as an integer in ``low..high`` (``default`` if absent).  Raises ``UsageError``."""
    raw = _raw(args, option, None)
    if raw is None:
        return default
    try:
        value = int(raw, 10)
    except ValueError:
        raise UsageError(f"option {option}: not a whole number: {raw!r}") from None
    if not low <= value <= high:
        raise UsageError(f"option {option}: {value} is not between {low} and {high}")
    return value


def opt_float(args: Args, option: str, default: float, low: float, high: float) -> float:
    """``option``'s value as a number in ``low..high`` (``default`` if absent).  Raises ``UsageError``."""
    raw = _raw(args, option, None)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise UsageError(f"option {option}: not a number: {raw!r}") from None
    if not low <= value <= high:  # also rejects nan
        raise UsageError(f"option {option}: {raw} is not between {low:g} and {high:g}")
    return value


_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def opt_size(args: Args, option: str, default: str, low: int, high: int) -> str:
    """``option``'s value as typed (``64M``), checked to be a size in ``low..high`` bytes.

    Raises ``UsageError``.
    """
    raw = _raw(args, option, default)
    assert raw is not None
    size = size_bytes(option, raw)
    if not low <= size <= high:
        raise UsageError(f"option {option}: {raw} is not between {_human(low)} and {_human(high)}")
    return raw


def size_bytes(option: str, raw: str) -> int:
    """A size as typed (``64M``, ``2GiB``, ``4096``) in bytes.  Raises ``UsageError`` naming ``option``."""
    m = re.fullmatch(r"(\d+)([KMGT]?)i?B?", raw.strip(), re.IGNORECASE)
    if not m:
        raise UsageError(f"option {option}: not a size such as 64M or 2G: {raw!r}")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2).upper()]


def _human(n: int) -> str:
    for unit in ("T", "G", "M", "K"):
        if n >= _SIZE_UNITS[unit] and n % _SIZE_UNITS[unit] == 0:
            return f"{n // _SIZE_UNITS[unit]}{unit}"
    return str(n)


# --------------------------------------------------------------------------- the exit-status boundary


def _raise_stop(signum: int, frame: Optional[FrameType]) -> None:
    raise StopRequested()


def run_command(prog: str, doc: str, body: Callable[[Args], int],
                argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) against ``doc``, run ``body``; return the exit status.

    0: ``body``'s own 0, ``--help``/``--version``, or a stop by SIGINT/SIGTERM;
    1: a failure (``RemusError``, ``OSError``, or ``body``'s 1); 2: a usage error.
    """
    args_list = list(sys.argv[1:] if argv is None else argv)
    try:
        try:
            args = parse(doc, prog, args_list)
        except ShowText as shown:
            sys.stdout.write(shown.text)
            sys.stdout.flush()
            return 0
        previous = signal.signal(signal.SIGTERM, _raise_stop) if _main_thread() else None
        try:
            return body(args)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
    except UsageError as exc:
        _error(f"{prog}: error: {exc} (see {prog} --help)")
        return 2
    except (KeyboardInterrupt, StopRequested) as exc:
        _ignore_stop_signals()
        name = "SIGTERM" if isinstance(exc, StopRequested) else "SIGINT"
        _error(f"{prog}: stopped by {name}")
        return 0
    except RemusError as exc:
        _error(f"{prog}: {exc}")
        return 1
    except BrokenPipeError:
        _ignore_stop_signals()
        return 1  # whoever read our output went away: nothing left to tell
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        _error(f"{prog}: {exc.strerror or exc}{where}")
        return 1


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _ignore_stop_signals() -> None:
    """The command is winding down: a second Ctrl-C must not cut that short with a traceback."""
    if _main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _error(line: str) -> None:
    try:
        print(line, file=sys.stderr, flush=True)
    except OSError:
        pass  # stderr is gone too

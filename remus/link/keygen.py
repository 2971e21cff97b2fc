"""Usage: remus-keygen [--key-file=FILE] [--force]
       remus-keygen (-h | --help | --version)

Write a new random key for the link between a remus primary and its backup
(64 random bytes, readable by its owner only), then copy the same file to
the other host.  remus and remus-receiver refuse to talk without it.

Options:
  -h, --help       show this help message and exit
  --version        show the version and exit
  --key-file=FILE  write the key to FILE (default /etc/remus/authkey)
  --force          replace an existing key file (the other host then needs
                   the new key too)
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

from docopt import docopt

from remus import __version__
from remus.cli_common import ShowText, match_long, options_table
from remus.errors import KeyFileError, UsageError
from remus.link.keys import DEFAULT_KEY_FILE, NEW_KEY_BYTES, write_key_file

HELP = __doc__ or ""


@dataclass(frozen=True)
class KeygenArgs:
    """What ``remus-keygen`` was asked to do."""

    key_file: str
    force: bool


_TABLE = options_table(HELP)


def _scan(argv: Sequence[str]) -> Optional[str]:
    """Check ``argv`` option by option, so a usage error names the culprit with any docopt.

    Returns ``"help"`` or ``"version"`` when one was asked for.

    Raises:
        UsageError: the first unknown option, missing or unexpected value, or argument.
    """
    shown: Optional[str] = None
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg.startswith("--") and arg != "--":
            name, eq, value = arg.partition("=")
            opt = match_long(_TABLE, name)
            if opt.takes_value and not eq:
                if not args:
                    raise UsageError(f"option {opt.long} requires a value")
                value = args.pop(0)
            if opt.takes_value and not value:
                raise UsageError(f"option {opt.long}: the value is empty")
            if not opt.takes_value and eq:
                raise UsageError(f"option {opt.long} does not take a value")
        elif arg.startswith("-") and len(arg) > 1 and arg != "--":
            found = [o for o in _TABLE if o.short == arg]
            if not found:
                raise UsageError(f"no such option: {arg}")
            opt = found[0]
        else:
            raise UsageError(f"unexpected argument: {arg!r}")
        if opt.long in ("--help", "--version") and shown is None:
            shown = opt.long[2:]
    return shown


def parse(argv: Sequence[str]) -> KeygenArgs:
    """What ``remus-keygen argv...`` asks for.

    Raises:
        ShowText: ``-h``/``--help`` or ``--version``.
        UsageError: malformed arguments (the command exits 2).
    """
    shown = _scan(argv)
    if shown == "help":
        raise ShowText(HELP)
    if shown == "version":
        raise ShowText(f"remus-keygen {__version__}\n")
    try:
        parsed: Mapping[str, object] = docopt(HELP, list(argv), False)
    except SystemExit as exc:  # DocoptExit: _scan has already named what it can
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "malformed arguments"
        raise UsageError(first) from None
    key_file = parsed["--key-file"]
    return KeygenArgs(key_file if isinstance(key_file, str) else DEFAULT_KEY_FILE, bool(parsed["--force"]))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The ``remus-keygen`` command: 0 written, 1 not written (one line why), 2 usage error."""
    try:
        args = parse(sys.argv[1:] if argv is None else list(argv))
    except ShowText as shown:
        sys.stdout.write(shown.text)
        return 0
    except UsageError as exc:
        print(f"remus-keygen: error: {exc} (see remus-keygen --help)", file=sys.stderr)
        return 2
    try:
        write_key_file(args.key_file, force=args.force)
    except KeyFileError as exc:
        print(f"remus-keygen: {exc}", file=sys.stderr)
        return 1
    print(f"remus-keygen: wrote a new key to {args.key_file} ({NEW_KEY_BYTES} random bytes, mode 0600)")
    print(f"next: copy it to the other host with: scp -p {args.key_file} root@OTHER-HOST:{args.key_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

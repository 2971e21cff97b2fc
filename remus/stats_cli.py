"""Usage: remus-stats [options] FILE

Summarise a remus --stats-json file: how many checkpoints at what rate, the
pause, ack and period percentiles, bytes before and after compression, and
timer overruns.  With --plot, also draw pause, dirty pages, wire bytes and ack
time over time (needs matplotlib: pip install 'remus[plot]', or Debian's
python3-matplotlib).  FILE may be - for standard input.

Options:
  -h, --help       show this help message and exit
  --plot=OUT       draw the checkpoints to OUT (.png or .svg)
  --json           print the summary as one JSON object instead of text
  --version        show the version and exit

Exit status: 0 on success, 1 if FILE cannot be read or plotted, 2 on a usage
error.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from typing import Optional, Sequence

from remus.cli_common import Args, run_command
from remus.errors import UsageError
from remus.statsfile import read_checkpoints, summarise, summary_text

PROG = "remus-stats"


def _body(args: Args) -> int:
    path = str(args["FILE"])
    out = args["--plot"]
    if out is not None:
        from remus.statsplot import FORMATS

        if not str(out).lower().endswith(FORMATS):
            raise UsageError(f"option --plot: {out} must end in .png or .svg")
    if path == "-":
        checkpoints = read_checkpoints(sys.stdin, "<stdin>")
    else:
        with open(path, encoding="utf-8") as stream:
            checkpoints = read_checkpoints(stream, path)
    summary = summarise(checkpoints)
    if args["--json"]:
        print(json.dumps(asdict(summary)))
    else:
        sys.stdout.write(summary_text(path, summary))
    if out is not None:
        from remus.statsplot import plot

        plot(checkpoints, str(out), title=path)
        print(f"{PROG}: plot written to {out}", file=sys.stderr)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The ``remus-stats`` command; returns the exit status."""
    return run_command(PROG, __doc__ or "", _body, argv)


if __name__ == "__main__":
    sys.exit(main())

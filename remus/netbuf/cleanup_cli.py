"""Usage: remus-netbuf-cleanup [options] [IFNAME...]

Release the guest output that a killed remus (SIGKILL, crash) left held, and
remove the IFB devices, plug qdiscs and redirects it had set up.  Only
interfaces whose remus process is gone are touched; with IFNAMEs, only those.
Needs root.

Options:
  -n, --dry-run      say what would be cleaned up, change nothing
  --state-dir=DIR    where remus keeps its records [default: /run/remus/netbuf]
  -h, --help         show this help and exit
  --version          show the version and exit

Exit status: 0 when nothing failed (also when there was nothing to do),
1 when something could not be cleaned up, 2 on a usage error.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from remus.cli_common import Args, run_command
from remus.errors import NetbufError

PROG = "remus-netbuf-cleanup"


def _body(args: Args) -> int:
    from remus.netbuf.cleanup import Outcome, clean_stale

    state_dir = str(args["--state-dir"])
    try:
        results = clean_stale(state_dir, vifs=args["IFNAME"] or None, dry_run=bool(args["--dry-run"]))
    except OSError as exc:
        raise NetbufError(f"cannot open a netlink socket: {exc}") from None
    if not results:
        print(f"{PROG}: nothing to clean up in {state_dir}")
    for r in results:
        line = f"{r.vif}: {r.outcome.value}" + (f" ({r.detail})" if r.detail else "")
        print(line, file=sys.stderr if r.outcome is Outcome.FAILED else sys.stdout)
    return 1 if any(r.outcome is Outcome.FAILED for r in results) else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The ``remus-netbuf-cleanup`` command; returns the exit status."""
    return run_command(PROG, __doc__ or "", _body, argv)


if __name__ == "__main__":
    sys.exit(main())

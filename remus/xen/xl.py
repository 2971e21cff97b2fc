"""Running Xen's ``xl`` command: an argument list (never a shell), a deadline, its words in the error.

remus uses xl where xl is the toolstack's own interface to something: on the
primary, reading a domain's libxl configuration (``domain_config``); on the
backup, looking a name up (``domid``) and destroying what a failed restore
left (``destroy``); ``remus.xen.restore`` runs ``xl restore`` itself.  Every
failure is an ``XlError`` whose message names the command and carries the
lines of xl's stderr that say what went wrong.  Nothing here loads the cffi
binding, and nothing prints.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from typing import Optional, Sequence

from remus.errors import XlError

XL = "xl"
#: Deadline of the short xl commands (every system call is slow in a PV dom0 under emulation).
TIMEOUT_S = 60.0


def xl_path() -> str:
    """Where the xl command is.

    Raises:
        XlError: it is not installed.
    """
    path = shutil.which(XL)
    if path is None:
        raise XlError("the xl command is not installed on this host (Debian: apt-get install xen-utils-4.17)")
    return path


def summary(stderr: str) -> str:
    """The lines of xl's stderr that say what went wrong, as one line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    failing = [line for line in lines if "error" in line.lower() or "fail" in line.lower()]
    return " / ".join((failing or lines)[-3:]) or "no message"


def run(args: Sequence[str], timeout_s: float = TIMEOUT_S) -> "subprocess.CompletedProcess[str]":
    """``xl ARGS...`` to completion, its output captured (a failing status is the caller's to judge).

    Raises:
        XlError: xl is missing, could not be started, or did not finish in time.
    """
    command = [xl_path(), *args]
    shown = " ".join([XL, *args])
    try:
        return subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              errors="replace", timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise XlError(f"`{shown}` did not finish within {timeout_s:.0f} s") from None
    except OSError as exc:
        raise XlError(f"cannot run `{shown}`: {exc.strerror or exc}") from None


def domid(name: str) -> Optional[int]:
    """The id of the domain called ``name`` on this host, or None if there is none.

    Raises:
        XlError: xl could not tell (not root, no xenstored, ...).
    """
    proc = run(["domid", name])
    if proc.returncode == 0:
        try:
            return int(proc.stdout.strip())
        except ValueError:
            raise XlError(f"`xl domid {name}` printed {proc.stdout.strip()!r}, not a domain id") from None
    if "does not exist" in proc.stderr:
        return None
    raise XlError(f"`xl domid {name}` failed: {summary(proc.stderr)}")


def destroy(domain: str) -> None:
    """``xl destroy DOMAIN``.

    Raises:
        XlError: it failed.
    """
    proc = run(["destroy", domain])
    if proc.returncode != 0:
        raise XlError(f"`xl destroy {domain}` failed: {summary(proc.stderr)}")


def pause(domain: str) -> None:
    """``xl pause DOMAIN`` (a controller pause: ``xl unpause`` undoes it).

    Raises:
        XlError: it failed.
    """
    proc = run(["pause", domain])
    if proc.returncode != 0:
        raise XlError(f"`xl pause {domain}` failed: {summary(proc.stderr)}")


def domain_config(domid: int) -> str:
    """The libxl configuration of running domain ``domid``, as compact JSON.

    It is the ``config`` of ``xl list -l DOMID``, which xl computes with
    ``libxl_retrieve_domain_configuration`` exactly as ``xl save`` does for
    the configuration it writes into a save file.

    Raises:
        XlError: xl failed, printed something other than JSON (``output_format``
            set to ``sxp`` in xl.conf), or has no configuration for the domain.
    """
    proc = run(["list", "-l", str(domid)])
    if proc.returncode != 0:
        raise XlError(f"`xl list -l {domid}` failed: {summary(proc.stderr)}")
    try:
        listing = json.loads(proc.stdout)
    except ValueError:
        raise XlError(f"`xl list -l {domid}` did not print JSON "
                      "(is output_format set to \"sxp\" in /etc/xen/xl.conf?)") from None
    entries = listing if isinstance(listing, list) else []
    configs = [e.get("config") for e in entries if isinstance(e, dict) and e.get("domid") == domid]
    if not configs or not isinstance(configs[0], dict):
        raise XlError(f"xl has no configuration for domain {domid} (was it created with xl or libxl?)")
    return json.dumps(configs[0], separators=(",", ":"))

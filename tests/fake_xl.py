"""A fake ``xl`` command for tests: a script put first on PATH by the ``fake_xl`` fixture.

It keeps its domains in ``state.json`` (in the fixture's directory), records every
call there, and saves what ``xl restore`` read from its stdin in ``restored.bin``.
``FAKE_XL_RESTORE`` chooses how a restore ends: ``ok``; ``fail`` as xl fails (it
destroys the domain it made); ``fail-leave``, leaving it; ``hang`` after creating
it.  ``FAKE_XL_LIST`` is what ``xl list -l`` prints.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

import pytest

FAKE_XL = r'''#!PYTHON
import json, os, struct, sys, time
home = os.environ["FAKE_XL_HOME"]
path = os.path.join(home, "state.json")
state = json.load(open(path)) if os.path.exists(path) else {"domains": {}, "next": 5, "calls": []}
args = sys.argv[1:]
state["calls"].append(args)

def save():
    with open(path, "w") as f:
        json.dump(state, f)

def gone(name):
    save()
    sys.stderr.write(f"Can't get domid of domain name '{name}', maybe this domain does not exist.\n")
    sys.exit(1)

if args[0] == "domid":
    if args[1] not in state["domains"]:
        gone(args[1])
    save()
    print(state["domains"][args[1]])
elif args[0] == "destroy":
    names = [n for n, d in state["domains"].items() if str(d) == args[1] or n == args[1]]
    for n in names:
        del state["domains"][n]
    save()
elif args[0] == "list":
    save()
    sys.stdout.write(os.environ.get("FAKE_XL_LIST", "[]"))
elif args[0] == "restore":
    assert args[1] == "/dev/stdin"
    sys.stderr.write("Loading new save file /dev/stdin (new xl fmt info 0x3/0x0/123)\n")
    head = sys.stdin.buffer.read(52)
    (length,) = struct.unpack_from("<I", head, 48)
    config = sys.stdin.buffer.read(length)
    name = json.loads(config[:-1])["c_info"]["name"]
    domid = state["next"]
    state["next"] += 1
    state["domains"][name] = domid
    how = os.environ.get("FAKE_XL_RESTORE", "ok")
    save()
    if how == "hang":
        time.sleep(60)
    rest = sys.stdin.buffer.read()
    with open(os.path.join(home, "restored.bin"), "wb") as f:
        f.write(head + config + rest)
    if how.startswith("fail"):
        sys.stderr.write("xc: error: Failed to read Record Header from stream (0 = Success): Internal error\n")
        sys.stderr.write("libxl: error: libxl_stream_read.c:851:libxl__xc_domain_restore_done: restoring domain: Success\n")
        sys.stderr.write("libxl: error: libxl_create.c:1726:domcreate_rebuild_done: cannot (re-)build domain: -3\n")
        if how == "fail":
            del state["domains"][name]
        save()
        sys.exit(3)
else:
    sys.exit(f"fake xl: unexpected {args}")
'''


@pytest.fixture
def fake_xl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    script = tmp_path / "xl"
    script.write_text(FAKE_XL.replace("PYTHON", sys.executable, 1))
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setenv("FAKE_XL_HOME", str(tmp_path))
    return tmp_path




def fake_xl_state(home: Path) -> dict[str, Any]:
    result: dict[str, Any] = json.loads((home / "state.json").read_text())
    return result

"""A fake ``xl`` command for tests: a script put first on PATH by the ``fake_xl`` fixture.

It keeps its domains in ``state.json`` (in the fixture's directory), records every
call there, and saves what ``xl restore`` read from its stdin in ``restored.bin``.
``FAKE_XL_RESTORE`` chooses how a restore ends: ``ok``; ``fail`` as xl fails (it
destroys the domain it made); ``fail-leave``, leaving it; ``hang`` after creating
it.  ``FAKE_XL_LIST`` is what ``xl list -l`` prints.  ``xl migrate-receive -r``
checks the checkpointed stream as xl, libxl and libxc do, notes what it saw in
``journal.jsonl`` and, at libxc's END record or the end of the stream (failover; the
journal says which), writes the memory and state records of the last complete
checkpoint to ``failover.json`` and renames ``NAME--incoming`` to ``NAME``; with
``FAKE_XL_HOLD=FILE`` it reads nothing after its banner until FILE exists.
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
import fcntl, hashlib, json, os, struct, sys, time
home = os.environ["FAKE_XL_HOME"]
path = os.path.join(home, "state.json")
lock = open(os.path.join(home, "state.lock"), "w")
fcntl.flock(lock, fcntl.LOCK_EX)  # xl commands run concurrently with a migrate-receive
state = json.load(open(path)) if os.path.exists(path) else {"domains": {}, "next": 5, "calls": []}
args = sys.argv[1:]
state["calls"].append(args)

def save():  # atomically: tests read it while xl commands run
    with open(path + ".new", "w") as f:
        json.dump(state, f)
    os.replace(path + ".new", path)

def change(how):
    """Re-read the state under the lock, apply how(state), save it."""
    global state
    fcntl.flock(lock, fcntl.LOCK_EX)
    state = json.load(open(path))
    how(state)
    save()
    fcntl.flock(lock, fcntl.LOCK_UN)

def gone(name):
    save()
    sys.stderr.write(f"Can't get domid of domain name '{name}', maybe this domain does not exist.\n")
    sys.exit(1)

def migrate_receive(opts):
    """xl migrate-receive -r as Xen 4.17 behaves (xl_migrate.c, libxl_stream_read.c,
    xg_sr_restore.c), checking the framing strictly; journal.jsonl says what it saw."""
    assert opts == ["-r"], opts
    save()
    fcntl.flock(lock, fcntl.LOCK_UN)
    stdin = sys.stdin.buffer
    journal = open(os.path.join(home, "journal.jsonl"), "a")

    def note(**what):
        journal.write(json.dumps(what) + "\n")
        journal.flush()

    def fail(message, domain=None):
        note(event="error", message=message)
        sys.stderr.write(f"xc: error: {message}: Internal error\n")
        if domain:
            change(lambda st: st["domains"].pop(domain, None))
        sys.exit(1)

    def need(n):
        data = b""
        while len(data) < n:
            chunk = stdin.read(n - len(data))
            if not chunk:
                raise EOFError(len(data))
            data += chunk
        return data

    sys.stderr.write("migration target: Ready to receive domain.\n")
    sys.stdout.buffer.write(b"xl migration receiver ready, send binary domain data.\n")
    sys.stdout.flush()
    while os.environ.get("FAKE_XL_HOLD") and not os.path.exists(os.environ["FAKE_XL_HOLD"]):
        time.sleep(0.02)
    try:
        magic, order, mandatory, optional, optlen = struct.unpack("<32sIIII", need(48))
        assert magic == b"Xen saved domain, xl format\n \0 \r" and order == 0x01020304 and mandatory == 3
        extra = need(optlen)
        (length,) = struct.unpack_from("<I", extra)
        config = extra[4 : 4 + length]
        assert config.endswith(b"\0") and len(extra) == 4 + length
        name = json.loads(config[:-1])["c_info"]["name"]
    except (EOFError, AssertionError) as exc:
        fail(f"bad xl header ({exc!r})")
    incoming = name + "--incoming"
    domid = state["next"]
    change(lambda st: st["domains"].update({incoming: domid}) or st.update(next=domid + 1))
    note(event="created", name=incoming, domid=domid)
    try:
        ident, version, options = struct.unpack(">QII", need(16))
        assert (ident, version, options) == (0x4C6962786C466D74, 2, 0)
        assert struct.unpack("<II", need(8)) == (1, 0)  # LIBXC_CONTEXT
        head = need(40)
        assert head[:8] == b"\xff" * 8 and head[8:12] == b"XENF"
    except (EOFError, AssertionError) as exc:
        fail(f"bad stream opening ({exc!r})", incoming)
    memory, vcpu, static, buffered, checkpoints = {}, [], set(), [], 0

    def apply(records):
        for rtype, body in records:
            if rtype == 1:
                count, _ = struct.unpack_from("<II", body)
                words = struct.unpack_from(f"<{count}Q", body, 8)
                offset = 8 + 8 * count
                for word in words:
                    if (word >> 32) & 0xF0000000 in (0xF << 28, 0xE << 28, 0xD << 28):
                        memory[word & 0x000FFFFFFFFFFFFF] = None
                    else:
                        memory[word & 0x000FFFFFFFFFFFFF] = hashlib.sha256(body[offset : offset + 4096]).hexdigest()
                        offset += 4096
            elif rtype in (4, 5, 6, 7, 8, 0xC):
                if rtype == 8:
                    vcpu.clear()
                vcpu.append(body.hex())

    while True:
        try:
            rtype, rlen = struct.unpack("<II", need(8))
            body = need(rlen + (-rlen % 8))[:rlen]
        except EOFError:
            if checkpoints == 0:
                fail("Failed to read Record Header from stream", incoming)
            ended_by = "EOF"
            break  # remus failover
        if rtype in (2, 0x10, 0x11, 0x12, 3):
            if rtype in static:
                fail(f"Already received record {rtype:#x}", incoming)
            static.add(rtype)
        if rtype == 0x0E:  # CHECKPOINT: libxl reads its records up to CHECKPOINT_END
            try:
                libxl = struct.unpack("<II", need(8))
            except EOFError:
                fail("libxl: EOF before CHECKPOINT_END", incoming)
            if libxl != (4, 0):
                fail(f"libxl record {libxl} where CHECKPOINT_END was due", incoming)
            apply(buffered)
            buffered = []
            checkpoints += 1
            note(event="checkpoint", n=checkpoints)
            continue
        if rtype == 0:  # END ends libxc's loop: a failover from the last complete checkpoint
            if checkpoints == 0:  # libxc would complete a half-restored domain: never asked of xl
                fail("END record before the first checkpoint", incoming)
            ended_by = "END"
            break
        if checkpoints == 0:
            apply([(rtype, body)])
        else:
            buffered.append((rtype, body))
    note(event="failover", checkpoints=checkpoints, dropped=len(buffered), ended_by=ended_by)
    sys.stderr.write(f"migration target: Remus Failover for domain {domid}\n")
    with open(os.path.join(home, "failover.json"), "w") as f:
        json.dump({"checkpoints": checkpoints, "memory": memory, "state": vcpu}, f)
    change(lambda st: st["domains"].update({name: st["domains"].pop(incoming)}))
    sys.exit(0)

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
    fcntl.flock(lock, fcntl.LOCK_UN)
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
            change(lambda st: st["domains"].pop(name))
        sys.exit(3)
elif args[0] == "migrate-receive":
    migrate_receive(args[1:])
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

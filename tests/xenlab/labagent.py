"""Lab helper for two hosts (run-two-hosts.sh): the backup's dom0 drives the primary's.

    python3 labagent.py serve ADDR PORT      on the primary: answer requests on ADDR:PORT (the
                                             lab's private link) until a "bye", one request
                                             per connection; prints "listening on PORT" first
                                             (PORT 0: one the kernel picks)
    python3 labagent.py sh HOST PORT CMD     on the backup: run CMD with ``sh -c`` on HOST, print
                                             its output, exit with its status
    python3 labagent.py kill HOST PORT PID...
                                             on the backup: HOST SIGKILLs each PID, in order
                                             (one already gone is named, exit 1);
                                             print this host's boot time and wall time read just
                                             before the request was sent (as exitclock.py kill
                                             prints them) and the request's round trip (the
                                             kill happened within it; with
                                             EXITCLOCK_SNAPSHOT=FILE, first /proc's CPU times
                                             to FILE, as exitclock.py kill does)
    python3 labagent.py bye HOST PORT        the agent on HOST stops serving
    python3 labagent.py wait HOST PORT SECONDS
                                             until the agent answers (exit 1 if it never did)
    python3 labagent.py accept ADDR PORT CMD...
                                             on the backup: accept one connection on PORT and
                                             exec CMD with it as stdin and stdout (the backup
                                             end of `xl remus`'s stream: no copy in between);
                                             says "listening on PORT" on stderr first
    python3 labagent.py pipe HOST PORT       on the primary, as `xl remus`'s receiving command:
                                             connect and copy stdin to the connection and the
                                             connection to stdout, each until its end

A request is one JSON line; the answer is one JSON line (``rc``, ``out``).  The clocks of the
two hosts are not compared: every time the campaign reports is read on the backup, which is
where the failover happens.  The agent runs what it is sent, as root: it is for the lab's own
link between two throw-away QEMU guests, never for a network anyone else can reach.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import exitclock  # beside this file: the same clock, stamp and snapshot as a local kill

#: How long a shell request may run on the primary.
SH_LIMIT_S = 900.0
CHUNK = 1 << 16


def _answer(request: dict) -> dict:
    if "kill" in request:
        missing = []
        for pid in request["kill"]:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                missing.append(str(pid))
        return {"rc": 1 if missing else 0, "out": "".join(f"no process {pid}\n" for pid in missing)}
    if "sh" in request:
        try:
            done = subprocess.run(["sh", "-c", request["sh"]], stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  timeout=SH_LIMIT_S)
        except subprocess.TimeoutExpired:
            return {"rc": 124, "out": f"timed out after {SH_LIMIT_S:.0f} s\n"}
        return {"rc": done.returncode, "out": done.stdout.decode("utf-8", "replace")}
    if "bye" in request:
        return {"rc": 0, "out": "", "bye": True}
    return {"rc": 2, "out": f"unknown request {sorted(request)}\n"}


def serve(address: str, port: int) -> int:
    """Answer requests, one per connection, until a bye."""
    with socket.create_server((address, port)) as server:
        print(f"listening on {server.getsockname()[1]}", flush=True)
        while True:
            conn, _ = server.accept()
            with conn, conn.makefile("rwb") as stream:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                line = stream.readline()
                try:
                    answer = _answer(json.loads(line))
                except ValueError as exc:
                    answer = {"rc": 2, "out": f"bad request: {exc}\n"}
                stream.write(json.dumps(answer).encode() + b"\n")
                stream.flush()
            if answer.get("bye"):
                return 0


def request(host: str, port: int, what: dict, timeout: float = SH_LIMIT_S + 30) -> dict:
    """Send one request to the agent at HOST:PORT and return its answer."""
    with socket.create_connection((host, port), timeout=timeout) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn.makefile("rwb") as stream:
            stream.write(json.dumps(what).encode() + b"\n")
            stream.flush()
            line = stream.readline()
    if not line:
        raise ConnectionError(f"the agent at {host}:{port} closed without an answer")
    return json.loads(line)


def remote_kill(host: str, port: int, pids: list[int]) -> int:
    exitclock.snapshot()
    started = exitclock.boottime()
    now = exitclock.stamp()
    answer = request(host, port, {"kill": pids})
    round_trip = exitclock.boottime() - started
    sys.stderr.write(answer["out"])
    print(f"{now} {round_trip:.4f}")
    return answer["rc"]


def wait_for(host: str, port: int, seconds: float) -> int:
    deadline = time.monotonic() + seconds
    while True:
        try:
            request(host, port, {"sh": "true"}, timeout=5)
            return 0
        except OSError as exc:
            if time.monotonic() >= deadline:
                print(f"no agent at {host}:{port} within {seconds:.0f} s: {exc}", file=sys.stderr)
                return 1
            time.sleep(1)


def accept(address: str, port: int, command: list[str]) -> int:
    with socket.create_server((address, port)) as server:
        print(f"listening on {server.getsockname()[1]}", file=sys.stderr, flush=True)
        conn, _ = server.accept()
    os.dup2(conn.fileno(), 0)
    os.dup2(conn.fileno(), 1)
    conn.close()
    os.execvp(command[0], command)


def pipe(host: str, port: int) -> int:
    conn = socket.create_connection((host, port))

    def outward() -> None:  # stdin to the connection; its end shuts our side of it
        while data := os.read(0, CHUNK):
            conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=outward, daemon=True)
    sender.start()
    while data := conn.recv(CHUNK):
        os.write(1, data)
    os.close(1)  # the backup is done: so is this copy (the sender ends with the process)
    return 0


def main(argv: list[str]) -> int:
    verb, args = (argv[0], argv[1:]) if argv else ("", [])
    if verb == "serve" and len(args) == 2:
        return serve(args[0], int(args[1]))
    if verb == "accept" and len(args) >= 3:
        return accept(args[0], int(args[1]), args[2:])
    if verb in ("sh", "kill", "bye", "wait", "pipe") and len(args) >= 2:
        host, port = args[0], int(args[1])
        if verb == "pipe" and len(args) == 2:
            return pipe(host, port)
        if verb == "bye" and len(args) == 2:
            return request(host, port, {"bye": True})["rc"]
        if verb == "wait" and len(args) == 3:
            return wait_for(host, port, float(args[2]))
        if verb == "kill" and len(args) >= 3:
            return remote_kill(host, port, [int(pid) for pid in args[2:]])
        if verb == "sh" and len(args) == 3:
            answer = request(host, port, {"sh": args[2]})
            sys.stdout.write(answer["out"])
            return answer["rc"]
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

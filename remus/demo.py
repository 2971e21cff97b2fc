"""Usage: remus-demo [options]

Show Remus at work on this machine, no Xen needed: start a remus-receiver and
a remus primary on localhost protecting a simulated guest, show the live
checkpoint statistics, kill the primary hard (SIGKILL), show the failover, and
check Remus's promise.

Options:
  -h, --help            show this help message and exit
  --seconds=S           let the primary run S seconds after its first
                        checkpoint before killing it (default 5)
  -i MS, --interval=MS  checkpoint interval (default 50)
  --memory=SIZE         simulated guest memory (default 64M)
  --dirty-rate=N        pages the guest dirties per second (default 4000)
  --keep=DIR            keep the run's files (output, statistics, events) in
                        DIR
  --plot=OUT            draw the primary's checkpoints to OUT (.png or .svg;
                        needs matplotlib)
  --version             show the version and exit

Exit status: 0 if every check passed (or the demo was stopped with Ctrl-C),
1 if a check failed, 2 on a usage error.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Iterator, Optional, Sequence

from remus.cli_common import Args, StopRequested, opt_float, opt_int, opt_size, run_command
from remus.errors import RemusError, UsageError
from remus.report import human_bytes

PROG = "remus-demo"


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Defer SIGINT/SIGTERM for the block; one that came meanwhile is delivered right after it.

    Handlers, not the signal mask: a child started inside the block must not inherit blocked
    signals (exec keeps the mask, but resets handled signals to their defaults).
    """
    caught: list[int] = []

    def defer(signum: int, frame: Optional[FrameType]) -> None:
        caught.append(signum)

    previous = {sig: signal.signal(sig, defer) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        if caught:
            signal.raise_signal(caught[0])


def _end(proc: "Optional[subprocess.Popen[bytes]]", hard: bool) -> None:
    """Make sure ``proc`` is gone: SIGKILL if ``hard``, else SIGINT and up to 10 s for it to finish."""
    if proc is None or proc.poll() is not None:
        return
    if not hard:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            pass
    proc.kill()
    proc.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _json_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            pass  # a line being written right now
    return records


def _released(path: Path) -> list[tuple[int, str]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        fields = line.split()
        if len(fields) == 3 and fields[0].isdigit():
            out.append((int(fields[0]), fields[2]))
    return out


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


class Demo:
    """One run of the demo in ``workdir`` (see the module docstring)."""

    def __init__(self, workdir: Path, seconds: float, interval_ms: int, memory: str, dirty_rate: int) -> None:
        self.workdir = workdir
        self.seconds = seconds
        self.interval_ms = interval_ms
        self.memory = memory
        self.dirty_rate = dirty_rate
        self.output = workdir / "output.log"
        self.stats = workdir / "primary-stats.json"
        self.events = workdir / "receiver-events.json"
        self.tty = sys.stdout.isatty()

    def _throwaway_key(self) -> str:
        """A key for this demonstration only, in its own work directory (remus-keygen's job on real hosts)."""
        from remus.link.keys import write_key_file

        path = str(self.workdir / "authkey")
        write_key_file(path, force=True)
        return path

    def say(self, line: str) -> None:
        print(f"[demo] {line}", flush=True)

    def run(self) -> int:
        port = _free_port()
        python = [sys.executable, "-m"]
        key_file = self._throwaway_key()
        receiver_cmd = python + ["remus.backup.cli", "--port", str(port), "--listen", "127.0.0.1",
                                 "--key-file", key_file, "--control", str(self.workdir / "receiver.sock"),
                                 "--once", "--events-json", str(self.events)]
        spec = (f"sim:demo,memory={self.memory},dirty_rate={self.dirty_rate},seed=1,"
                f"packet_rate=50,output={self.output}")
        primary_cmd = python + ["remus.cli", "-i", str(self.interval_ms),
                                "--key-file", key_file, "--stats-json", str(self.stats),
                                spec, "127.0.0.1", "-p", str(port)]
        self.say(f"backup:  {' '.join(receiver_cmd[2:])}")
        receiver: Optional[subprocess.Popen[bytes]] = None
        primary: Optional[subprocess.Popen[bytes]] = None
        interrupted = False
        try:
            # Stop signals are held while a child starts: a stop then always finds its handle.
            with _signals_held():
                receiver = subprocess.Popen(receiver_cmd)
            self._wait_listening(port, receiver)
            self.say(f"primary: {' '.join(primary_cmd[2:])}")
            with _signals_held():
                primary = subprocess.Popen(primary_cmd)
            last = self._watch(primary)
            if primary.poll() is not None:
                self.say(f"the primary exited early (status {primary.returncode})")
                return 1
            primary.send_signal(signal.SIGKILL)
            primary.wait()
            self.say(f"killed the primary with SIGKILL after checkpoint {last} (its guest dies with it)")
            activation = self._wait_activation(receiver)
            if activation is not None:
                time.sleep(1.5)  # let the activated guest carry on for a moment
        except (KeyboardInterrupt, StopRequested):
            self.say("stopping: the primary and the backup go too")
            interrupted = True
            raise
        finally:
            with _signals_held():  # a second Ctrl-C waits until both are gone, then counts
                _end(primary, hard=True)
                _end(receiver, hard=interrupted)
        return self._verdict(activation)

    def _wait_listening(self, port: int, receiver: "subprocess.Popen[bytes]") -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if receiver.poll() is not None:
                raise RemusError("the receiver exited before listening (see its message above)")
            if any(e.get("event") == "listening" for e in _json_lines(self.events)):
                return
            time.sleep(0.05)
        raise RemusError("the receiver did not start listening within 20 s")

    def _watch(self, primary: "subprocess.Popen[bytes]") -> int:
        """Show live statistics for ``seconds``; return the last checkpoint number seen."""
        # The clock starts at the first acknowledged checkpoint (a loaded machine may need a
        # while to start both processes); without one within a minute, the run counts as failed.
        end = time.monotonic() + 60.0
        started = False
        next_line = 0.0
        last = 0
        while time.monotonic() < end and primary.poll() is None:
            time.sleep(0.1)
            checkpoints = [r for r in _json_lines(self.stats) if r.get("event") == "checkpoint"]
            if not checkpoints:
                continue
            if not started:
                started = True
                end = time.monotonic() + self.seconds
            c = checkpoints[-1]
            last = c["seq"]
            line = (f"checkpoint {c['seq']:4d}  pause {c['pause_ms']:5.1f} ms  dirty {c['dirty_pages']:5d} pg  "
                    f"{human_bytes(c['raw_bytes']):>9} -> {human_bytes(c['wire_bytes']):>9}  "
                    f"ack {c['ack_ms']:5.1f} ms  released {len(_released(self.output))} packets")
            if self.tty:
                print("\r\x1b[K[demo] " + line, end="", flush=True)
            elif time.monotonic() >= next_line:
                self.say(line)
                next_line = time.monotonic() + 1.0
        if self.tty:
            print()
        return last

    def _wait_activation(self, receiver: "subprocess.Popen[bytes]") -> Optional[dict[str, Any]]:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            for event in _json_lines(self.events):
                if event.get("event") in ("activated", "activation-failed", "nothing-to-activate"):
                    return event if event["event"] == "activated" else None
            if receiver.poll() is not None:
                return None
            time.sleep(0.05)
        return None

    def _verdict(self, activation: Optional[dict[str, Any]]) -> int:
        checks: list[Check] = []
        acked = [r["seq"] for r in _json_lines(self.stats) if r.get("event") == "checkpoint"]
        released = _released(self.output)
        primary_out = [c for c, role in released if role == "primary"]
        backup_out = [c for c, role in released if role == "backup"]
        if activation is None:
            checks.append(Check("failover", False, "the backup activated nothing"))
        else:
            seq, counter = activation["seq"], activation["counter"]
            last_acked = max(acked, default=0)
            checks.append(Check(
                "activated the last acknowledged checkpoint",
                last_acked <= seq <= last_acked + 1,
                f"activated checkpoint {seq}; the primary had recorded the ack of {last_acked} "
                "(the backup may hold one more whose ack the primary never read)",
            ))
            checks.append(Check(
                "activated memory is that checkpoint, byte for byte",
                bool(activation.get("verified")),
                f"BLAKE2b of the activated image = digest the primary computed at capture: "
                f"{activation['memory_digest'][:16]}...",
            ))
            highest = max(primary_out, default=0)
            checks.append(Check(
                "no client saw output the backup does not have",
                highest <= counter,
                f"highest counter released by the primary {highest} <= backup's counter {counter} "
                f"({len(primary_out)} packets released)",
            ))
            checks.append(Check(
                "the backup carries on from the replicated state",
                bool(backup_out) and min(backup_out) > counter,
                f"{len(backup_out)} packets from the backup, from counter "
                f"{min(backup_out) if backup_out else '-'} on",
            ))
        for check in checks:
            self.say(f"{'PASS' if check.ok else 'FAIL'}  {check.name}: {check.detail}")
        ok = all(c.ok for c in checks)
        self.say("Remus's promise held." if ok else "CHECK FAILED.")
        return 0 if ok else 1


def _body(args: Args) -> int:
    seconds = opt_float(args, "--seconds", 5.0, 0.1, 86400.0)
    interval = opt_int(args, "--interval", 50, 1, 3_600_000)
    dirty_rate = opt_int(args, "--dirty-rate", 4000, 0, 10_000_000)
    memory = opt_size(args, "--memory", "64M", 1 << 20, 16 << 30)
    plot_out = args["--plot"]
    if plot_out is not None and not str(plot_out).lower().endswith((".png", ".svg")):
        raise UsageError(f"option --plot: {plot_out} must end in .png or .svg")
    if args["--keep"]:
        workdir = Path(args["--keep"])
        workdir.mkdir(parents=True, exist_ok=True)
        return _run(Demo(workdir, seconds, interval, memory, dirty_rate), plot_out)
    with tempfile.TemporaryDirectory(prefix="remus-demo-") as tmp:
        return _run(Demo(Path(tmp), seconds, interval, memory, dirty_rate), plot_out)


def _run(demo: Demo, plot_out: Optional[str]) -> int:
    status = demo.run()
    if plot_out is not None:
        from remus.statsfile import read_checkpoints
        from remus.statsplot import plot

        with open(demo.stats, encoding="utf-8") as stream:
            plot(read_checkpoints(stream, str(demo.stats)), plot_out, title="remus-demo: the primary")
        demo.say(f"plot of the primary's checkpoints written to {plot_out}")
    return status


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The ``remus-demo`` command; returns the exit status."""
    return run_command(PROG, __doc__ or "", _body, argv)


if __name__ == "__main__":
    sys.exit(main())

"""The two-host lab's agent (``tests/xenlab/labagent.py``), on loopback, with processes this
test starts: requests and their answers, a remote SIGKILL, and the stream `xl remus` uses."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

AGENT = Path(__file__).resolve().parent / "xenlab" / "labagent.py"


def agent(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(AGENT), *args], capture_output=True, text=True,
                          timeout=60, **kwargs)


def listening_port(stream) -> str:
    line = stream.readline()
    assert line.startswith("listening on "), line
    return line.split()[-1]


def test_the_agent_runs_commands_kills_and_stops_on_bye() -> None:
    server = subprocess.Popen([sys.executable, str(AGENT), "serve", "127.0.0.1", "0"],
                              stdout=subprocess.PIPE, text=True)
    victim = subprocess.Popen(["sleep", "600"])
    try:
        port = listening_port(server.stdout)
        assert agent("wait", "127.0.0.1", port, "30").returncode == 0
        ran = agent("sh", "127.0.0.1", port, "echo from the primary; exit 3")
        assert (ran.returncode, ran.stdout) == (3, "from the primary\n")
        killed = agent("kill", "127.0.0.1", port, str(victim.pid))
        assert killed.returncode == 0, killed.stderr
        boot, wall, round_trip = map(float, killed.stdout.split())
        assert boot > 0 and wall > 1e9 and 0 <= round_trip < 60
        assert victim.wait(30) == -9
        second = subprocess.Popen(["sleep", "600"])
        # A PID no process can have (beyond pid_max; never a reaped one, which could be reused),
        # then one of ours, which is killed all the same.
        nobody = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1
        try:
            missing = agent("kill", "127.0.0.1", port, str(nobody), str(second.pid))
            assert missing.returncode == 1 and f"no process {nobody}" in missing.stderr
            assert second.wait(30) == -9
        finally:
            second.kill()
            second.wait()
        assert agent("bye", "127.0.0.1", port).returncode == 0
        assert server.wait(30) == 0
    finally:
        victim.kill()
        server.kill()
        victim.wait()
        server.wait()


def test_usage_errors_exit_2() -> None:
    assert agent("serve").returncode == 2
    assert agent("kill", "127.0.0.1", "1").returncode == 2


def test_accept_and_pipe_carry_a_stream_both_ways_to_its_end() -> None:
    # accept execs cat on the connection: what pipe sends comes back, and pipe's stdin ending
    # ends cat's, which ends the connection and pipe's stdout.
    echo = subprocess.Popen([sys.executable, str(AGENT), "accept", "127.0.0.1", "0", "cat"],
                            stderr=subprocess.PIPE, text=True)
    try:
        port = listening_port(echo.stderr)
        payload = bytes(range(256)) * 4096  # 1 MiB, more than one chunk
        piped = subprocess.run([sys.executable, str(AGENT), "pipe", "127.0.0.1", port],
                               input=payload, capture_output=True, timeout=60)
        assert piped.returncode == 0, piped.stderr
        assert piped.stdout == payload
        assert echo.wait(30) == 0
    finally:
        echo.kill()
        echo.wait()

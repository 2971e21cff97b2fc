"""remus.deathwatch: the connection is shut when the main thread exits, and only then."""

from __future__ import annotations

import contextlib
import os
import platform
import select
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Iterator

import pytest

from remus.deathwatch import main, watch_death
from tests.helpers import wait_until

ROOT = Path(__file__).resolve().parent.parent
#: The raw ``exit`` system call (one thread, not the process), by machine.
SYS_EXIT = {"x86_64": 60, "aarch64": 93}.get(platform.machine())
WAIT_S = 60.0  # an upper bound on waiting for a condition, never a pause


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    yield srv
    srv.close()


def _eof_within(conn: socket.socket, timeout_s: float) -> bool:
    """Whether ``conn`` reads EOF (no data) within ``timeout_s``."""
    readable, _, _ = select.select([conn], [], [], timeout_s)
    return bool(readable) and conn.recv(16) == b""


def _ended(pid: int) -> bool:
    """Whether ``pid`` is gone or a zombie (an orphan's reaper may be slow, or absent)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


@contextlib.contextmanager
def _child_connected(listener: socket.socket, body: str) -> Iterator[tuple[subprocess.Popen[str], socket.socket, int]]:
    """A child that connects to ``listener`` and arms a watch, then runs ``body``: the child,
    our end of its connection and its helper's pid; both killed or closed afterwards."""
    child = _child(listener.getsockname()[1], body)
    conn, _ = listener.accept()
    try:
        assert child.stdout is not None
        yield child, conn, int(child.stdout.readline().split()[1])
    finally:
        conn.close()
        if child.poll() is None:
            child.kill()
            child.wait()


def _child(port: int, body: str) -> subprocess.Popen[str]:
    code = textwrap.dedent(f"""
        import ctypes, socket, sys, threading
        sys.path.insert(0, {str(ROOT)!r})
        from remus.deathwatch import watch_death
        sock = socket.create_connection(("127.0.0.1", {port}))
        watch = watch_death(sock)
        print("helper", watch.helper.pid if watch else 0, flush=True)
    """) + textwrap.dedent(body)
    return subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


@pytest.mark.skipif(SYS_EXIT is None, reason="needs the exit system call number of this machine")
def test_the_main_thread_exiting_shuts_the_connection_while_the_process_still_holds_it(
        listener: socket.socket) -> None:
    # The main thread leaves by the raw exit call (that thread only); a second thread keeps the
    # process, and with it the socket, open until the test lets it go.  Only the watch can
    # bring the EOF before that.
    with _child_connected(listener, f"""
        import os
        def hold():
            sys.stdin.readline()  # until the test has seen the EOF (or gives up)
            os._exit(0)
        threading.Thread(target=hold).start()
        ctypes.CDLL(None).syscall({SYS_EXIT}, 0)
    """) as (child, conn, helper):
        assert helper > 0
        assert _eof_within(conn, WAIT_S)
        assert child.poll() is None  # the process, and its copy of the socket, still live
        assert child.stdin is not None
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.wait(WAIT_S) == 0


def test_a_sigkilled_primary_shuts_the_connection_and_its_helper_ends(listener: socket.socket) -> None:
    with _child_connected(listener, """
        sys.stdin.readline()
    """) as (child, conn, helper):
        os.kill(child.pid, signal.SIGKILL)
        assert _eof_within(conn, WAIT_S)
        child.wait(WAIT_S)
        # the helper (our child's, not ours) ends once it has done its one job
        wait_until(lambda: _ended(helper), WAIT_S, "the helper's end")


def test_disarming_leaves_the_socket_to_its_owner_alone(listener: socket.socket) -> None:
    sock = socket.create_connection(listener.getsockname())
    conn, _ = listener.accept()
    try:
        watch = watch_death(sock)
        assert watch is not None
        watch.disarm()
        assert watch.helper.returncode == -signal.SIGKILL  # killed and reaped, not shutting anything
        sock.sendall(b"still open")
        assert conn.recv(16) == b"still open"
        sock.close()
        # the helper's duplicate is gone with it: closing ours is the close
        assert _eof_within(conn, WAIT_S)
        watch.disarm()  # twice is harmless
    finally:
        conn.close()
        sock.close()


def test_only_the_main_thread_arms(listener: socket.socket) -> None:
    sock = socket.create_connection(listener.getsockname())
    conn, _ = listener.accept()
    armed: list[object] = []
    worker = threading.Thread(target=lambda: armed.append(watch_death(sock)))
    worker.start()
    worker.join()
    assert armed == [None]  # a worker thread's end is not the process's
    sock.close()
    conn.close()


def test_the_helper_refuses_a_bad_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["3"]) == 2
    assert "started by remus itself" in capsys.readouterr().err


def test_the_helper_never_imports_a_remus_from_the_working_directory(
        listener: socket.socket, tmp_path: Path) -> None:
    planted = tmp_path / "remus"
    planted.mkdir()
    marker = tmp_path / "imported"
    (planted / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    sock = socket.create_connection(listener.getsockname())
    conn, _ = listener.accept()
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        watch = watch_death(sock)
    finally:
        os.chdir(cwd)
    try:
        assert watch is not None
        # the real helper waits for the mutex (futex, or its 32-bit-compatible syscall numbers);
        # a planted one would have written its marker long before
        wait_until(lambda: _in_futex_wait(watch.helper.pid) or watch.helper.poll() is not None, WAIT_S,
                   "the helper's wait or end")
        assert watch.helper.poll() is None
        assert not marker.exists()
        watch.disarm()
    finally:
        sock.close()
        conn.close()


def _in_futex_wait(pid: int) -> bool:
    try:
        first = Path(f"/proc/{pid}/syscall").read_text().split()[0]
    except (OSError, IndexError):
        return False
    return first == {"x86_64": "202", "aarch64": "98"}.get(platform.machine(), "?")


def test_a_primary_that_exits_without_disarming_still_shuts_the_connection(listener: socket.socket) -> None:
    # Python's own exit collects the watch's objects first: the mutex must stay mapped for the
    # kernel to find it owner-dead, or the helper would hold the connection open for ever.
    with _child_connected(listener, """
        sys.stdin.readline()
        sys.exit(0)
    """) as (child, conn, helper):
        assert child.stdin is not None
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.wait(WAIT_S) == 0
        assert _eof_within(conn, WAIT_S)
        wait_until(lambda: _ended(helper), WAIT_S, "the helper's end")

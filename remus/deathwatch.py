"""Shut the primary's connection the moment its process starts to die, not once it is torn down.

Why.  A killed process closes its sockets only after the kernel has torn down
its memory: Linux's ``do_exit`` releases the address space before the file
table.  For a Python primary with its libraries and heaps that is tens of
megabytes, which on a paravirtualised dom0 (each page table handed back to
Xen) took 0.09 to 0.17 s in the lab before the backup saw the FIN, against
0.01 to 0.04 s for ``xl remus``'s small C process.  Every one of those
milliseconds is added to a failover.

How.  The kernel releases a thread's *robust* mutexes at the very start of the
thread's exit, before the address space goes, marking each one owner-dead and
waking a waiter (``set_robust_list(2)``).  ``watch_death`` puts a robust,
process-shared mutex in a small shared memory file, locks it on the main thread
and starts a helper (a ``python3`` running ``remus.deathwatch.main``) that holds a duplicate
of the connection and waits for that mutex.  When the helper gets it as
owner-dead, the main thread is exiting, so the whole process is (a CPython
main thread ends only with its process: by ``exit``, a crash or a fatal
signal, which has already sent SIGKILL to every other thread); the helper shuts
the connection both ways (the FIN goes out at once, whatever else still holds
the socket) and exits.  To the backup this is exactly the EOF it would have
seen a little later.

What it never does: it never touches the connection while the main thread
lives (a stopped or stalled primary is left to the heartbeat timeouts, as
before); it never sends a byte, reads one, or touches the guest, the network
buffer or the disks; it arms only on the main thread (a worker thread's end is
not the process's); and it never unmaps a mutex that is still locked (glibc
keeps the thread's robust list inside the mutexes themselves).  Disarming
kills and reaps the helper before the owner closes the socket, so an orderly
close is exactly what it was without the watch.  A helper that cannot start
costs only the speed: the socket closes at exit as it always did.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import signal
import socket
import subprocess
import sys
import threading
from typing import Optional, Sequence

log = logging.getLogger(__name__)

#: Room for a ``pthread_mutexattr_t`` (4 bytes on x86_64, 8 on aarch64).
_ATTR_BYTES = 16
#: glibc's ``PTHREAD_MUTEX_ROBUST`` and ``PTHREAD_PROCESS_SHARED``.
_ROBUST = 1
_SHARED = 1
_SHARED_FILE_BYTES = mmap.PAGESIZE
#: Watches whose mutex stayed locked because they were disarmed off the main thread: their
#: memory must outlive the process (see the module docstring), so it is kept here.
_KEPT: list["_SharedMutex"] = []


#: The helper's command: isolated (``-I``: neither the working directory nor PYTHONPATH can put
#: another ``remus`` first), importing this module from where this process found it.
_HELPER = "import sys; sys.path.insert(0, sys.argv[1]); from remus.deathwatch import main; sys.exit(main(sys.argv[2:]))"


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(what: str, result: int) -> None:
    if result != 0:
        raise OSError(result, f"{what}: {os.strerror(result)}")


class _SharedMutex:
    """A robust, process-shared pthread mutex at the start of a shared memory file.

    Mapped with libc's ``mmap`` rather than Python's, so that no garbage collection, not even
    at interpreter exit, can unmap it while it is locked (only ``close`` does).
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._libc = _libc()
        self._libc.mmap.restype = ctypes.c_void_p
        self._libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                                    ctypes.c_int, ctypes.c_long]
        address = self._libc.mmap(None, _SHARED_FILE_BYTES, mmap.PROT_READ | mmap.PROT_WRITE,
                                  mmap.MAP_SHARED, fd, 0)
        if address is None or address == ctypes.c_void_p(-1).value:
            raise OSError(ctypes.get_errno(), "mmap of the death watch's memory file failed")
        self.address: int = address

    @classmethod
    def create(cls) -> "_SharedMutex":
        """A new, unlocked mutex in a new memory file (close-on-exec; pass its ``fd`` on)."""
        fd = os.memfd_create("remus-deathwatch", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, _SHARED_FILE_BYTES)
            shared = cls(fd)
        except BaseException:
            os.close(fd)
            raise
        attr = ctypes.create_string_buffer(_ATTR_BYTES)
        libc = shared._libc
        try:
            _check("pthread_mutexattr_init", libc.pthread_mutexattr_init(attr))
            try:
                _check("pthread_mutexattr_setpshared", libc.pthread_mutexattr_setpshared(attr, _SHARED))
                _check("pthread_mutexattr_setrobust", libc.pthread_mutexattr_setrobust(attr, _ROBUST))
                _check("pthread_mutex_init", libc.pthread_mutex_init(ctypes.c_void_p(shared.address), attr))
            finally:
                libc.pthread_mutexattr_destroy(attr)
        except BaseException:
            shared.close()
            raise
        return shared

    def lock(self) -> int:
        """``pthread_mutex_lock``: 0, ``EOWNERDEAD`` (the owner died holding it) or an error."""
        return int(self._libc.pthread_mutex_lock(ctypes.c_void_p(self.address)))

    def unlock(self) -> int:
        return int(self._libc.pthread_mutex_unlock(ctypes.c_void_p(self.address)))

    def close(self) -> None:
        """Unmap and close; only for a mutex that no thread of this process holds."""
        self._libc.munmap(ctypes.c_void_p(self.address), ctypes.c_size_t(_SHARED_FILE_BYTES))
        os.close(self.fd)


class DeathWatch:
    """An armed watch: a helper process that shuts ``sock`` once this process's main thread exits."""

    def __init__(self, mutex: _SharedMutex, helper: subprocess.Popen[bytes]) -> None:
        self._mutex: Optional[_SharedMutex] = mutex  # locked by the main thread
        self.helper = helper

    def disarm(self) -> None:
        """Kill and reap the helper (its duplicate of the socket is closed once this returns).

        Call it before closing the socket.  On the main thread the mutex is unlocked and
        freed; elsewhere it stays locked and mapped until the process ends.
        """
        if self._mutex is None:
            return
        if self.helper.poll() is None:
            self.helper.kill()
        self.helper.wait()
        mutex, self._mutex = self._mutex, None
        if threading.current_thread() is threading.main_thread():
            mutex.unlock()
            mutex.close()
        else:
            _KEPT.append(mutex)  # still locked by its owner: never unmapped


def watch_death(sock: socket.socket) -> Optional[DeathWatch]:
    """Arm a death watch on ``sock`` (see the module docstring); None where it cannot be armed.

    Only the main thread arms: anything else returns None at once.  Failing to start the
    helper is logged and returns None (the connection then closes at exit, as it always did).
    """
    if threading.current_thread() is not threading.main_thread():
        return None
    try:
        mutex = _SharedMutex.create()
    except (OSError, AttributeError) as exc:
        log.debug("no death watch: %s", exc)
        return None
    try:
        _check("pthread_mutex_lock", mutex.lock())
    except OSError as exc:
        log.debug("no death watch: %s", exc)
        mutex.close()
        return None
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        helper = subprocess.Popen(
            [sys.executable, "-I", "-c", _HELPER, package_root, str(sock.fileno()), str(mutex.fd)],
            pass_fds=(sock.fileno(), mutex.fd), stdin=subprocess.DEVNULL)
    except OSError as exc:
        log.warning("the connection will close only once this process is torn down: "
                    "no death watch helper (%s)", exc)
        mutex.unlock()
        mutex.close()
        return None
    return DeathWatch(mutex, helper)


def _serve(sock_fd: int, mutex_fd: int) -> int:
    """The helper: wait for the mutex; shut the socket if its owner died; 0, or 1 on an error."""
    for number in (signal.SIGINT, signal.SIGHUP):
        signal.signal(number, signal.SIG_IGN)  # a Ctrl-C is the primary's to handle, not ours
    sock = socket.socket(fileno=sock_fd)
    mutex = _SharedMutex(mutex_fd)
    result = mutex.lock()
    if result == errno.EOWNERDEAD:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already shut or reset: the backup has its EOF either way
        return 0
    if result == 0:
        return 0  # unlocked by its owner: an orderly end (disarming kills us first anyway)
    print(f"remus-deathwatch: waiting for the primary failed: {os.strerror(result)}", file=sys.stderr)
    return 1


def main(argv: Sequence[str]) -> int:
    """The helper's entry: ``SOCKET_FD MUTEX_FD`` (started by ``watch_death`` only)."""
    if len(argv) != 2:
        print("usage: remus.deathwatch SOCKET_FD MUTEX_FD (started by remus itself)",
              file=sys.stderr)
        return 2
    return _serve(int(argv[0]), int(argv[1]))

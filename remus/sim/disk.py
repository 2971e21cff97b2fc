"""The simulated guest's disk: a writer process that is an NBD client of the primary's disk server.

``sim:NAME,disk=PATH[,disk_size=SIZE,disk_rate=W]`` gives the simulated
guest a raw disk image at PATH (created with ``disk_size`` bytes if
missing).  The primary serves it with ``remus.disk`` exactly as it serves a
Xen guest's disk, and the guest's "block driver" is a separate process
(``python -m remus.sim.disk SOCKET SEED RATE``) that writes ``W`` 4 KiB
blocks a second through NBD, one at a time, each waiting for its reply as a
synchronous writer does.  It is stopped (SIGSTOP) while the guest is
suspended and continued at resume, so a request can be in flight across a
suspend just as blkfront's are.

Block ``j`` written (j = 1, 2, ...) goes to block ``splitmix64(seed ^ j) %
blocks`` and holds ``j``, the seed and pseudo-random filler: the disk is a
deterministic function of the seed and the number of writes, and the last
write is always readable.

``NbdClient`` is the minimal client the writer needs (fixed newstyle, GO,
simple replies); it is also what the tests and the benchmark drive a server
with.  Nothing here records epochs: the server does.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from typing import TYPE_CHECKING, Any, Optional

from remus.disk.nbd import (
    IHAVEOPT,
    NBD_CMD_FLAG_FUA,
    NBD_SIMPLE_REPLY_MAGIC,
    NbdCmd,
    NbdOpt,
    NbdRep,
    request_bytes,
)
from remus.disk.device import DiskDevice
from remus.disk.epochs import RecordingImage
from remus.disk.server import ImageFile, NbdServer
from remus.errors import DiskError, RemoteProtocolError
from remus.sim.memory import splitmix64

if TYPE_CHECKING:
    from remus.sim.spec import SimSpec

BLOCK_SIZE = 4096
_BLOCK_HEAD = struct.Struct("<QQ")


class NbdClient:
    """A blocking NBD client for one export (fixed newstyle handshake, NBD_OPT_GO)."""

    def __init__(self, address: str | tuple[str, int], name: str = "", timeout_s: float = 30.0) -> None:
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(timeout_s)
        self.sock.connect(address)
        if family == socket.AF_INET:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._handle = 0
        self.size = self._handshake(name)

    def _recv(self, n: int) -> bytes:
        data = bytearray()
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise RemoteProtocolError("NBD server closed the connection")
            data += chunk
        return bytes(data)

    def _handshake(self, name: str) -> int:
        magic, opt_magic, _flags = struct.unpack(">QQH", self._recv(18))
        if opt_magic != IHAVEOPT:
            raise RemoteProtocolError("not a fixed-newstyle NBD server")
        raw = name.encode()
        payload = struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0)
        self.sock.sendall(struct.pack(">I", 3) + struct.pack(">QII", IHAVEOPT, NbdOpt.GO, len(payload)) + payload)
        size = -1
        while True:
            _m, _opt, rep, length = struct.unpack(">QIII", self._recv(20))
            data = self._recv(length)
            if rep == NbdRep.INFO and struct.unpack_from(">H", data)[0] == 0:
                size = struct.unpack_from(">Q", data, 2)[0]
            elif rep == NbdRep.ACK:
                return size
            elif rep & (1 << 31):
                raise RemoteProtocolError(f"NBD server refused export {name!r}: {data.decode(errors='replace')}")

    def _call(self, cmd: int, offset: int, length: int, flags: int = 0, data: bytes = b"") -> bytes:
        self._handle += 1
        self.sock.sendall(request_bytes(cmd, offset, length, handle=self._handle, flags=flags, data=data))
        magic, error, handle = struct.unpack(">IIQ", self._recv(16))
        if magic != NBD_SIMPLE_REPLY_MAGIC or handle != self._handle:
            raise RemoteProtocolError("NBD reply out of step")
        if error:
            raise DiskError(f"NBD {NbdCmd(cmd).name} at {offset} failed with error {error}")
        return self._recv(length) if cmd == NbdCmd.READ else b""

    def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        self._call(NbdCmd.WRITE, offset, len(data), NBD_CMD_FLAG_FUA if fua else 0, data)

    def read(self, offset: int, length: int) -> bytes:
        return self._call(NbdCmd.READ, offset, length)

    def flush(self) -> None:
        self._call(NbdCmd.FLUSH, 0, 0)

    def close(self) -> None:
        try:
            self.sock.sendall(request_bytes(NbdCmd.DISC, 0, 0))
        except OSError:
            pass
        self.sock.close()


def block_of(seed: int, j: int, blocks: int) -> tuple[int, bytes]:
    """(block index, contents) of the guest's ``j``-th disk write."""
    state, r = splitmix64((seed ^ j) & 0xFFFFFFFFFFFFFFFF)
    filler = bytearray()
    while len(filler) < BLOCK_SIZE - _BLOCK_HEAD.size:
        state, word = splitmix64(state)
        filler += word.to_bytes(8, "little")
    return r % blocks, _BLOCK_HEAD.pack(j, seed) + bytes(filler[: BLOCK_SIZE - _BLOCK_HEAD.size])


def expected_disk(seed: int, writes: int, size: int, initial: Optional[bytes] = None) -> bytes:
    """The disk after the guest's first ``writes`` writes (over ``initial``, zeros by default)."""
    disk = bytearray(initial if initial is not None else bytes(size))
    for j in range(1, writes + 1):
        block, data = block_of(seed, j, size // BLOCK_SIZE)
        disk[block * BLOCK_SIZE : (block + 1) * BLOCK_SIZE] = data
    return bytes(disk)


def writes_on(disk: bytes, seed: int) -> int:
    """How many writes the guest had made to ``disk`` (the highest ``j`` found in a block)."""
    last = 0
    for off in range(0, len(disk), BLOCK_SIZE):
        j, block_seed = _BLOCK_HEAD.unpack_from(disk, off)
        if block_seed == seed and j > last and block_of(seed, j, len(disk) // BLOCK_SIZE)[1] == disk[off : off + BLOCK_SIZE]:
            last = j
    return last


def run_writer(address: str, seed: int, rate: float) -> int:
    """The writer loop: ``rate`` blocks a second until the server goes away."""
    client = NbdClient(address)
    blocks = client.size // BLOCK_SIZE
    j = 0
    start = time.monotonic()
    try:
        while True:
            now = time.monotonic()
            if now - (start + j / rate) > 0.05:  # after a stop: go on at the rate, no burst
                start = now - j / rate
            delay = start + j / rate - now
            if delay > 0:
                time.sleep(min(delay, 0.5))
                continue
            j += 1
            block, data = block_of(seed, j, blocks)
            client.write(block * BLOCK_SIZE, data)
    except (OSError, RemoteProtocolError):
        return 0  # the host process (and its server) went away
    finally:
        client.sock.close()


PR_SET_PDEATHSIG = 1  # include/uapi/linux/prctl.h


def _die_with_parent() -> None:
    """SIGKILL us when the host process dies, even while we are stopped (SIGSTOP)."""
    import ctypes

    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # it died before prctl took effect
        os._exit(0)


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # remus stops us itself
    _die_with_parent()
    address, seed, rate = argv[0], int(argv[1]), float(argv[2])
    return run_writer(address, seed, rate)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


# --------------------------------------------------------------------------- the primary's side


def ensure_image(path: str, size: int) -> int:
    """Create the disk image with ``size`` bytes if it is missing; its size."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return os.path.getsize(path)
    except OSError as exc:
        raise DiskError(f"cannot create disk image {path}: {exc.strerror}") from None
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
    return size


def session_disks(spec: "SimSpec") -> dict[str, Any]:
    """What the session header says about the guest's disk (nothing without one)."""
    if spec.disk is None:
        return {}
    return {"disks": [{"path": spec.disk, "size": ensure_image(spec.disk, spec.disk_size)}]}


class SimDisk:
    """The primary's side of a simulated guest's disk: server, recorder, writer process."""

    def __init__(self, spec: "SimSpec") -> None:
        assert spec.disk is not None
        ensure_image(spec.disk, spec.disk_size)
        self.workdir = tempfile.mkdtemp(prefix="remus-simdisk-")
        self.image = ImageFile(spec.disk)
        self.target = RecordingImage(self.image)
        self.server = NbdServer(self.target, spec.name)
        self.proc: Optional[subprocess.Popen[bytes]] = None
        try:
            sock = self.server.listen_unix(os.path.join(self.workdir, "nbd.sock"))
            args = [sys.executable, "-m", "remus.sim.disk", sock, str(spec.seed), str(spec.disk_rate)]
            self.proc = subprocess.Popen(args, start_new_session=True, stdin=subprocess.DEVNULL)
        except BaseException:
            self.close()
            raise
        # Every checkpoint carries the disk's digest: the backup checks its replica against it.
        self.device = _StoppingDiskDevice(0, self.target, self.proc.pid)

    def close(self) -> None:
        proc = self.proc
        if proc is not None:
            for sig in (signal.SIGCONT, signal.SIGTERM):
                try:
                    proc.send_signal(sig)
                except ProcessLookupError:
                    pass
            proc.wait()
            self.proc = None
        self.server.close()
        self.image.close()
        shutil.rmtree(self.workdir, ignore_errors=True)


class _StoppingDiskDevice(DiskDevice):
    """The disk device, which also stops the writer process while the guest is suspended."""

    def __init__(self, index: int, target: RecordingImage, pid: int) -> None:
        super().__init__(index, target, digest=True)
        self.pid = pid

    def _signal(self, sig: int) -> None:
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass

    def postsuspend(self) -> None:
        self._signal(signal.SIGSTOP)
        super().postsuspend()

    def preresume(self) -> None:
        self._signal(signal.SIGCONT)

    def release(self) -> None:
        self._signal(signal.SIGCONT)
        super().release()

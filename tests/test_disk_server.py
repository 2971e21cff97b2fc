"""The NBD server against clients nobody here wrote: qemu-io (qemu-utils) and libnbd (python3-libnbd).

Each test starts its own server on a unix socket in its own directory, over
its own image file, and drives it with the external client as a subprocess.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import tempfile
import textwrap
from typing import Iterator

import pytest

from remus.disk.nbd import NBD_REQUEST_MAGIC, NbdCmd, request_bytes
from remus.disk.server import ImageFile, NbdServer

SIZE = 4 << 20
SYSTEM_PYTHON = "/usr/bin/python3"


class CountingImage(ImageFile):
    """An ImageFile that counts what reached stable storage."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.fua_writes = 0
        self.flushes = 0

    def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        super().write(offset, data, fua)
        self.fua_writes += fua

    def flush(self) -> None:
        super().flush()
        self.flushes += 1


@pytest.fixture
def served() -> Iterator[tuple[NbdServer, CountingImage, str]]:
    # unix socket paths are limited to 108 bytes: a short directory of our own
    workdir = tempfile.mkdtemp(prefix="nbd-")
    image_path = os.path.join(workdir, "disk.img")
    with open(image_path, "wb") as f:
        f.truncate(SIZE)
    image = CountingImage(image_path)
    server = NbdServer(image, "vm1")
    sock = server.listen_unix(os.path.join(workdir, "sock"))
    try:
        yield server, image, sock
    finally:
        server.close()
        image.close()
        shutil.rmtree(workdir)


def qemu_io(sock: str, *commands: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("qemu-io") is None:
        pytest.skip("qemu-io missing: apt-get install qemu-utils")
    args = ["qemu-io", "-f", "raw", f"nbd+unix:///vm1?socket={sock}"]
    for command in commands:
        args += ["-c", command]
    return subprocess.run(args, capture_output=True, text=True, timeout=60)


def libnbd(sock: str, body: str) -> subprocess.CompletedProcess[str]:
    probe = subprocess.run([SYSTEM_PYTHON, "-c", "import nbd"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("python3-libnbd missing: apt-get install python3-libnbd")
    script = "import nbd, sys\nh = nbd.NBD()\nh.set_export_name('vm1')\n"
    script += f"h.connect_unix({sock!r})\n" + textwrap.dedent(body)
    return subprocess.run([SYSTEM_PYTHON, "-c", script], capture_output=True, text=True, timeout=60)


def test_qemu_io_writes_reads_back_and_lands_in_the_image(served: tuple[NbdServer, CountingImage, str]) -> None:
    _server, image, sock = served
    result = qemu_io(sock, "write -P 0xab 4096 64k", "read -P 0xab 4096 64k", "read -P 0 0 4096", "flush")
    assert result.returncode == 0, result.stderr
    assert "Pattern verification failed" not in result.stdout
    with open(image.path, "rb") as f:
        data = f.read()
    assert data[4096 : 4096 + 65536] == b"\xab" * 65536
    assert data[:4096] == bytes(4096) and data[4096 + 65536 :] == bytes(SIZE - 4096 - 65536)
    assert image.flushes >= 1


def test_qemu_io_fua_write_is_synced(served: tuple[NbdServer, CountingImage, str]) -> None:
    _server, image, sock = served
    result = qemu_io(sock, "write -f -P 0x11 0 4k")
    assert result.returncode == 0, result.stderr
    assert image.fua_writes == 1


def test_qemu_img_sees_the_size(served: tuple[NbdServer, CountingImage, str]) -> None:
    _server, _image, sock = served
    if shutil.which("qemu-img") is None:
        pytest.skip("qemu-img missing: apt-get install qemu-utils")
    out = subprocess.run(["qemu-img", "info", "--output=json", f"nbd+unix:///vm1?socket={sock}"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert f'"virtual-size": {SIZE}' in out.stdout


def test_libnbd_round_trip_flags_and_errors(served: tuple[NbdServer, CountingImage, str]) -> None:
    _server, image, sock = served
    result = libnbd(sock, f"""
        assert h.get_size() == {SIZE}
        assert h.can_flush() and h.can_fua() and not h.is_read_only()
        h.pwrite(b"x" * 8192, 8192, nbd.CMD_FLAG_FUA)
        assert h.pread(8192, 8192) == b"x" * 8192
        h.flush()
        h.set_strict_mode(0)   # let the server, not libnbd, judge the bounds
        for call in (lambda: h.pread(4096, {SIZE} - 1024), lambda: h.pwrite(b"y" * 4096, {SIZE})):
            try:
                call()
            except nbd.Error as exc:
                print("refused", exc.errno)
            else:
                sys.exit("out-of-range request was served")
        assert h.pread(8192, 8192) == b"x" * 8192   # still serving after the errors
        h.shutdown()
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["refused EINVAL", "refused ENOSPC"]  # EINVAL, ENOSPC
    assert image.fua_writes == 1 and image.flushes >= 1


def test_libnbd_lists_and_refuses_an_unknown_export(served: tuple[NbdServer, CountingImage, str]) -> None:
    _server, _image, sock = served
    probe = subprocess.run([SYSTEM_PYTHON, "-c", "import nbd"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("python3-libnbd missing: apt-get install python3-libnbd")
    script = textwrap.dedent(f"""
        import nbd
        h = nbd.NBD()
        h.set_export_name("nope")
        try:
            h.connect_unix({sock!r})
        except nbd.Error:
            print("unknown export refused")
        h = nbd.NBD()
        h.set_opt_mode(True)
        h.connect_unix({sock!r})
        names = []
        h.opt_list(lambda name, desc: names.append(name) or 0)
        print("exports", names)
        h.opt_abort()
    """)
    out = subprocess.run([SYSTEM_PYTHON, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["unknown export refused", "exports ['vm1']"]


def raw_transmission(sock_path: str) -> socket.socket:
    """A hand-driven client that stops after a GO of export vm1 (to send what real clients never do)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(sock_path)
    sock.settimeout(10)
    greeting = recv_exact(sock, 18)
    assert greeting[:8] == b"NBDMAGIC"
    sock.sendall(struct.pack(">I", 3))
    payload = struct.pack(">I", 3) + b"vm1" + struct.pack(">H", 0)
    sock.sendall(struct.pack(">QII", 0x49484156454F5054, 7, len(payload)) + payload)
    while True:  # option replies until the ACK
        _magic, _opt, rep, length = struct.unpack(">QIII", recv_exact(sock, 20))
        recv_exact(sock, length)
        if rep == 1:
            return sock


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError(f"connection closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def reply_error(sock: socket.socket, handle: int) -> int:
    magic, error, got = struct.unpack(">IIQ", recv_exact(sock, 16))
    assert magic == 0x67446698 and got == handle
    return int(error)


def test_malformed_requests_get_error_replies_and_a_bad_magic_drops_only_that_client(
    served: tuple[NbdServer, CountingImage, str],
) -> None:
    server, _image, sock_path = served
    sock = raw_transmission(sock_path)
    sock.sendall(request_bytes(99, 0, 512, handle=1))  # unknown command
    assert reply_error(sock, 1) == 22
    sock.sendall(request_bytes(NbdCmd.READ, 0, 512, handle=2, flags=1 << 7))  # unknown flag
    assert reply_error(sock, 2) == 22
    sock.sendall(request_bytes(NbdCmd.FLUSH, 4096, 0, handle=3))  # FLUSH with an offset
    assert reply_error(sock, 3) == 22
    sock.sendall(request_bytes(NbdCmd.WRITE, SIZE - 1, 2, handle=4, data=b"zz"))  # past the end
    assert reply_error(sock, 4) == 28
    sock.sendall(request_bytes(NbdCmd.READ, 0, 0, handle=5))  # zero length
    assert reply_error(sock, 5) == 22
    sock.sendall(request_bytes(NbdCmd.READ, 0, 512, handle=6))  # and a good one still works
    assert reply_error(sock, 6) == 0 and recv_exact(sock, 512) == bytes(512)
    sock.sendall(struct.pack(">I", NBD_REQUEST_MAGIC ^ 1) + bytes(24))  # cannot be resynchronised
    assert sock.recv(16) == b""
    sock.close()
    assert server.dropped == 1
    result = qemu_io(sock_path, "write -P 0x5a 0 4k", "read -P 0x5a 0 4k")
    assert result.returncode == 0 and "verification failed" not in result.stdout

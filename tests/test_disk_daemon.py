"""The per-disk server process: started as the hotplug script starts it, driven by remus's
ControlledDisk over its control socket, written to by qemu-io; and its refusal without nbd."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from remus.disk.control import ControlledDisk, split_records
from remus.errors import DiskError
from remus.stream.codec import encode_record
from tests.test_transport import ROOT

SIZE = 1 << 20


def wait_for(path: str, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else proc.returncode
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def test_daemon_records_epochs_for_remus_while_a_client_writes() -> None:
    if shutil.which("qemu-io") is None:
        pytest.skip("qemu-io missing: apt-get install qemu-utils")
    work = tempfile.mkdtemp(prefix="rdisk-")
    image = os.path.join(work, "vm.img")
    with open(image, "wb") as f:
        f.truncate(SIZE)
    paths = {k: os.path.join(work, k) for k in ("control", "nbd", "ready")}
    proc = subprocess.Popen([sys.executable, "-m", "remus.disk.daemon", image, f"--control={paths['control']}",
                             f"--nbd-socket={paths['nbd']}", f"--ready-file={paths['ready']}"],
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), stderr=subprocess.PIPE)
    try:
        wait_for(paths["ready"], proc)
        assert Path(paths["ready"]).read_text() == paths["nbd"] + "\n"
        disk = ControlledDisk(0, paths["control"])
        assert disk.session_entry() == {"path": image, "size": SIZE}
        disk.install()
        disk.postsuspend()
        first = disk.records(1)
        assert sum(len(r.data) for r in first) == SIZE  # type: ignore[union-attr]
        qemu = subprocess.run(["qemu-io", "-f", "raw", f"nbd+unix:///?socket={paths['nbd']}",
                               "-c", "write -P 0x33 8192 4096"], capture_output=True, text=True, timeout=60)
        assert qemu.returncode == 0, qemu.stderr
        disk.postsuspend()
        second = disk.records(2)
        assert [(r.offset, r.data) for r in second] == [(8192, b"\x33" * 4096)]  # type: ignore[union-attr]
        assert split_records(b"".join(encode_record(r) for r in second)) == list(second)
        disk.release()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        shutil.rmtree(work)


def test_no_server_names_block_remus(tmp_path: Path) -> None:
    with pytest.raises(DiskError, match="script=block-remus"):
        ControlledDisk(0, str(tmp_path / "nothing.sock"))


@pytest.mark.skipif(os.path.exists("/sys/module/nbd"), reason="this host has the nbd module")
def test_kernel_mode_without_nbd_exits_1_naming_modprobe(tmp_path: Path) -> None:
    image = tmp_path / "vm.img"
    image.write_bytes(bytes(4096))
    out = subprocess.run([sys.executable, "-m", "remus.disk.daemon", str(image), f"--control={tmp_path}/c",
                          "--kernel"], env=dict(os.environ, PYTHONPATH=str(ROOT)),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert out.stderr.strip().endswith("modprobe nbd"), out.stderr


def test_controlled_disk_first_sync_uses_the_backups_hashes_and_eof_stops_recording(tmp_path: Path) -> None:
    import socket as socketlib
    import threading

    from remus.disk.control import serve_control
    from remus.disk.epochs import EXTENT_BYTES, RecordingImage, extent_hash, hash_records
    from remus.disk.server import ImageFile
    from remus.stream.records import DiskWrite

    image = tmp_path / "vm.img"
    image.write_bytes(b"\x09" * (3 * EXTENT_BYTES))
    target = RecordingImage(ImageFile(str(image)))
    listener = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
    listener.bind(str(tmp_path / "c.sock"))
    listener.listen(1)

    def serve() -> None:
        conn, _ = listener.accept()
        serve_control(conn, target)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    disk = ControlledDisk(1, str(tmp_path / "c.sock"))
    same = extent_hash(b"\x09" * EXTENT_BYTES)
    disk.peer_hashes = lambda: hash_records(1, [same, extent_hash(bytes(EXTENT_BYTES)), same]) + \
        hash_records(0, [b"z" * 16])  # another disk's hashes are not this one's
    disk.install()
    disk.postsuspend()
    sent = disk.records(1)
    assert [(r.disk, r.offset) for r in sent if isinstance(r, DiskWrite)] == [(1, EXTENT_BYTES)]
    assert target.log.protecting
    disk.sock.close()  # remus went away without X
    thread.join(timeout=10)
    assert not target.log.protecting
    listener.close()
    target.image.close()

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

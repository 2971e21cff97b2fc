"""hotplug/block-remus with a fake xenstore (xenstore-read/-write logging to a file) and a fake or
real disk server; shellcheck-clean."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_transport import ROOT

SCRIPT = ROOT / "hotplug" / "block-remus"
XENBUS = "backend/vbd/7/51712"


def fake_env(tmp: Path, python: str) -> dict[str, str]:
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    store = tmp / "store"
    (bin_dir / "xenstore-read").write_text(
        f'#!/bin/bash\ngrep -m1 "^$1=" {store} | cut -d= -f2-\n')
    (bin_dir / "xenstore-write").write_text(
        f'#!/bin/bash\nwhile [ $# -ge 2 ]; do echo "$1=$2" >> {store}; shift 2; done\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", XENBUS_PATH=XENBUS,
                REMUS_DISK_RUN_DIR=str(tmp / "run"), REMUS_PYTHON=python, REMUS_DISK_WAIT_S="20",
                PYTHONPATH=str(ROOT))


def store_of(tmp: Path) -> dict[str, str]:
    lines = (tmp / "store").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines)


def fake_server(tmp: Path) -> str:
    """Stands in for 'python3 -m remus.disk.daemon IMAGE ... --ready-file=F': reports /dev/null."""
    path = tmp / "fake-python"
    path.write_text('#!/bin/bash\nfor a in "$@"; do case $a in --ready-file=*) echo /dev/null > "${a#*=}";; '
                    'esac; done\ntrap "echo stopped > ' + str(tmp / "stopped") + '; exit 0" TERM\n'
                    'while :; do sleep 0.05; done\n')
    path.chmod(0o755)
    return str(path)


def test_shellcheck_clean() -> None:
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck missing: apt-get install shellcheck")
    out = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


def test_add_writes_the_device_as_block_common_does_and_remove_stops_the_server(tmp_path: Path) -> None:
    image = tmp_path / "vm1.img"
    image.write_bytes(bytes(4096))
    env = fake_env(tmp_path, fake_server(tmp_path))
    (tmp_path / "store").write_text(f"{XENBUS}/params={image}\n")
    add = subprocess.run([str(SCRIPT), "add"], env=env, capture_output=True, text=True, timeout=60)
    assert add.returncode == 0, add.stderr
    store = store_of(tmp_path)
    st = os.stat("/dev/null")
    assert store[f"{XENBUS}/physical-device"] == f"{os.major(st.st_rdev):x}:{os.minor(st.st_rdev):x}"
    assert store[f"{XENBUS}/physical-device-path"] == "/dev/null"
    assert store[f"{XENBUS}/hotplug-status"] == "connected"
    assert (tmp_path / "run" / "7-51712.pid").exists()
    remove = subprocess.run([str(SCRIPT), "remove"], env=env, capture_output=True, text=True, timeout=60)
    assert remove.returncode == 0, remove.stderr
    deadline = time.monotonic() + 20
    while not (tmp_path / "stopped").exists():
        assert time.monotonic() < deadline, "the server was not stopped"
        time.sleep(0.05)
    assert not (tmp_path / "run" / "7-51712.pid").exists()


@pytest.mark.skipif(os.path.exists("/sys/module/nbd"), reason="this host has the nbd module")
def test_add_with_the_real_server_and_no_nbd_module_reports_the_error_to_xenstore(tmp_path: Path) -> None:
    image = tmp_path / "vm1.img"
    image.write_bytes(bytes(4096))
    env = fake_env(tmp_path, sys.executable)
    (tmp_path / "store").write_text(f"{XENBUS}/params={image}\n")
    add = subprocess.run([str(SCRIPT), "add"], env=env, capture_output=True, text=True, timeout=60)
    assert add.returncode == 1
    store = store_of(tmp_path)
    assert store[f"{XENBUS}/hotplug-status"] == "error"
    assert store[f"{XENBUS}/hotplug-error"].endswith("modprobe nbd"), store


def test_a_missing_image_is_an_error(tmp_path: Path) -> None:
    env = fake_env(tmp_path, fake_server(tmp_path))
    (tmp_path / "store").write_text(f"{XENBUS}/params={tmp_path}/nope.img\n")
    add = subprocess.run([str(SCRIPT), "add"], env=env, capture_output=True, text=True, timeout=60)
    assert add.returncode == 1 and "does not exist" in store_of(tmp_path)[f"{XENBUS}/hotplug-error"]

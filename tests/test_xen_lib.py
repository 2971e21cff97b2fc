"""The checked-call pattern and the one clear XenUnavailable, without Xen."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import remus.xen.lib as xenlib
from remus.cli import main
from remus.errors import XenError, XenUnavailable
from tests.helpers import write_key_file

ROOT = Path(__file__).resolve().parent.parent


def test_check_passes_results_through() -> None:
    assert xenlib.check(0, "xc_domain_pause", 0) == 0
    assert xenlib.check(7, "xenevtchn_pending", 0) == 7


def test_check_raises_with_op_code_and_errno() -> None:
    with pytest.raises(XenError) as info:
        xenlib.check(-1, "xc_domain_resume", errno.ESRCH)
    exc = info.value
    assert (exc.op, exc.code, exc.errno) == ("xc_domain_resume", -1, errno.ESRCH)
    assert str(exc) == "xc_domain_resume failed (rc=-1, errno=3 No such process)"


class FakeFFI:
    NULL = None
    errno = errno.EACCES


def test_binding_checks_read_the_calls_errno() -> None:
    b = xenlib.Binding(FakeFFI(), SimpleNamespace())
    assert b.check(3, "xs_fileno") == 3
    assert b.check_ptr("handle", "xs_open") == "handle"
    b.check_true(True, "xs_write")
    with pytest.raises(XenError, match=r"xs_open failed \(rc=0, errno=13"):
        b.check_ptr(None, "xs_open")
    with pytest.raises(XenError, match=r"xs_write failed"):
        b.check_true(False, "xs_write")
    with pytest.raises(XenError) as info:
        b.check(-1, "xc_interface_open")
    assert info.value.errno == errno.EACCES


@pytest.fixture
def no_binding_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(xenlib, "_binding", None)


def test_no_xen_host_is_one_clear_error(no_binding_loaded: None, monkeypatch: pytest.MonkeyPatch,
                                        tmp_path: Path) -> None:
    monkeypatch.setattr(xenlib, "PRIVCMD", str(tmp_path / "privcmd"))
    monkeypatch.setattr(xenlib, "_import_binding", lambda: (None, "BINDING MISSING: install libxen-dev"))
    with pytest.raises(XenUnavailable) as info:
        xenlib.load()
    message = str(info.value)
    assert message.startswith("cannot use Xen here: ")
    assert f"{tmp_path / 'privcmd'} is missing: run remus in dom0 of a Xen host" in message
    assert "BINDING MISSING" in message
    assert "\n" not in message


def test_not_root_is_named(no_binding_loaded: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    privcmd = tmp_path / "privcmd"
    privcmd.touch()
    monkeypatch.setattr(xenlib.os, "geteuid", lambda: 1000)
    assert xenlib.problems(str(privcmd)) == ["Xen's control interfaces need root: run remus as root"]


def test_a_missing_binding_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> None:
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    monkeypatch.setattr(xenlib.importlib, "import_module", missing)
    binding, trouble = xenlib._import_binding()
    assert binding is None
    assert trouble is not None and "libxen-dev" in trouble and "reinstall remus" in trouble


def test_missing_libraries_say_how_to_get_them(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(name: str) -> None:
        raise ImportError("libxenguest.so.4.17: cannot open shared object file: No such file or directory")

    monkeypatch.setattr(xenlib.importlib, "import_module", broken)
    _, trouble = xenlib._import_binding()
    assert trouble is not None and "libxenguest.so.4.17" in trouble and "xen-utils-4.17" in trouble


def test_remus_on_a_machine_without_xen(no_binding_loaded: None, monkeypatch: pytest.MonkeyPatch,
                                        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(xenlib, "PRIVCMD", str(tmp_path / "privcmd"))
    assert main(["--blackhole", "somedomain"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith("remus: cannot open Xen domain 'somedomain': ")
    assert "run remus in dom0 of a Xen host" in err


@pytest.mark.skipif(Path(xenlib.PRIVCMD).exists(), reason="this host runs Xen")
def test_the_command_itself_fails_clearly_without_xen(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "bin" / "remus"), "--key-file", write_key_file(tmp_path),
                           "somedomain"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.startswith("remus: cannot open Xen domain 'somedomain': /dev/xen/privcmd is missing")
    assert proc.stderr.count("\n") == 1


def test_importing_remus_loads_no_xen_library() -> None:
    code = ("import sys, remus, remus.cli, remus.domain, remus.xen, remus.engine; "
            "print(any(m.startswith('remus.xen.') for m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "False", proc.stderr


def test_libxc_messages_map_to_logging_levels() -> None:
    import logging

    lib = SimpleNamespace(XTL_INFO=5, XTL_WARN=7, XTL_ERROR=8)
    assert xenlib.xtl_to_logging(lib, 8, errno.EIO, "Failed to enable logdirty") == logging.ERROR
    assert xenlib.xtl_to_logging(lib, 9, 0, "anything critical") == logging.ERROR
    # remus ending the save on purpose makes libxc say this at error level; it is not an error
    assert xenlib.xtl_to_logging(lib, 8, -1, "Save failed (0 = Success): Internal error") == logging.DEBUG
    assert xenlib.xtl_to_logging(lib, 8, -1, "Save failed (5 = Input/output error)") == logging.ERROR
    assert xenlib.xtl_to_logging(lib, 7, 0, "a warning") == logging.WARNING
    assert xenlib.xtl_to_logging(lib, 5, 0, "Saving domain 3, type x86 PV") == logging.DEBUG

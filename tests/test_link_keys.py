"""The link key file: every refusal of ``load_key`` and the safety of ``write_key_file``."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from remus.errors import KeyFileError, RemusError
from remus.link import keys
from remus.link.keys import MAX_KEY_BYTES, MIN_KEY_BYTES, NEW_KEY_BYTES, load_key, write_key_file

IS_ROOT = os.geteuid() == 0


def make_key(path: Path, data: bytes = b"k" * 64, mode: int = 0o600) -> Path:
    path.write_bytes(data)
    os.chmod(path, mode)
    return path


def refusal(path: Path) -> str:
    with pytest.raises(KeyFileError) as info:
        load_key(str(path))
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    return message


# --------------------------------------------------------------------------- load_key


def test_key_file_error_is_a_remus_error() -> None:
    assert issubclass(KeyFileError, RemusError)


def test_a_good_key_file_is_read_whole(tmp_path: Path) -> None:
    data = os.urandom(64)
    assert load_key(str(make_key(tmp_path / "authkey", data))) == data


@pytest.mark.parametrize("size", [MIN_KEY_BYTES, MAX_KEY_BYTES])
def test_the_size_bounds_are_inclusive(tmp_path: Path, size: int) -> None:
    assert len(load_key(str(make_key(tmp_path / "k", b"x" * size)))) == size


def test_a_missing_file_names_remus_keygen(tmp_path: Path) -> None:
    message = refusal(tmp_path / "nope")
    assert "does not exist" in message and "remus-keygen" in message and "scp -p" in message


@pytest.mark.parametrize("size", [0, 1, MIN_KEY_BYTES - 1])
def test_a_short_file_is_refused(tmp_path: Path, size: int) -> None:
    message = refusal(make_key(tmp_path / "k", b"x" * size))
    assert f"{size} bytes" in message and "256 bits" in message and "remus-keygen" in message


def test_a_file_too_large_to_be_a_key_is_refused(tmp_path: Path) -> None:
    message = refusal(make_key(tmp_path / "k", b"x" * (MAX_KEY_BYTES + 1)))
    assert "not a key" in message and "remus-keygen" in message


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o602, 0o610, 0o601, 0o644, 0o666, 0o700 | 0o077])
def test_a_file_open_to_group_or_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = make_key(tmp_path / "k", mode=mode)
    message = refusal(path)
    assert f"mode {mode:04o}" in message and f"chmod 600 {path}" in message


@pytest.mark.parametrize("mode", [0o400, 0o600, 0o700])
def test_owner_only_modes_are_accepted(tmp_path: Path, mode: int) -> None:
    assert load_key(str(make_key(tmp_path / "k", mode=mode))) == b"k" * 64


def test_a_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir(mode=0o700)
    assert "not a regular file" in refusal(tmp_path / "d")


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo", 0o600)
    assert "not a regular file" in refusal(tmp_path / "fifo")


def test_a_device_is_refused() -> None:
    assert "not a regular file" in refusal(Path("/dev/null"))


def test_a_symlink_to_a_good_file_is_followed_and_checked(tmp_path: Path) -> None:
    target = make_key(tmp_path / "real", b"s" * 40)
    (tmp_path / "link").symlink_to(target)
    assert load_key(str(tmp_path / "link")) == b"s" * 40
    os.chmod(target, 0o644)
    assert "chmod 600" in refusal(tmp_path / "link")


@pytest.mark.skipif(not IS_ROOT, reason="only root can give a file to another user")
def test_a_file_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    path = make_key(tmp_path / "k")
    os.chown(path, 12345, -1)
    message = refusal(path)
    assert "uid 12345" in message and "chown" in message


def test_an_unreadable_file_says_permission_denied(tmp_path: Path) -> None:
    """Really unreadable: read by an unprivileged child process (or by this user, if not root)."""
    path = make_key(tmp_path / "k")
    if not IS_ROOT:
        os.chmod(path, 0o000)
        assert "permission denied" in refusal(path)
        return
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to nobody, try, report, and leave at once
        status = 1
        try:
            os.close(read_end)
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            try:
                load_key(str(path))
                os.write(write_end, b"read it")
            except KeyFileError as exc:
                os.write(write_end, str(exc).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        message = pipe.read().decode()
    _pid, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert "permission denied" in message and str(path) in message


def test_other_open_errors_are_one_line(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    message = refusal(tmp_path / "file" / "key")  # ENOTDIR
    assert "cannot open key file" in message


# --------------------------------------------------------------------------- write_key_file


def test_a_new_key_is_random_owner_only_and_loads(tmp_path: Path) -> None:
    path = tmp_path / "authkey"
    write_key_file(str(path))
    info = path.stat()
    assert stat.S_IMODE(info.st_mode) == 0o600 and stat.S_ISREG(info.st_mode)
    assert info.st_uid == os.geteuid()
    first = load_key(str(path))
    assert len(first) == NEW_KEY_BYTES
    write_key_file(str(path), force=True)
    assert load_key(str(path)) != first


def test_the_mode_does_not_depend_on_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        write_key_file(str(tmp_path / "new" / "authkey"))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "new" / "authkey").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o700


def test_a_missing_parent_is_made_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "remus" / "authkey"
    write_key_file(str(path))
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert len(load_key(str(path))) == NEW_KEY_BYTES


def test_an_existing_key_is_kept_without_force(tmp_path: Path) -> None:
    path = make_key(tmp_path / "authkey", b"old" * 20)
    with pytest.raises(KeyFileError) as info:
        write_key_file(str(path))
    message = str(info.value)
    assert "already exists" in message and "--force" in message and str(path) in message
    assert path.read_bytes() == b"old" * 20
    assert sorted(os.listdir(tmp_path)) == ["authkey"]


def test_force_replaces_even_an_open_key_with_an_owner_only_one(tmp_path: Path) -> None:
    path = make_key(tmp_path / "authkey", b"old" * 20, mode=0o644)
    write_key_file(str(path), force=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes() != b"old" * 20
    assert sorted(os.listdir(tmp_path)) == ["authkey"]


def test_a_dangling_symlink_counts_as_existing(tmp_path: Path) -> None:
    (tmp_path / "authkey").symlink_to(tmp_path / "nowhere")
    with pytest.raises(KeyFileError, match="already exists"):
        write_key_file(str(tmp_path / "authkey"))
    assert not (tmp_path / "nowhere").exists()


def test_a_directory_is_never_a_key_file(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    with pytest.raises(KeyFileError, match="is a directory"):
        write_key_file(str(tmp_path / "d"), force=True)


def test_a_file_appearing_during_the_write_is_not_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The final step is a hard link, which never replaces: a racing writer's file survives."""
    path = tmp_path / "authkey"
    real_mkstemp = keys.tempfile.mkstemp

    def mkstemp_then_race(**kwargs: str) -> tuple[int, str]:
        made = real_mkstemp(**kwargs)
        make_key(path, b"racer" * 10)
        return made

    monkeypatch.setattr(keys.tempfile, "mkstemp", mkstemp_then_race)
    with pytest.raises(KeyFileError, match="already exists"):
        write_key_file(str(path))
    assert path.read_bytes() == b"racer" * 10
    assert sorted(os.listdir(tmp_path)) == ["authkey"]


def test_a_failed_write_leaves_no_partial_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = make_key(tmp_path / "authkey", b"old" * 20)

    def no_space(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(keys.os, "fsync", no_space)
    with pytest.raises(KeyFileError) as info:
        write_key_file(str(path), force=True)
    assert str(info.value) == f"cannot write key file {path}: No space left on device"
    assert path.read_bytes() == b"old" * 20
    assert sorted(os.listdir(tmp_path)) == ["authkey"]
    with pytest.raises(KeyFileError):
        write_key_file(str(tmp_path / "fresh"))
    assert not (tmp_path / "fresh").exists()


def test_an_unwritable_place_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(KeyFileError) as info:
        write_key_file(str(tmp_path / "file" / "authkey"))
    assert str(info.value).startswith(f"cannot write key file {tmp_path / 'file' / 'authkey'}: ")
    assert "\n" not in str(info.value)

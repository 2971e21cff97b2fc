"""The link key: one shared secret file per pair of hosts, read and written safely.

Like corosync's ``/etc/corosync/authkey``, the key is a file of raw random
bytes that both hosts hold, readable by its owner only.  ``load_key`` refuses
any file that could have been read or replaced by someone else (a group or
world permission bit, an owner other than this user or root, not a regular
file) and any file too short to be a key.  ``write_key_file`` makes a new key
atomically: the file appears whole, with mode 0600, or not at all.

This module never prints and never logs the key; it only reads and writes
files.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
import tempfile

from remus.errors import KeyFileError

#: Where ``remus``, ``remus-receiver`` and ``remus-keygen`` look by default.
DEFAULT_KEY_FILE = "/etc/remus/authkey"
#: The shortest key accepted: 256 bits.
MIN_KEY_BYTES = 32
#: The longest file read as a key (corosync's authkey bound): anything larger is not a key.
MAX_KEY_BYTES = 4096
#: What ``write_key_file`` writes: 512 random bits.
NEW_KEY_BYTES = 64

_FIX_NEW = "make one with remus-keygen and copy it to the other host with scp -p"


def load_key(path: str) -> bytes:
    """The key in ``path``: its raw bytes, checked before use.

    The file must be a regular file of ``MIN_KEY_BYTES`` to ``MAX_KEY_BYTES``
    bytes, owned by this user or root, with no group or other permission bits.
    The checks are made on the opened file, so it cannot be swapped between
    check and read.

    Raises:
        KeyFileError: a one-line reason naming ``path`` and the fix.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:
        raise _open_error(path, exc) from None
    try:
        info = os.fstat(fd)
        _check_file(path, info)
        data = _read_at_most(fd, MAX_KEY_BYTES + 1)
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_KEY_BYTES:
        raise KeyFileError(f"key file {path} is larger than {MAX_KEY_BYTES} bytes, not a key: {_FIX_NEW}")
    if len(data) < MIN_KEY_BYTES:
        raise KeyFileError(
            f"key file {path} holds {len(data)} bytes, fewer than the {MIN_KEY_BYTES} (256 bits) a key needs: "
            f"{_FIX_NEW}"
        )
    return data


def write_key_file(path: str, *, force: bool = False) -> None:
    """Write a new random key of ``NEW_KEY_BYTES`` bytes to ``path``, mode 0600.

    The key is written to a temporary file in the same directory, synced, and
    then linked into place (or, with ``force``, renamed over the old file), so
    ``path`` never holds a partial key.  A missing parent directory is created
    with mode 0700.  Run as root, the file is owned by root.

    Raises:
        KeyFileError: ``path`` exists and ``force`` is false, or the file
            could not be written (the message names it and the reason).
    """
    if os.path.isdir(path):
        raise KeyFileError(f"key file {path} is a directory: name a file with --key-file")
    if os.path.lexists(path) and not force:
        raise KeyFileError(_exists_message(path))
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, mode=0o700, exist_ok=True)
        _write_atomically(path, parent, secrets.token_bytes(NEW_KEY_BYTES), force)
    except OSError as exc:
        raise KeyFileError(f"cannot write key file {path}: {exc.strerror or exc}") from None


# --------------------------------------------------------------------------- helpers


def _open_error(path: str, exc: OSError) -> KeyFileError:
    if exc.errno == errno.ENOENT:
        return KeyFileError(f"key file {path} does not exist: {_FIX_NEW}")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return KeyFileError(f"cannot read key file {path}: permission denied (run as root, or give --key-file)")
    return KeyFileError(f"cannot open key file {path}: {exc.strerror or exc}")


def _check_file(path: str, info: os.stat_result) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise KeyFileError(f"key file {path} is not a regular file: {_FIX_NEW}")
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise KeyFileError(
            f"key file {path} is open to group or others (mode {mode:04o}): chmod 600 {path}"
        )
    if info.st_uid not in (os.geteuid(), 0):
        raise KeyFileError(
            f"key file {path} is owned by uid {info.st_uid}, not by this user or root: chown it, then chmod 600"
        )


def _read_at_most(fd: int, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = os.read(fd, limit - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _exists_message(path: str) -> str:
    return (
        f"key file {path} already exists: keep it, or replace it with --force "
        f"(then copy the new key to the other host)"
    )


def _write_atomically(path: str, parent: str, key: bytes, force: bool) -> None:
    fd, temp = tempfile.mkstemp(prefix=".authkey.", dir=parent)  # mode 0600, O_EXCL
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(key)
            out.flush()
            os.fsync(out.fileno())
        if force:
            os.replace(temp, path)
        else:
            try:
                os.link(temp, path)  # never replaces a file that appeared meanwhile
            except FileExistsError:
                raise KeyFileError(_exists_message(path)) from None
            os.unlink(temp)
    except BaseException:
        if os.path.lexists(temp):
            os.unlink(temp)
        raise
    _sync_directory(parent)


def _sync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

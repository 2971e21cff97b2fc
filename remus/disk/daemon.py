"""The per-disk server process the ``block-remus`` hotplug script starts.

Usage::

    python3 -m remus.disk.daemon IMAGE --control=SOCK (--kernel | --nbd-socket=SOCK)
                                 [--ready-file=FILE] [--index=N]

It opens the raw image IMAGE, serves it through NBD to the kernel
(``--kernel``: ``/dev/nbdN`` via NBD_CMD_CONNECT, which needs root and the
``nbd`` module) or on a unix socket (``--nbd-socket``, for tests and for
user-space clients), and answers ``remus`` on the control socket
(``remus.disk.control``).  Once serving it writes the device path
(``/dev/nbdN``, or the NBD socket's path) to ``--ready-file`` (renamed into
place, so a reader never sees half of it) and runs until SIGTERM or SIGINT;
then it flushes the image, detaches the device and exits 0.  Exit status 1
with one line on stderr when it cannot start (the line names the remedy).
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import threading
from typing import Optional

from remus.clock import StopFlag
from remus.disk.control import serve_control
from remus.disk.epochs import RecordingImage
from remus.disk.server import ImageFile, NbdServer
from remus.errors import RemusError
from remus.signals import stop_on_signals

log = logging.getLogger(__name__)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="remus.disk.daemon", description="serve one replicated disk")
    parser.add_argument("image")
    parser.add_argument("--control", required=True, help="control socket remus connects to")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--kernel", action="store_true", help="attach /dev/nbdN (root, nbd module)")
    where.add_argument("--nbd-socket", help="serve NBD on this unix socket instead")
    parser.add_argument("--ready-file", help="write the device path here once serving")
    parser.add_argument("--index", type=int, help="the N of /dev/nbdN (default: a free one)")
    return parser.parse_args(argv)


def _write_ready(path: Optional[str], device: str) -> None:
    if path is None:
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(device + "\n")
    os.replace(tmp, path)


PR_SET_IO_FLUSHER = 57  # include/uapi/linux/prctl.h (Linux 5.6)


def _io_flusher() -> None:
    """Mark this process as an I/O flusher: its own allocations must not wait on the writeback
    of the device it serves (a block server that can deadlock on itself otherwise)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) != 0:
        log.warning("PR_SET_IO_FLUSHER failed (errno %d): memory pressure could stall this disk",
                    ctypes.get_errno())


def run(args: argparse.Namespace, stop: StopFlag) -> int:
    """Serve until ``stop`` is set; the exit status."""
    image = ImageFile(args.image)
    target = RecordingImage(image)
    server = NbdServer(target, os.path.basename(args.image))
    control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    netlink = None
    index: Optional[int] = None
    try:
        if os.path.exists(args.control):
            os.unlink(args.control)
        control.bind(args.control)
        control.listen(2)
        if args.kernel:
            from remus.disk.kernel import NbdNetlink, attach

            netlink = NbdNetlink()
            _io_flusher()
            index = attach(server, netlink, args.index)
            device = f"/dev/nbd{index}"
        else:
            device = server.listen_unix(args.nbd_socket)
        threading.Thread(target=_accept_control, args=(control, target), daemon=True).start()
        _write_ready(args.ready_file, device)
        log.info("serving %s as %s", args.image, device)
        while not stop.wait(3600.0):
            pass
        return 0
    finally:
        control.close()
        try:
            os.unlink(args.control)
        except OSError:
            pass
        if netlink is not None:
            if index is not None:
                try:
                    netlink.disconnect(index)
                except RemusError as exc:
                    log.error("%s", exc)
            netlink.close()
        server.close()
        image.flush()
        image.close()


def _accept_control(control: socket.socket, target: RecordingImage) -> None:
    while True:
        try:
            conn, _ = control.accept()
        except OSError:
            return
        threading.Thread(target=serve_control, args=(conn, target), daemon=True).start()


def main(argv: Optional[list[str]] = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="remus-disk: %(message)s")
    stop = StopFlag()
    try:
        with stop_on_signals(stop):  # a handler that took a lock could deadlock on a second signal
            return run(args, stop)
    except (RemusError, OSError) as exc:
        print(f"remus-disk: {args.image}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

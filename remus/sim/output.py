"""The simulated guest's network output, and the buffer that holds it per epoch.

``PlugQueue`` behaves like the kernel's ``sch_plug`` qdisc as Remus drives it:
``plug`` (TCQ_PLUG_BUFFER) closes the current epoch, ``release_one``
(TCQ_PLUG_RELEASE_ONE) lets the oldest closed epoch out, ``release_all``
(TCQ_PLUG_RELEASE_INDEFINITE) lets everything out and passes later packets
straight through.  It starts plugged, as sch_plug does.  Packets beyond
``limit`` held packets are dropped and counted, as sch_plug drops beyond its
byte limit.

``GuestNic`` moves the guest's packets from its pipe into the queue (a reader
thread, plus a synchronous ``drain`` used at postsuspend so that every packet
sent before the suspend lands in the epoch the suspend closes).  ``PacketSink``
appends released packets to the ``output=`` file, one line each, counter
first.  ``SimOutputBuffer`` is the engine-facing checkpointed device.
"""

from __future__ import annotations

import collections
import errno
import os
import select
import threading
from typing import Callable, Deque, List, Optional, TextIO

from remus.errors import DomainError

DEFAULT_LIMIT_PACKETS = 1_000_000


class PacketSink:
    """Where released packets go: counted, and appended to a file if one is given.

    Each line is ``COUNTER NAME ROLE``; the file is flushed after every
    delivery so an outside reader sees exactly what was released.
    """

    def __init__(self, path: Optional[str], name: str, role: str) -> None:
        """Raises:
            DomainError: the output file cannot be opened for appending.
        """
        self.path = path
        self.name = name
        self.role = role
        self.delivered = 0
        self.highest = 0
        try:
            self._file: Optional[TextIO] = open(path, "a", encoding="ascii") if path else None
        except OSError as exc:
            raise DomainError(f"sim:{name}: cannot open its output file {path}: {exc.strerror or exc}") from None

    def deliver(self, counters: List[int]) -> None:
        if not counters:
            return
        self.delivered += len(counters)
        self.highest = max(self.highest, max(counters))
        if self._file is not None:
            self._file.write("".join(f"{c} {self.name} {self.role}\n" for c in counters))
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class PlugQueue:
    """sch_plug semantics over whole packets (see the module docstring)."""

    def __init__(self, deliver: Callable[[List[int]], None], limit: int = DEFAULT_LIMIT_PACKETS) -> None:
        self._deliver = deliver
        self._epochs: Deque[List[int]] = collections.deque([[]])
        self._held = 0
        self._pass_through = False
        self.limit = limit
        self.dropped = 0
        self.lock = threading.RLock()

    @property
    def held(self) -> int:
        """Packets currently held back."""
        return self._held

    @property
    def passing(self) -> bool:
        return self._pass_through

    def enqueue(self, counters: List[int]) -> None:
        with self.lock:
            if self._pass_through:
                self._deliver(counters)
                return
            room = max(0, self.limit - self._held)
            if len(counters) > room:
                self.dropped += len(counters) - room
                counters = counters[:room]
            self._epochs[-1].extend(counters)
            self._held += len(counters)

    def plug(self) -> None:
        """TCQ_PLUG_BUFFER: later packets belong to a new epoch; stop passing through."""
        with self.lock:
            self._pass_through = False
            self._epochs.append([])

    def release_one(self) -> None:
        """TCQ_PLUG_RELEASE_ONE: deliver the oldest closed epoch."""
        with self.lock:
            if len(self._epochs) > 1:
                epoch = self._epochs.popleft()
                self._held -= len(epoch)
                self._deliver(epoch)

    def release_all(self) -> None:
        """TCQ_PLUG_RELEASE_INDEFINITE: deliver everything and pass later packets through."""
        with self.lock:
            self._pass_through = True
            while self._epochs:
                epoch = self._epochs.popleft()
                self._deliver(epoch)
            self._epochs.append([])
            self._held = 0


class GuestNic:
    """Reads ``COUNTER\\n`` lines from the guest's pipe into a ``PlugQueue``."""

    def __init__(self, fd: int, queue: PlugQueue) -> None:
        self.fd = fd
        self.queue = queue
        self._rest = b""
        self._stop = threading.Event()
        os.set_blocking(fd, False)
        self._thread = threading.Thread(target=self._run, name="sim-nic", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def drain(self) -> None:
        """Move every byte now in the pipe into the queue (call with the guest stopped)."""
        with self.queue.lock:
            self._read_available()

    def _read_available(self) -> bool:
        """Read what is there; False on EOF."""
        while True:
            try:
                data = os.read(self.fd, 65536)
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                    return True
                raise
            if not data:
                return False
            lines = (self._rest + data).split(b"\n")
            self._rest = lines.pop()
            self.queue.enqueue([int(line) for line in lines if line])

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                readable, _, _ = select.select([self.fd], [], [], 0.2)
            except (OSError, ValueError):
                return
            if readable:
                with self.queue.lock:
                    try:
                        if not self._read_available():
                            return
                    except OSError:
                        return

    def stop(self) -> None:
        """Stop the reader thread after a last drain."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)
        try:
            self.drain()
        except OSError:
            pass


class SimOutputBuffer:
    """The engine's checkpointed device for a simulated guest's output."""

    def __init__(self, queue: PlugQueue, nic: GuestNic, buffering: bool) -> None:
        self.queue = queue
        self.nic = nic
        self.buffering = buffering

    @property
    def name(self) -> str:
        return "sim-output" if self.buffering else "sim-output (unbuffered, --no-net)"

    def install(self) -> None:
        if not self.buffering:
            self.queue.release_all()

    def postsuspend(self) -> None:
        if self.buffering:
            self.nic.drain()
            self.queue.plug()

    def preresume(self) -> None:
        pass

    def commit(self) -> None:
        if self.buffering:
            self.queue.release_one()

    def release(self) -> None:
        self.queue.release_all()

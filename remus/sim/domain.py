"""The built-in simulated domain: a real guest process the engine checkpoints like a VM.

``SimulatedDomain`` starts the guest process (``remus.sim.guest``) over a
shared memory file, suspends it through its doorbell (it really stops: it
blocks in ``read`` until resumed), captures the dirty pages and the vCPU block
while it is stopped, and resumes it.  Its packets leave through a
``PlugQueue`` (``remus.sim.output``), which is the engine's output buffer.

The guest lives exactly as long as the process that started it: ``close``
resumes it if needed, then tells it to quit; if this process dies first, the
guest sees EOF on its doorbell and exits.

``SimulatedDomain.activate`` starts a guest from a replicated image instead
(the backup's failover); its packets pass unbuffered.
"""

from __future__ import annotations

import logging
import os
import random
import select
import subprocess
import sys
import time
from typing import Iterator, Mapping, Optional, Sequence, cast

from remus.devices import CheckpointDevice
from remus.domain import Capture, DomainInfo
from remus.errors import DomainError
from remus.sim.memory import GuestMemory, MemoryDigest
from remus.sim.output import GuestNic, PacketSink, PlugQueue, SimOutputBuffer
from remus.sim.spec import SimSpec
from remus.stream.records import (
    MAX_BATCH_PAGES,
    PAGE_SIZE,
    Checkpoint,
    DomainHeader,
    PageData,
    Record,
    SimVcpu,
)

try:
    import numpy as np
except ImportError:  # the boot memory of pattern=words is then shaped with Python integers
    np = None  # type: ignore[assignment,unused-ignore]

log = logging.getLogger(__name__)

#: Domain-header type of a simulated domain ("RESM"); libxc's are 1 (PV) and 2 (HVM).
SIM_DHDR_TYPE = 0x5245534D
#: How long a guest may take to acknowledge a suspend or resume request.
ACK_TIMEOUT_S = 5.0


#: The guest's boot memory is made in chunks of this size (``random.randbytes`` takes a
#: C int of bits: one call must stay under 256 MiB), each from its own seed.
INIT_CHUNK_BYTES = 16 << 20
#: ``words`` memory at boot is an array of 64-byte objects of eight 64-bit words:
#: (mask of random bits kept, constant or-ed in) per word: two pointers into the
#: direct map, a small integer, a 32-bit counter, zero, a random word, flags, zero.
_POINTER = (0x0000000003FFFFC0, 0xFFFF888000000000)
_OBJECT = (_POINTER, _POINTER, (0xFFF, 0), (0xFFFFFFFF, 0), (0, 0), ((1 << 64) - 1, 0), (0xFF, 0), (0, 0))
_OBJECT_MASK = b"".join(m.to_bytes(8, "little") for m, _ in _OBJECT)
_OBJECT_BITS = b"".join(c.to_bytes(8, "little") for _, c in _OBJECT)


def _words_memory(random_bytes: bytes) -> bytes:
    """``random_bytes`` shaped into ``words`` objects (a multiple of 64 bytes long)."""
    count = len(random_bytes) // len(_OBJECT_MASK)
    if np is not None:
        words = np.frombuffer(random_bytes, dtype=np.uint64).reshape(count, len(_OBJECT))
        shaped = (words & np.frombuffer(_OBJECT_MASK, dtype=np.uint64)) | np.frombuffer(
            _OBJECT_BITS, dtype=np.uint64)
        return bytes(shaped.data)
    pieces = []
    step = 1 << 16  # Python integers: linear up to about this size
    mask = int.from_bytes(_OBJECT_MASK * (step // 64), "little")
    bits = int.from_bytes(_OBJECT_BITS * (step // 64), "little")
    for off in range(0, len(random_bytes), step):
        n = min(step, len(random_bytes) - off)
        value = int.from_bytes(random_bytes[off : off + n], "little")
        pieces.append(((value & mask) | bits).to_bytes(n, "little") if n == step else
                      ((value & (mask >> 8 * (step - n))) | (bits >> 8 * (step - n))).to_bytes(n, "little"))
    return b"".join(pieces)


def initial_chunk(spec: SimSpec, index: int) -> bytes:
    """Chunk ``index`` (of ``INIT_CHUNK_BYTES``) of the guest's memory at boot.

    ``random``: seeded pseudo-random data in the first half of memory, zeros
    after; ``words``: 64-byte objects of pointers, small integers, counters,
    flags, zeros and a random word (see ``_OBJECT``), all over memory.  Each chunk has its own seed, so any chunk of a 16 GiB guest
    can be made alone.

    Raises:
        ValueError: ``index`` is beyond the guest's memory.
    """
    start = index * INIT_CHUNK_BYTES
    if not 0 <= start < spec.memory:
        raise ValueError(f"chunk {index} is beyond the guest's memory")
    length = min(INIT_CHUNK_BYTES, spec.memory - start)
    rng = random.Random(f"remus-sim:{spec.seed}:{index}")
    if spec.pattern == "words":
        return _words_memory(rng.randbytes(length))
    half = (spec.pages // 2) * PAGE_SIZE
    random_len = max(0, min(length, half - start))
    return rng.randbytes(random_len) + bytes(length - random_len)


def initial_chunks(spec: SimSpec) -> Iterator[tuple[int, bytes]]:
    """(offset, data) of every boot memory chunk that is not all zero, in order."""
    half = (spec.pages // 2) * PAGE_SIZE
    for index in range(-(-spec.memory // INIT_CHUNK_BYTES)):
        start = index * INIT_CHUNK_BYTES
        if spec.pattern == "random" and start >= half:
            return
        yield start, initial_chunk(spec, index)


def initial_memory(spec: SimSpec) -> bytes:
    """The guest's whole memory at boot, as one buffer (for tests of small guests)."""
    memory = bytearray(spec.memory)
    for offset, data in initial_chunks(spec):
        memory[offset : offset + len(data)] = data
    return bytes(memory)


class SimulatedDomain:
    """A simulated guest under protection (the primary's side).  See the module docstring."""

    def __init__(self, spec: SimSpec, *, role: str = "primary", image: Optional[bytes] = None,
                 vcpu: Optional[SimVcpu] = None, image_digest: Optional[MemoryDigest] = None) -> None:
        self.spec = spec
        self.role = role
        self.mem = GuestMemory(spec.pages)
        self._proc: Optional[subprocess.Popen[bytes]] = None
        self._suspended = False
        self._holding = False
        self._first_capture = True
        self._captures = 0
        try:
            if image is None:
                for offset, data in initial_chunks(spec):
                    self.mem.write_at(offset, data)
                self.mem.write_vcpu(0, spec.seed, 0)
                self.mem.mark_all_dirty()
                # Every page is dirty: the first capture hashes each one into this.
                self.digest = MemoryDigest(spec.pages)
            else:
                assert vcpu is not None
                self.mem.fill(image)
                self.mem.write_vcpu(vcpu.counter, vcpu.rng_state, vcpu.writes)
                self.digest = image_digest if image_digest is not None else MemoryDigest.of(image)
            self.sink = PacketSink(spec.output, spec.name, role)
            self.queue = PlugQueue(self.sink.deliver)
            self._start_guest()
        except BaseException:
            self._teardown()
            raise

    @classmethod
    def activate(cls, spec: SimSpec, image: bytes, vcpu: SimVcpu) -> "SimulatedDomain":
        """Start a guest from a replicated image, its output unbuffered (failover).

        Raises:
            DomainError: the image does not hash to the digest its checkpoint carried.
        """
        digest = MemoryDigest.of(image)
        if digest.digest() != vcpu.memory_digest:
            raise DomainError(
                f"sim:{spec.name}: replicated memory does not match the digest of the checkpoint "
                "it came from; refusing to activate it"
            )
        domain = cls(spec, role="backup", image=image, vcpu=vcpu, image_digest=digest)
        domain.queue.release_all()
        return domain

    # -- process plumbing --------------------------------------------------------------
    def _start_guest(self) -> None:
        bell_r, self._bell = os.pipe()
        self._ack, ack_w = os.pipe()
        self._net, net_w = os.pipe()
        child_fds = (self.mem.fd, bell_r, ack_w, net_w)
        args = [
            sys.executable, "-m", "remus.sim.guest",
            *(str(fd) for fd in child_fds), str(self.spec.pages),
            str(self.spec.dirty_rate), str(self.spec.locality), str(self.spec.packet_rate),
            self.spec.pattern,
        ]
        try:
            self._proc = subprocess.Popen(args, pass_fds=child_fds, start_new_session=True,
                                          stdin=subprocess.DEVNULL)
        finally:
            for fd in (bell_r, ack_w, net_w):
                os.close(fd)
        self.nic = GuestNic(self._net, self.queue)
        self.nic.start()

    def _command(self, command: bytes, answer: bytes) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            raise DomainError(f"sim:{self.spec.name}: the guest process is not running")
        try:
            os.write(self._bell, command)
        except BrokenPipeError:
            raise DomainError(f"sim:{self.spec.name}: the guest process is gone") from None
        deadline = time.monotonic() + ACK_TIMEOUT_S
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DomainError(
                    f"sim:{self.spec.name}: guest did not answer {command!r} within {ACK_TIMEOUT_S:.0f} s"
                )
            readable, _, _ = select.select([self._ack], [], [], remaining)
            if readable:
                got = os.read(self._ack, 1)
                if got == answer:
                    return
                raise DomainError(f"sim:{self.spec.name}: guest answered {got!r} to {command!r}")

    # -- Domain protocol ---------------------------------------------------------------
    @property
    def info(self) -> DomainInfo:
        from remus.sim.disk import session_disks

        return DomainInfo("sim", self.spec.name, {"sim": self.spec.to_dict(), **session_disks(self.spec)})

    @property
    def suspended(self) -> bool:
        return self._suspended

    @property
    def pid(self) -> Optional[int]:
        return self._proc.pid if self._proc else None

    def devices(self, net_buffering: bool, interval_ms: int = 0) -> Sequence[CheckpointDevice]:
        output = SimOutputBuffer(self.queue, self.nic, buffering=net_buffering)
        if self.spec.disk is None or self.role != "primary":
            return [output]
        from remus.sim.disk import SimDisk

        if getattr(self, "disk", None) is None:
            self.disk: Optional[SimDisk] = SimDisk(self.spec)  # closed in _teardown
        assert self.disk is not None
        return [self.disk.device, output]  # disks first

    def prepare_suspend(self) -> None:
        """Nothing to wait for: the simulated guest stops on request."""

    def suspend(self) -> None:
        self._command(b"s", b"S")
        self._suspended = True

    def capture(self) -> Capture:
        """Copy the dirty pages and the vCPU (guest stopped); hash them after it resumed.

        The pages are copied into one buffer (``GuestMemory.snapshot``), and
        the records carry views of it: no per-page objects outlive the
        checkpoint, and the buffer goes back to the system whole once the
        checkpoint is sent.  Everything per page but that copy happens after
        the guest resumed.
        """
        if not self._suspended:
            raise DomainError(f"sim:{self.spec.name}: capture while the guest runs")
        mem = self.mem
        dirty = mem.take_dirty()
        snapshot = mem.snapshot(dirty)
        counter, rng, writes = mem.read_vcpu()
        first = self._first_capture
        self._first_capture = False
        self._captures += 1

        done: list[list[Record]] = []

        def finish() -> list[Record]:
            if done:
                return done[0]
            view = memoryview(snapshot).toreadonly()
            # The records' pages are read-only views; everything that reads them takes bytes-like objects.
            pages = [cast(bytes, view[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]) for i in range(len(dirty))]
            self.digest.update(zip(dirty, pages))
            records: list[Record] = [DomainHeader(SIM_DHDR_TYPE, 0, 0)] if first else []
            for start in range(0, len(dirty), MAX_BATCH_PAGES):
                records.append(PageData(tuple(dirty[start : start + MAX_BATCH_PAGES]),
                                        tuple(pages[start : start + MAX_BATCH_PAGES])))
            records.append(SimVcpu(counter, rng, writes, self.digest.digest()))
            records.append(Checkpoint())
            done.append(records)
            return records

        return Capture((), len(dirty), finish)

    def resume(self) -> None:
        self._command(b"r", b"R")
        self._suspended = False

    def vcpu(self) -> tuple[int, int, int]:
        """(counter, rng_state, writes) right now."""
        return self.mem.read_vcpu()

    def hold(self) -> str:
        """Stop the guest (if it runs) and keep it stopped, its held packets never released.

        The guest dies with this process: ``close`` then shuts it down without
        resuming it and drops the packets still held.
        """
        self._holding = True
        if not self._suspended:
            self.suspend()
        return "stopped"

    def close(self) -> None:
        """Resume the guest if suspended (unless held), then shut it down with this process."""
        try:
            if self._suspended and not self._holding and self._proc is not None and self._proc.poll() is None:
                self.resume()
        except DomainError as exc:
            log.warning("%s", exc)
        finally:
            self._teardown()

    def _teardown(self) -> None:
        proc = self._proc
        if proc is not None:
            try:
                os.write(self._bell, b"q")
            except OSError:
                pass
            try:
                proc.wait(timeout=ACK_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            self._proc = None
        nic = getattr(self, "nic", None)
        if nic is not None:
            nic.stop()
        for name in ("_bell", "_ack", "_net"):
            fd = getattr(self, name, None)
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
                setattr(self, name, None)
        disk = getattr(self, "disk", None)
        if disk is not None:
            disk.close()
            self.disk = None
        queue = getattr(self, "queue", None)
        if queue is not None and not self._holding:
            queue.release_all()
        sink = getattr(self, "sink", None)
        if sink is not None:
            sink.close()
        self.mem.close()


def spec_from_session(details: Mapping[str, object]) -> SimSpec:
    """The ``SimSpec`` a session header describes (see ``SimulatedDomain.info``)."""
    sim = details.get("sim")
    if not isinstance(sim, Mapping):
        raise DomainError("session header of a sim domain lacks its settings")
    return SimSpec.from_dict(sim)

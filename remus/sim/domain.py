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
from typing import Mapping, Optional, Sequence

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

log = logging.getLogger(__name__)

#: Domain-header type of a simulated domain ("RESM"); libxc's are 1 (PV) and 2 (HVM).
SIM_DHDR_TYPE = 0x5245534D
#: How long a guest may take to acknowledge a suspend or resume request.
ACK_TIMEOUT_S = 5.0


def initial_memory(spec: SimSpec) -> bytes:
    """The guest's memory at boot: seeded pseudo-random data in the first half, zeros after."""
    half = (spec.pages // 2) * PAGE_SIZE
    return random.Random(spec.seed).randbytes(half) + bytes(spec.memory - half)


class SimulatedDomain:
    """A simulated guest under protection (the primary's side).  See the module docstring."""

    def __init__(self, spec: SimSpec, *, role: str = "primary", image: Optional[bytes] = None,
                 vcpu: Optional[SimVcpu] = None) -> None:
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
                self.mem.fill(initial_memory(spec))
                self.mem.write_vcpu(0, spec.seed, 0)
                self.mem.mark_all_dirty()
                self.digest = MemoryDigest.of(self.mem.memory_bytes())
            else:
                assert vcpu is not None
                self.mem.fill(image)
                self.mem.write_vcpu(vcpu.counter, vcpu.rng_state, vcpu.writes)
                self.digest = MemoryDigest.of(image)
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
        actual = MemoryDigest.of(image).digest()
        if actual != vcpu.memory_digest:
            raise DomainError(
                f"sim:{spec.name}: replicated memory does not match the digest of the checkpoint "
                "it came from; refusing to activate it"
            )
        domain = cls(spec, role="backup", image=image, vcpu=vcpu)
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
        return DomainInfo("sim", self.spec.name, {"sim": self.spec.to_dict()})

    @property
    def suspended(self) -> bool:
        return self._suspended

    @property
    def pid(self) -> Optional[int]:
        return self._proc.pid if self._proc else None

    def devices(self, net_buffering: bool, interval_ms: int = 0) -> Sequence[CheckpointDevice]:
        return [SimOutputBuffer(self.queue, self.nic, buffering=net_buffering)]

    def suspend(self) -> None:
        self._command(b"s", b"S")
        self._suspended = True

    def capture(self) -> Capture:
        """Copy the dirty pages and the vCPU (guest stopped); hash them after it resumed."""
        if not self._suspended:
            raise DomainError(f"sim:{self.spec.name}: capture while the guest runs")
        mem = self.mem
        dirty = mem.take_dirty()
        pages = [mem.page(pfn) for pfn in dirty]
        counter, rng, writes = mem.read_vcpu()
        first = self._first_capture
        self._first_capture = False
        self._captures += 1

        done: list[list[Record]] = []

        def finish() -> list[Record]:
            if done:
                return done[0]
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

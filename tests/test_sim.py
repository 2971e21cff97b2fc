"""The simulated domain behaves like a guest: it really stops, tracks dirty pages, and its
output leaves only when the checkpoint that produced it is acknowledged."""

from __future__ import annotations

import os
import select
import time
from pathlib import Path

import pytest

from remus.clock import StopFlag
from remus.domain import Capture
from remus.engine import Engine
from remus.errors import DomainError, UsageError
from remus.sim.domain import INIT_CHUNK_BYTES, SimulatedDomain, initial_chunk, initial_memory
from remus.sim.guest import Guest
from remus.sim.memory import GuestMemory, MemoryDigest
from remus.sim.output import PacketSink, PlugQueue
from remus.sim.spec import SimSpec, parse_sim_spec
from remus.stream.records import PAGE_SIZE, Checkpoint, DomainHeader, PageData, SimVcpu
from remus.stream.sender import FramedCheckpoint
from tests.helpers import wait_until

# --------------------------------------------------------------------------- spec


def test_spec_defaults_and_keys() -> None:
    assert parse_sim_spec("sim:demo") == SimSpec("demo")
    spec = parse_sim_spec("sim:g1,memory=64M,dirty_rate=500,locality=0.5,seed=9,output=/tmp/o,packet_rate=3")
    assert spec == SimSpec("g1", 64 << 20, 500, 0.5, 9, "/tmp/o", 3)
    assert spec.pages == 16384


@pytest.mark.parametrize("text,needle", [
    ("sim:demo,colour=red", "unknown key 'colour'"),
    ("sim:demo,memory=lots", "memory='lots'"),
    ("sim:demo,memory=100", "between 1M and 16G"),
    ("sim:demo,memory=100G", "memory=100G: must be between 1M and 16G"),
    ("sim:demo,pattern=zebra", "pattern=zebra: must be one of random, words"),
    ("sim:demo,memory=1000001K", "whole number of 4 KiB pages"),
    ("sim:demo,dirty_rate=-1", "dirty_rate"),
    ("sim:demo,locality=2", "locality"),
    ("sim:demo,seed=x", "seed='x'"),
    ("sim:demo,seed=1,seed=2", "seed given twice"),
    ("sim:demo,memory", "not key=value"),
    ("sim:", "name"),
    ("sim:a b", "name"),
])
def test_bad_specs_are_usage_errors(text: str, needle: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_sim_spec(text)
    assert needle in str(info.value)


def test_spec_round_trips_through_the_session_header_form() -> None:
    spec = parse_sim_spec("sim:x,memory=2M,seed=5,output=/o")
    assert SimSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(UsageError):
        SimSpec.from_dict(dict(spec.to_dict(), evil=1))
    with pytest.raises(UsageError):
        SimSpec.from_dict(dict(spec.to_dict(), memory=-1))
    assert "pattern" not in spec.to_dict()  # a receiver that predates the key takes it
    words = parse_sim_spec("sim:x,pattern=words")
    assert words.pattern == "words" and SimSpec.from_dict(words.to_dict()) == words


def test_every_size_up_to_the_advertised_maximum_is_accepted_and_can_be_made() -> None:
    # 512M and more used to fail with OverflowError (one random.randbytes call of half the memory).
    for size, pages in (("512M", 131072), ("1G", 262144), ("4G", 1 << 20), ("16G", 1 << 22)):
        spec = parse_sim_spec(f"sim:big,memory={size}")
        assert spec.pages == pages
        last = spec.memory // INIT_CHUNK_BYTES - 1
        # Any chunk is made alone: the ones around the middle (random, then zero) and the last.
        middle = (spec.memory // 2) // INIT_CHUNK_BYTES
        assert any(initial_chunk(spec, middle - 1)) and not any(initial_chunk(spec, middle))
        assert len(initial_chunk(spec, last)) == INIT_CHUNK_BYTES and not any(initial_chunk(spec, last))
        words_last = initial_chunk(parse_sim_spec(f"sim:big,memory={size},pattern=words"), last)
        assert len(words_last) == INIT_CHUNK_BYTES and any(words_last)
        with pytest.raises(ValueError):
            initial_chunk(spec, last + 1)
    # A chunk does not depend on the guest's size, only on the seed and its index.
    assert initial_chunk(parse_sim_spec("sim:a,memory=16G"), 0) == initial_chunk(parse_sim_spec("sim:a,memory=64M"), 0)
    assert initial_chunk(parse_sim_spec("sim:a,memory=64M,seed=2"), 0) != initial_chunk(parse_sim_spec("sim:a,memory=64M"), 0)


def test_words_memory_is_not_half_zero() -> None:
    memory = initial_memory(parse_sim_spec("sim:w,memory=1M,pattern=words"))
    pages = [memory[i:i + PAGE_SIZE] for i in range(0, len(memory), PAGE_SIZE)]
    assert all(any(page) for page in pages)
    assert 0.45 < memory.count(0) / len(memory) < 0.65
    random_memory = initial_memory(parse_sim_spec("sim:r,memory=1M"))
    assert not any(random_memory[len(random_memory) // 2:]) and all(
        any(random_memory[i:i + PAGE_SIZE]) for i in range(0, len(random_memory) // 2, PAGE_SIZE))


# --------------------------------------------------------------------------- the guest model


def guest_on(mem: GuestMemory, seed: int, locality: float = 0.9, pattern: str = "random") -> Guest:
    mem.write_vcpu(0, seed, 0)
    r, w = os.pipe()
    guest = Guest(mem, bell=-1, ack=-1, net=w, dirty_rate=0, locality=locality, packet_rate=0,
                  pattern=pattern)
    guest._pipe = (r, w)  # type: ignore[attr-defined]
    return guest


def test_same_seed_same_memory_different_seed_different_memory() -> None:
    memories = []
    for seed in (7, 7, 8):
        mem = GuestMemory(256)
        guest_on(mem, seed).write_pages(2000)
        memories.append((mem.memory_bytes(), mem.read_vcpu()))
        mem.close()
    assert memories[0] == memories[1]
    assert memories[0][0] != memories[2][0]


def test_dirty_map_tracks_every_written_page_and_clears() -> None:
    mem = GuestMemory(512)
    guest = guest_on(mem, 3, locality=0.0)
    before = mem.memory_bytes()
    guest.write_pages(300)
    after = mem.memory_bytes()
    changed = {pfn for pfn in range(512) if before[pfn * PAGE_SIZE:(pfn + 1) * PAGE_SIZE]
               != after[pfn * PAGE_SIZE:(pfn + 1) * PAGE_SIZE]}
    dirty = mem.take_dirty()
    assert changed <= set(dirty) and len(dirty) > 100
    assert mem.take_dirty() == []
    assert mem.read_vcpu()[0] == 300 and mem.read_vcpu()[2] == 300


def test_words_writes_change_a_few_aligned_words_of_one_page() -> None:
    mem = GuestMemory(64)
    mem.fill(initial_memory(SimSpec("w", memory=64 * PAGE_SIZE, pattern="words")))
    guest = guest_on(mem, 4, locality=0.0, pattern="words")
    for _ in range(50):
        before = mem.memory_bytes()
        guest.write_pages(1)
        after = mem.memory_bytes()
        (pfn,) = mem.take_dirty()
        changed_words = {i // 8 for i in range(len(before)) if before[i] != after[i]}
        assert 0 < len(changed_words) <= 4
        assert all(w * 8 // PAGE_SIZE == pfn for w in changed_words)
    mem.close()


def test_a_16g_guest_memory_is_mapped_not_allocated_and_its_dirty_log_is_exact() -> None:
    pages = (16 << 30) // PAGE_SIZE
    mem = GuestMemory(pages)  # sparse: only what is written is ever backed
    try:
        guest = guest_on(mem, 8, locality=0.0)
        guest.write_pages(300)
        dirty = mem.take_dirty()
        assert dirty == sorted(set(dirty)) and 250 < len(dirty) <= 300
        assert max(dirty) > pages // 2  # writes reach the top of memory
        assert all(mem.map[mem.dirty_offset + pfn] == 0 for pfn in dirty)
        assert mem.take_dirty() == []
        guest.write_pages(5)
        assert 1 <= len(mem.take_dirty()) <= 5
    finally:
        mem.close()


def test_the_dirty_log_and_the_dirty_map_agree_and_mark_all_dirty_covers_every_page() -> None:
    mem = GuestMemory(300)
    mem.mark_all_dirty()
    assert mem.take_dirty() == list(range(300))
    for pfn in (7, 3, 7, 299, 0):
        mem.mark_dirty(pfn)
    assert mem.take_dirty() == [0, 3, 7, 299]
    assert not any(mem.map[mem.dirty_offset : mem.dirty_offset + 300])
    mem.close()


def test_locality_concentrates_writes_in_the_hot_region() -> None:
    mem = GuestMemory(1600)
    guest_on(mem, 5, locality=1.0).write_pages(500)
    assert max(mem.take_dirty()) < 100  # the hot region is the first 1/16 of memory


def test_memory_digest_updates_incrementally() -> None:
    data = bytearray(initial_memory(SimSpec("d", memory=1 << 20)))
    digest = MemoryDigest.of(bytes(data))
    start = digest.digest()
    data[5 * PAGE_SIZE + 17] ^= 0xFF
    digest.update([(5, bytes(data[5 * PAGE_SIZE:6 * PAGE_SIZE]))])
    assert digest.digest() == MemoryDigest.of(bytes(data)).digest() != start
    data[5 * PAGE_SIZE + 17] ^= 0xFF  # back as it was: the same digest again
    digest.update([(5, bytes(data[5 * PAGE_SIZE:6 * PAGE_SIZE]))])
    assert digest.digest() == start
    # two pages trading places, or a page moving to where zeros were, change it
    swapped = bytearray(data)
    swapped[0:PAGE_SIZE], swapped[PAGE_SIZE:2 * PAGE_SIZE] = data[PAGE_SIZE:2 * PAGE_SIZE], data[0:PAGE_SIZE]
    assert MemoryDigest.of(bytes(swapped)).digest() != start
    moved = bytearray(len(data))
    moved[PAGE_SIZE:2 * PAGE_SIZE] = data[0:PAGE_SIZE]
    shifted = bytearray(len(data))
    shifted[0:PAGE_SIZE] = data[0:PAGE_SIZE]
    assert MemoryDigest.of(bytes(moved)).digest() != MemoryDigest.of(bytes(shifted)).digest()


def test_packets_carry_the_counter_and_advance_it() -> None:
    mem = GuestMemory(16)
    guest = guest_on(mem, 1)
    guest.write_pages(5)
    guest.send_packets(3)
    r, _w = guest._pipe  # type: ignore[attr-defined]
    assert os.read(r, 100) == b"6\n7\n8\n"


# --------------------------------------------------------------------------- plug queue


def test_plug_queue_follows_sch_plug_epochs() -> None:
    out: list[int] = []
    q = PlugQueue(out.extend)
    q.enqueue([1, 2])
    q.plug()            # epoch A = [1, 2] closed
    q.enqueue([3])
    q.release_one()     # A out
    assert out == [1, 2]
    q.release_one()     # nothing closed: nothing out
    assert out == [1, 2]
    q.plug()
    q.enqueue([4])
    q.release_all()
    assert out == [1, 2, 3, 4]
    q.enqueue([5])      # passes through now
    assert out == [1, 2, 3, 4, 5]
    q.plug()
    q.enqueue([6])
    assert out[-1] == 5


def test_plug_queue_drops_beyond_its_limit() -> None:
    out: list[int] = []
    q = PlugQueue(out.extend, limit=3)
    q.enqueue([1, 2, 3, 4, 5])
    assert q.dropped == 2 and q.held == 3


def test_packet_sink_appends_counter_first(tmp_path: Path) -> None:
    path = tmp_path / "out"
    sink = PacketSink(str(path), "g", "primary")
    sink.deliver([3, 9])
    sink.close()
    assert path.read_text() == "3 g primary\n9 g primary\n"


# --------------------------------------------------------------------------- the live guest


def proc_state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_suspend_really_stops_the_guest_and_resume_restarts_it(tmp_path: Path) -> None:
    domain = SimulatedDomain(parse_sim_spec("sim:t,memory=4M,dirty_rate=20000,packet_rate=200"))
    try:
        wait_until(lambda: domain.vcpu()[0] > 0, what="the guest to run")
        domain.suspend()
        counter = domain.vcpu()[0]
        memory = domain.mem.memory_bytes()
        assert domain.pid is not None
        wait_until(lambda: proc_state(domain.pid) == "S", what="the guest to block")  # type: ignore[arg-type]
        assert domain.vcpu()[0] == counter and domain.mem.memory_bytes() == memory
        domain.resume()
        wait_until(lambda: domain.vcpu()[0] > counter, what="the guest to run again")
    finally:
        domain.close()
    assert domain.pid is None


def test_the_counter_read_while_the_guest_runs_never_goes_back() -> None:
    # The guest rewrites its vCPU state after every page write; a reader in this process must
    # never see it half written (a counter of 0, or one that went back).
    domain = SimulatedDomain(parse_sim_spec("sim:t,memory=4M,dirty_rate=200000"))
    try:
        seen = [domain.vcpu()[0]]
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            seen.extend(domain.vcpu()[0] for _ in range(1000))
        went_back = [(a, b) for a, b in zip(seen, seen[1:]) if b < a]
        assert not went_back, f"{len(went_back)} of {len(seen)} reads went back, e.g. {went_back[:3]}"
        assert seen[-1] > seen[0]
    finally:
        domain.close()


def test_capture_returns_exactly_the_dirty_pages_and_the_vcpu() -> None:
    domain = SimulatedDomain(parse_sim_spec("sim:t,memory=2M,dirty_rate=5000,packet_rate=0"))
    try:
        domain.suspend()
        first = domain.capture()
        assert isinstance(first.final_records()[0], DomainHeader)
        assert first.dirty_pages == 512  # the first capture is the whole memory
        domain.resume()
        deadline = time.monotonic() + 10
        while domain.vcpu()[2] < 50 and time.monotonic() < deadline:  # let it write some pages
            select.select([], [], [], 0.01)
        domain.suspend()
        second = domain.capture()
        records2 = second.final_records()
        pages = [r for r in records2 if isinstance(r, PageData)]
        vcpu = [r for r in records2 if isinstance(r, SimVcpu)][0]
        assert isinstance(records2[-1], Checkpoint)
        dirty_pfns = [p for r in pages for p in r.pfns]
        assert 0 < len(dirty_pfns) == second.dirty_pages < 512
        for record in pages:
            for pfn, page in zip(record.pfns, record.pages):
                assert page == domain.mem.page(pfn)
        assert vcpu.counter == domain.vcpu()[0]
        assert vcpu.memory_digest == MemoryDigest.of(domain.mem.memory_bytes()).digest()
        domain.resume()
    finally:
        domain.close()


def test_capture_while_running_is_refused() -> None:
    domain = SimulatedDomain(parse_sim_spec("sim:t,memory=1M"))
    try:
        with pytest.raises(DomainError):
            domain.capture()
    finally:
        domain.close()


def test_guest_dies_with_its_host_process() -> None:
    domain = SimulatedDomain(parse_sim_spec("sim:t,memory=1M"))
    pid = domain.pid
    assert pid is not None
    os.close(domain._bell)  # what the kernel does when the host process dies
    domain._bell = os.open(os.devnull, os.O_WRONLY)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and domain._proc.poll() is None:  # type: ignore[union-attr]
        time.sleep(0.02)
    assert domain._proc.poll() == 0  # type: ignore[union-attr]
    domain.close()


class AckRecorder:
    """A channel that acks at once and records, per ack, the vCPU counter it covered."""

    def __init__(self, domain: SimulatedDomain, stop: StopFlag, checkpoints: int) -> None:
        self.domain, self.stop, self.checkpoints = domain, stop, checkpoints
        self.acked_counter = 0
        self.violations: list[tuple[int, int]] = []
        self._pending: dict[int, int] = {}

    def note_capture(self, capture: Capture, seq: int) -> None:
        vcpu = [r for r in capture.final_records() if isinstance(r, SimVcpu)][0]
        self._pending[seq] = vcpu.counter

    def open(self, opening: bytes) -> None:
        pass

    def send(self, checkpoint: FramedCheckpoint) -> None:
        # Nothing emitted after the last acked checkpoint may have been released yet.
        if self.domain.sink.highest > self.acked_counter:
            self.violations.append((self.domain.sink.highest, self.acked_counter))

    def wait_for_ack(self, seq: int) -> None:
        time.sleep(0.01)
        self.acked_counter = self._pending.pop(seq)
        if seq >= self.checkpoints:
            self.stop.set("test")

    def close(self, message: str, **_options: object) -> bool:
        return True

    def out_of_contact(self) -> None:
        return None  # acks come at once: never out of contact

    def abort(self) -> None:
        pass


@pytest.mark.parametrize("net_buffering", [True, False], ids=["buffered", "no-net"])
def test_output_leaves_only_after_the_ack_of_its_checkpoint(tmp_path: Path, net_buffering: bool) -> None:
    out = tmp_path / "out"
    domain = SimulatedDomain(parse_sim_spec(f"sim:t,memory=2M,dirty_rate=2000,packet_rate=500,output={out}"))
    stop = StopFlag()
    channel = AckRecorder(domain, stop, checkpoints=15)
    real_capture = domain.capture

    def capture() -> Capture:
        result = real_capture()
        channel.note_capture(result, engine.seq)
        return result

    domain.capture = capture  # type: ignore[method-assign]
    engine = Engine(domain, channel, interval_ms=20, devices=list(domain.devices(net_buffering)), stop=stop)
    try:
        time.sleep(0.1)  # let the guest emit before the first checkpoint, too
        engine.run()
    finally:
        domain.close()
    lines = out.read_text().splitlines()
    counters = [int(line.split()[0]) for line in lines]
    assert counters == sorted(counters) and len(counters) > 20
    if net_buffering:
        assert channel.violations == []
    else:
        assert channel.violations, "--no-net must let packets out before their checkpoint is acked"


@pytest.mark.parametrize("with_numpy", [True, False])
def test_dirty_pages_are_taken_and_copied_alike_with_and_without_numpy(with_numpy: bool,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import remus.sim.memory as memory_module

    if with_numpy and memory_module.np is None:
        pytest.skip("numpy is not installed")
    if not with_numpy:
        monkeypatch.setattr(memory_module, "np", None)
    mem = GuestMemory(1024)
    mem.fill(initial_memory(SimSpec("n", memory=1024 * PAGE_SIZE)))
    guest = guest_on(mem, 12, locality=0.5)
    guest.write_pages(400)
    dirty = mem.take_dirty()
    assert dirty == sorted(set(dirty)) and not any(mem.map[mem.dirty_offset:mem.dirty_offset + 1024])
    snapshot = mem.snapshot(dirty)
    assert bytes(snapshot) == b"".join(mem.page(pfn) for pfn in dirty)
    assert mem.snapshot([3, 4, 5, 9]) == b"".join(mem.page(p) for p in (3, 4, 5, 9))
    mem.close()

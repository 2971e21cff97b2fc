"""Benchmark: the simulated guest's pause at a fixed dirty rate, against guest size and memcpy.

Run: ``python -m tests.bench.pause [--sizes 64M,256M,1G,4G] [--rate 12000] [--interval 25]
[--checkpoints 40]``.

For each guest size, a simulated guest writes ``--rate`` pages per second;
every ``--interval`` ms it is suspended, captured and resumed exactly as the
engine does it (``suspend``, ``capture``, ``resume``), then the capture's
post-resume work (``finish``: building the records and the memory digest)
runs, and what the guest dirtied meanwhile is dropped (untimed), so every
checkpoint holds one interval's writes at every size.  Printed per size: the pause (suspend to resumed), the capture alone
(inside the pause), the post-resume work, and a memcpy of the same dirty pages
measured in the same run, as ratios: pause against the 64M pause, and pause
against memcpy.  The first checkpoint (the whole memory) is left out.  Nothing
is asserted.  A 4G guest maps 4 GiB and writes its random half (2 GiB): run
it only where that memory is free.
"""

from __future__ import annotations

import argparse
import statistics
import time

from remus.sim.domain import SimulatedDomain
from remus.sim.spec import parse_sim_spec


def measure(size: str, rate: int, interval_ms: int, checkpoints: int, pattern: str,
            locality: float) -> dict[str, float]:
    extra = f",pattern={pattern}" if pattern else ""
    domain = SimulatedDomain(parse_sim_spec(
        f"sim:pause,memory={size},dirty_rate={rate},packet_rate=0,locality={locality}{extra}"))
    pauses: list[float] = []
    captures: list[float] = []
    finishes: list[float] = []
    copies: list[float] = []
    dirty: list[int] = []
    try:
        for n in range(checkpoints + 1):
            time.sleep(interval_ms / 1000)  # the guest runs for one interval
            t0 = time.perf_counter()
            domain.suspend()
            t1 = time.perf_counter()
            capture = domain.capture()
            t2 = time.perf_counter()
            domain.resume()
            t3 = time.perf_counter()
            records = capture.final_records()
            t4 = time.perf_counter()
            # Forget what the guest dirtied while this checkpoint was hashed, so that every
            # checkpoint holds one interval's writes whatever the guest's size (the memory
            # digest goes stale, which this benchmark never checks).
            domain.suspend()
            domain.mem.take_dirty()
            domain.resume()
            if n == 0:
                continue  # the whole memory
            pauses.append(t3 - t0)
            captures.append(t2 - t1)
            finishes.append(t4 - t3)
            dirty.append(capture.dirty_pages)
            copies.append(_memcpy_s(records))
    finally:
        domain.close()
    return {
        "dirty pages": statistics.median(dirty),
        "pause ms": statistics.median(pauses) * 1000,
        "pause min": min(pauses) * 1000,
        "capture ms": statistics.median(captures) * 1000,
        "capture min": min(captures) * 1000,
        "after-resume ms": statistics.median(finishes) * 1000,
        "memcpy ms": statistics.median(copies) * 1000,
    }


def _memcpy_s(records: object) -> float:
    """Time to copy the checkpoint's dirty pages once into one preallocated buffer."""
    pages = [p for r in records for p in getattr(r, "pages", ())]  # type: ignore[attr-defined]
    buf = bytearray(len(pages) * 4096)
    start = time.perf_counter()
    off = 0
    for page in pages:
        buf[off : off + 4096] = page
        off += 4096
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="64M,256M,1G")
    parser.add_argument("--rate", type=int, default=12000, help="dirty pages per second")
    parser.add_argument("--interval", type=int, default=25, help="ms between checkpoints")
    parser.add_argument("--checkpoints", type=int, default=40)
    parser.add_argument("--pattern", default="", help="the guest's write pattern (sim key)")
    parser.add_argument("--locality", type=float, default=0.0,
                        help="sim key; 0 (default) makes the dirty pages per checkpoint the same at every size")
    args = parser.parse_args()
    rows = {size: measure(size, args.rate, args.interval, args.checkpoints, args.pattern, args.locality)
            for size in args.sizes.split(",")}
    base = next(iter(rows.values()))["pause ms"]
    print(f"pause of a simulated guest at {args.rate} page writes/s, locality {args.locality}, -i {args.interval}, "
          f"medians of {args.checkpoints} checkpoints")
    first = next(iter(rows.values()))
    print("(ms; median, and min where a busy machine's preemption hides the cost)")
    print(f"{'size':>6} {'dirty':>6} {'pause':>7} {'min':>6} {'capture':>8} {'min':>6} {'after':>7} "
          f"{'memcpy':>7} {'pause/first':>12} {'capture min/first':>18} {'pause min/memcpy':>17}")
    for size, r in rows.items():
        print(f"{size:>6} {r['dirty pages']:6.0f} {r['pause ms']:7.3f} {r['pause min']:6.3f} "
              f"{r['capture ms']:8.3f} {r['capture min']:6.3f} {r['after-resume ms']:7.3f} "
              f"{r['memcpy ms']:7.3f} {r['pause ms'] / base:12.2f} "
              f"{r['capture min'] / first['capture min']:18.2f} {r['pause min'] / r['memcpy ms']:17.1f}")


if __name__ == "__main__":
    main()

"""The ``sim:NAME[,key=value...]`` domain argument, parsed and checked.

Keys (all optional):

=============  ==============================================  ==========
key            meaning                                         default
=============  ==============================================  ==========
memory         guest memory, bytes with K/M/G suffix            32M
dirty_rate     pages the guest writes per second                2000
locality       share of writes that hit the hot 1/16 of memory  0.9
seed           seed of the guest's pseudo-random generator      1
output         file each released packet is appended to         (none)
packet_rate    packets the guest emits per second               20
pattern        what a write does and what memory holds at boot  random
               (``random``: 64 random bytes per write, the
               first half of memory random and the rest zero;
               ``words``: a few 32/64-bit counters and pointers
               per write, memory at boot a mix of small
               integers, pointers and zero bytes, no zero half)
disk           raw disk image the guest writes (remus.sim.disk) (none)
disk_size      its size, if it has to be created                16M
disk_rate      4 KiB blocks the guest writes per second         50
=============  ==============================================  ==========

This module only parses; it never starts a guest.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping, Optional

from remus.errors import UsageError
from remus.stream.records import PAGE_SIZE

_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")
_SIZE_RE = re.compile(r"([0-9]+)([KMG]?)(i?B)?\Z", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}

MIN_MEMORY = 1 << 20
MAX_MEMORY = 16 << 30
MAX_DIRTY_RATE = 1_000_000
MAX_PACKET_RATE = 100_000
PATTERNS = ("random", "words")


@dataclass(frozen=True)
class SimSpec:
    """Settings of one simulated guest (see the module docstring for the keys)."""

    name: str
    memory: int = 32 << 20
    dirty_rate: int = 2000
    locality: float = 0.9
    seed: int = 1
    output: Optional[str] = None
    packet_rate: int = 20
    pattern: str = "random"
    disk: Optional[str] = None
    disk_size: int = 16 << 20
    disk_rate: int = 50

    @property
    def pages(self) -> int:
        return self.memory // PAGE_SIZE

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form, as carried in the replication session header.

        ``pattern`` is left out when it is the default, so a receiver that
        predates it still takes such a guest.
        """
        data = asdict(self)
        if data["pattern"] == "random":
            del data["pattern"]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SimSpec":
        """Inverse of ``to_dict``, validating every field.

        Raises:
            UsageError: a field is missing, unknown or out of range.
        """
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise UsageError(f"unknown simulated-domain field(s): {', '.join(sorted(unknown))}")
        try:
            spec = cls(**data)
        except TypeError as exc:
            raise UsageError(f"bad simulated-domain description: {exc}") from None
        _validate(spec)
        return spec


def _parse_size(text: str) -> int:
    m = _SIZE_RE.match(text.strip())
    if not m:
        raise ValueError("expected a size such as 64M, 512K or 1G")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def _parse_int(text: str) -> int:
    try:
        return int(text, 10)
    except ValueError:
        raise ValueError("expected a whole number") from None


def _parse_float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError("expected a number") from None


_PARSERS: dict[str, Callable[[str], Any]] = {
    "memory": _parse_size,
    "dirty_rate": _parse_int,
    "locality": _parse_float,
    "seed": _parse_int,
    "output": str,
    "packet_rate": _parse_int,
    "pattern": str,
    "disk": os.path.abspath,
    "disk_size": _parse_size,
    "disk_rate": _parse_int,
}


def _validate(spec: SimSpec, typed: Optional[Mapping[str, str]] = None) -> None:
    """Raises UsageError naming the first bad field, as the user typed it when ``typed`` has it."""

    def bad(key: str, why: str) -> UsageError:
        shown = typed[key] if typed and key in typed else repr(getattr(spec, key))
        return UsageError(f"sim:{spec.name}: {key}={shown}: {why}")

    if not isinstance(spec.name, str) or not _NAME_RE.match(spec.name):
        raise UsageError(
            f"sim:{spec.name}: the name must be 1-64 characters of letters, digits, '_', '.', '-'"
        )
    if not isinstance(spec.memory, int) or not MIN_MEMORY <= spec.memory <= MAX_MEMORY:
        raise bad("memory", "must be between 1M and 16G")
    if spec.memory % PAGE_SIZE:
        raise bad("memory", "must be a whole number of 4 KiB pages")
    if not isinstance(spec.dirty_rate, int) or not 0 <= spec.dirty_rate <= MAX_DIRTY_RATE:
        raise bad("dirty_rate", f"must be between 0 and {MAX_DIRTY_RATE} pages per second")
    if not isinstance(spec.locality, (int, float)) or not 0.0 <= spec.locality <= 1.0:
        raise bad("locality", "must be between 0 and 1")
    if not isinstance(spec.seed, int) or not 0 <= spec.seed < 2**64:
        raise bad("seed", "must be between 0 and 2**64-1")
    if spec.output is not None and (not isinstance(spec.output, str) or not spec.output):
        raise bad("output", "must be a file path")
    if not isinstance(spec.packet_rate, int) or not 0 <= spec.packet_rate <= MAX_PACKET_RATE:
        raise bad("packet_rate", f"must be between 0 and {MAX_PACKET_RATE} per second")
    if spec.pattern not in PATTERNS:
        raise bad("pattern", f"must be one of {', '.join(PATTERNS)}")
    if spec.disk is not None and (not isinstance(spec.disk, str) or not spec.disk.startswith("/")):
        raise bad("disk", "must be a file path")
    if not isinstance(spec.disk_size, int) or not 65536 <= spec.disk_size <= 1 << 40 or spec.disk_size % 4096:
        raise bad("disk_size", "must be a multiple of 4K between 64K and 1T")
    if not isinstance(spec.disk_rate, int) or not 0 < spec.disk_rate <= 100_000:
        raise bad("disk_rate", "must be between 1 and 100000 blocks per second")


def parse_sim_spec(text: str) -> SimSpec:
    """Parse ``sim:NAME[,key=value...]``.

    Raises:
        UsageError: not a ``sim:`` argument, an unknown key, a repeated key or a bad value.
    """
    if not text.startswith("sim:"):
        raise UsageError(f"{text!r} is not a simulated domain (sim:NAME[,key=value...])")
    name, *pairs = text[4:].split(",")
    values: dict[str, Any] = {}
    typed: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep:
            raise UsageError(f"sim:{name}: {pair!r} is not key=value")
        if key not in _PARSERS:
            raise UsageError(
                f"sim:{name}: unknown key {key!r} (known: {', '.join(sorted(_PARSERS))})"
            )
        if key in values:
            raise UsageError(f"sim:{name}: {key} given twice")
        typed[key] = value.strip()
        try:
            values[key] = _PARSERS[key](value)
        except ValueError as exc:
            raise UsageError(f"sim:{name}: {key}={value!r}: {exc}") from None
    spec = SimSpec(name=name, **values)
    _validate(spec, typed)
    return spec

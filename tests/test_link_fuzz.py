"""Seeded fuzz campaigns over the responder's handshake, the initiator's, and the Opener.

Each case is built from ``random.Random(REMUS_FUZZ_SEED + case)`` alone, so a
failure names the case that replays it exactly.  The default run is a few
thousand cases per target; ``REMUS_FUZZ_RUNS=100000`` runs the long campaign.

What must hold for every input: the only exception is ``AuthenticationFailed``
(anything else is a bug), the responder never answers a HELLO it did not
verify and never buffers more than one message, a handshake completes only
for the untouched bytes, and the Opener hands out only plaintexts that were
sealed, in order, and raises unless the input was an untouched stream cut at
a frame boundary.
"""

from __future__ import annotations

import functools
import os
import random
from typing import Callable, Optional

import pytest

from remus.errors import AuthenticationFailed
from remus.link.handshake import HELLO_BYTES, OLD_STREAM_START, Initiator, Responder
from remus.link.seal import HEADER, Opener, Sealer
from tests.helpers import LINK_KEY, Handshake, seeded_random

RUNS = int(os.environ.get("REMUS_FUZZ_RUNS", "2000"))
SEED = int(os.environ.get("REMUS_FUZZ_SEED", "0"))

pytestmark = pytest.mark.slow


def recorded(case: int) -> Handshake:
    """One of 64 real sessions to edit (recording each case's own would cost more than fuzzing it)."""
    return _recorded(case % 64)


@functools.lru_cache(maxsize=64)
def _recorded(seed: int) -> Handshake:
    return Handshake(seed=seed)


# --------------------------------------------------------------------------- mutations


def mutate(rng: random.Random, data: bytes, pool: list[bytes]) -> bytes:
    """One to three random edits of ``data`` (flips, cuts, insertions, splices from ``pool``)."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        kind = rng.randrange(8)
        at = rng.randint(0, len(out))
        if kind == 0 and out:  # flip bits in one byte
            out[rng.randrange(len(out))] ^= rng.randint(1, 255)
        elif kind == 1:  # truncate
            del out[at:]
        elif kind == 2:  # insert random bytes
            out[at:at] = rng.randbytes(rng.randint(1, 8))
        elif kind == 3 and out:  # delete a run
            del out[at : at + rng.randint(1, 8)]
        elif kind == 4:  # splice in a piece of another message
            other = rng.choice(pool)
            start = rng.randint(0, len(other))
            out[at:at] = other[start : start + rng.randint(1, 64)]
        elif kind == 5 and out:  # overwrite a run with a piece of another message
            other = rng.choice(pool)
            piece = other[: rng.randint(1, len(other))]
            out[at : at + len(piece)] = piece
        elif kind == 6:  # duplicate a run
            start = rng.randint(0, len(out))
            out[at:at] = out[start : start + rng.randint(1, 64)]
        else:  # replace the whole input with random or foreign bytes
            out = bytearray(rng.choice([rng.randbytes(rng.randint(0, 300)), rng.choice(pool)]))
    return bytes(out)


def chunks(rng: random.Random, data: bytes) -> list[bytes]:
    """``data`` cut at random places (one byte at a time, sometimes)."""
    if rng.random() < 0.1:
        return [data[i : i + 1] for i in range(len(data))]
    pieces = []
    start = 0
    while start < len(data):
        size = rng.randint(1, max(1, len(data) // 3))
        pieces.append(data[start : start + size])
        start += size
    return pieces


def fed(receive: Callable[[bytes], object], pieces: list[bytes]) -> Optional[AuthenticationFailed]:
    """Feed ``pieces`` then EOF; the ``AuthenticationFailed`` that stopped it, if any."""
    try:
        for piece in pieces:
            receive(piece)
        receive(b"")
    except AuthenticationFailed as exc:
        return exc
    return None


def campaign(name: str, run_case: Callable[[int, random.Random], None]) -> None:
    for case in range(SEED, SEED + RUNS):
        try:
            run_case(case, random.Random(case))
        except Exception as exc:
            raise AssertionError(
                f"{name}: case {case} failed (replay: REMUS_FUZZ_SEED={case} REMUS_FUZZ_RUNS=1): {exc!r}"
            ) from exc


# --------------------------------------------------------------------------- the responder


def responder_case(case: int, rng: random.Random) -> None:
    """A stranger's bytes, or a real session's with edits, fed to a backup's ``Responder``."""
    real = recorded(case)
    other = recorded(case + 7)
    pool = [real.hello, real.reply, real.finish, other.hello, other.finish, OLD_STREAM_START * 2]
    hello = real.hello if rng.random() < 0.5 else mutate(rng, real.hello, pool)
    finish = real.finish if hello != real.hello or rng.random() < 0.2 else mutate(rng, real.finish, pool)
    stream = hello + finish
    responder = Responder(LINK_KEY, rng=seeded_random(case % 64 + 1_000_000))
    answered = b""
    failure: Optional[AuthenticationFailed] = None
    pipelined = rng.random() < 0.2  # an attacker may send on without waiting for the reply
    pieces = chunks(rng, stream) if pipelined else chunks(rng, hello) + chunks(rng, finish)
    try:
        for piece in pieces + [b""]:
            if responder.done:
                break
            responder.receive_data(piece)
            answered += responder.data_to_send()
            reader = responder._reader  # what it holds before the primary has authenticated
            assert reader is None or len(reader.buffer) <= HELLO_BYTES
    except AuthenticationFailed as exc:
        failure = exc
    if answered:  # it spoke only after a HELLO that carried a valid binder (a real or a replayed one)
        assert stream[:HELLO_BYTES] in (real.hello, other.hello) and len(answered) == len(real.reply)
    if stream == real.hello + real.finish and not pipelined:
        assert failure is None and responder.done and responder.result == real.responder.result
    elif responder.done:  # only the real messages, with bytes after them (sealed frames, to the Opener)
        assert stream.startswith(real.hello + real.finish) and responder.result == real.responder.result
    else:
        assert failure is not None and "\n" not in str(failure)


def test_responder_handshake_fuzz() -> None:
    campaign("responder", responder_case)


# --------------------------------------------------------------------------- the initiator


def initiator_case(case: int, rng: random.Random) -> None:
    """A primary's ``Initiator`` fed an edited or foreign reply."""
    real = recorded(case)
    pool = [real.hello, real.reply, real.finish, recorded(case + 3).reply, OLD_STREAM_START]
    reply = real.reply if rng.random() < 0.1 else mutate(rng, real.reply, pool)
    initiator = Initiator(LINK_KEY, rng=seeded_random(case % 64))
    initiator.start()
    failure: Optional[AuthenticationFailed] = None
    try:
        for piece in chunks(rng, reply) + [b""]:
            if initiator.done:
                break
            initiator.receive_data(piece)
    except AuthenticationFailed as exc:
        failure = exc
    if initiator.done:
        assert reply.startswith(real.reply) and initiator.result == real.initiator.result
        assert initiator.data_to_send() == real.finish
    else:
        assert failure is not None and initiator.data_to_send() == b""


def test_initiator_handshake_fuzz() -> None:
    campaign("initiator", initiator_case)


# --------------------------------------------------------------------------- the opener


def opener_case(case: int, rng: random.Random) -> None:
    """A sealed stream of a few frames, edited or reordered, fed to an ``Opener``."""
    key = rng.randbytes(32)
    sealer = Sealer(key, frame_max=256)
    plaintexts = [rng.randbytes(rng.randint(1, 256)) for _ in range(rng.randint(1, 6))]  # one frame each
    frames = [sealer.seal(p) for p in plaintexts]
    if rng.random() < 0.5:
        frames.append(sealer.final())
    pool = frames + [Sealer(rng.randbytes(32), frame_max=256).seal(b"x" * 40), HEADER.pack(1 << 30), b"\xff" * 12]
    original = b"".join(frames)
    choice = rng.random()
    if choice < 0.1:
        stream = original
    elif choice < 0.2:  # whole frames reordered, duplicated or dropped
        picked = [rng.choice(frames) for _ in range(rng.randint(1, len(frames) + 1))]
        stream = b"".join(picked)
    else:
        stream = mutate(rng, original, pool)
    opener = Opener(key, frame_max=256)
    delivered: list[bytes] = []

    def receive(data: bytes) -> None:
        delivered.extend(opener.receive_data(data))
        assert opener.buffered <= max(len(data), 4 + 256 + 16) + 4 + 256 + 16

    failure = fed(receive, chunks(rng, stream))
    expected = b"".join(plaintexts)
    assert expected.startswith(b"".join(delivered)), "a plaintext that was never sealed was delivered"
    if failure is None:  # only an untouched stream, possibly cut at a frame boundary, passes
        assert original.startswith(stream)
        boundaries = {sum(len(f) for f in frames[:n]) for n in range(len(frames) + 1)}
        assert len(stream) in boundaries
        assert opener.peer_closed == (stream == original and len(frames) > len(plaintexts))
    else:
        assert "\n" not in str(failure)


def test_opener_fuzz() -> None:
    campaign("opener", opener_case)


def test_the_mutator_is_replayable() -> None:
    """The same case number gives the same input: nothing depends on hash() or the clock."""
    pool = [b"abc" * 20, b"xyz" * 5]
    assert mutate(random.Random(5), b"hello" * 10, pool) == mutate(random.Random(5), b"hello" * 10, pool)
    assert Handshake(seed=5).hello == Handshake(seed=5).hello

"""Sealed frames, sans I/O: round trips, and every way a frame can be attacked on the wire."""

from __future__ import annotations

import random

import pytest

from remus.errors import AuthenticationFailed, LocalProtocolError
from remus.link.seal import (
    FINAL,
    FRAME_MAX,
    HEADER,
    HEADER_BYTES,
    TAG_BYTES,
    NullOpener,
    NullSealer,
    Opener,
    Sealer,
)

KEY = bytes(range(32))
OTHER = bytes(range(1, 33))


def frames_of(sealer: Sealer, *plaintexts: bytes) -> list[bytes]:
    return [sealer.seal(p) for p in plaintexts]


def refused(opener: Opener, data: bytes, *words: str) -> str:
    with pytest.raises(AuthenticationFailed) as info:
        opener.receive_data(data)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message
    with pytest.raises(AuthenticationFailed):  # every later call too
        opener.receive_data(b"")
    return message


def open_all(opener: Opener, data: bytes) -> list[bytes]:
    """Feed ``data`` then EOF; the plaintexts delivered (raises what the opener raises)."""
    return opener.receive_data(data) + opener.receive_data(b"")


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("size", [1, 100, 999, 1000, 1001, 5000])
def test_round_trip_whole_and_byte_by_byte(size: int) -> None:
    plaintext = random.Random(size).randbytes(size)
    wire = Sealer(KEY, frame_max=1000).seal(plaintext)
    frames = -(-size // 1000)
    assert len(wire) == size + frames * (HEADER_BYTES + TAG_BYTES)
    assert b"".join(Opener(KEY, frame_max=1000).receive_data(wire)) == plaintext
    opener = Opener(KEY, frame_max=1000)
    pieces = [p for i in range(len(wire)) for p in opener.receive_data(wire[i : i + 1])]
    assert b"".join(pieces) == plaintext and opener.buffered == 0 and opener.frames == frames


def test_a_large_plaintext_is_split_at_frame_max() -> None:
    plaintext = bytes(FRAME_MAX * 2 + 5)
    sealer = Sealer(KEY)
    wire = sealer.seal(plaintext)
    assert sealer.frames == 3
    assert [len(p) for p in Opener(KEY).receive_data(wire)] == [FRAME_MAX, FRAME_MAX, 5]


def test_an_empty_plaintext_sends_nothing() -> None:
    sealer = Sealer(KEY)
    assert sealer.seal(b"") == b"" and sealer.seal_frames(b"") == [] and sealer.frames == 0


def test_seal_frames_gives_the_same_frames_one_by_one() -> None:
    plaintext = random.Random(9).randbytes(2500)
    frames = Sealer(KEY, frame_max=1000).seal_frames(plaintext)
    assert [len(f) for f in frames] == [1020, 1020, 520]
    assert b"".join(frames) == Sealer(KEY, frame_max=1000).seal(plaintext)


def test_the_ciphertext_hides_the_plaintext_and_never_repeats() -> None:
    sealer = Sealer(KEY)
    first, second = sealer.seal(b"secret page" * 10), sealer.seal(b"secret page" * 10)
    assert first != second and b"secret" not in first + second
    assert first[:HEADER_BYTES] == HEADER.pack(110)  # the length is visible, and authenticated


def test_the_final_frame_closes_in_order() -> None:
    sealer = Sealer(KEY)
    wire = sealer.seal(b"last words") + sealer.final()
    opener = Opener(KEY)
    assert opener.receive_data(wire) == [b"last words"] and opener.peer_closed
    assert opener.receive_data(b"") == []
    with pytest.raises(LocalProtocolError):
        sealer.seal(b"more")


def test_without_the_final_frame_an_eof_between_frames_is_not_in_order() -> None:
    opener = Opener(KEY)
    assert open_all(opener, Sealer(KEY).seal(b"abc")) == [b"abc"]
    assert not opener.peer_closed


def test_null_framing_round_trips_and_protects_nothing() -> None:
    sealer, opener = NullSealer(frame_max=10), NullOpener(frame_max=10)
    wire = sealer.seal(b"plain text, visible") + sealer.final()
    assert b"plain text" in wire
    assert b"".join(opener.receive_data(wire)) == b"plain text, visible" and opener.peer_closed
    tampered = NullSealer().seal(b"abc").replace(b"b", b"X")
    assert NullOpener().receive_data(tampered) == [b"aXc"]  # which is why it is benchmark-only


def test_frame_max_out_of_range_is_a_local_error() -> None:
    for bad in (0, FINAL):
        with pytest.raises(LocalProtocolError):
            Sealer(KEY, frame_max=bad)
        with pytest.raises(LocalProtocolError):
            Opener(KEY, frame_max=bad)


# --------------------------------------------------------------------------- tampering


def test_every_single_byte_change_in_a_frame_is_refused() -> None:
    frame = Sealer(KEY).seal(bytes(range(50)))
    for index in range(len(frame)):
        for flip in (0x01, 0x80, 0xFF):
            altered = bytearray(frame)
            altered[index] ^= flip
            opener = Opener(KEY)
            with pytest.raises(AuthenticationFailed):
                open_all(opener, bytes(altered))


def test_a_changed_length_fails_even_when_the_bytes_are_there() -> None:
    sealer = Sealer(KEY)
    wire = sealer.seal(b"a" * 40) + sealer.seal(b"b" * 40)
    shorter = HEADER.pack(30) + wire[HEADER_BYTES:]
    refused(Opener(KEY), shorter, "sealed frame 0 fails authentication")


@pytest.mark.parametrize("cut", [1, HEADER_BYTES - 1, HEADER_BYTES, HEADER_BYTES + 10,
                                 HEADER_BYTES + 50 + TAG_BYTES - 1])
def test_a_frame_cut_short_is_refused_at_eof(cut: int) -> None:
    opener = Opener(KEY)
    assert opener.receive_data(Sealer(KEY).seal(bytes(50))[:cut]) == []
    refused(opener, b"", "cut inside a sealed frame", f"{cut} bytes")


def test_a_stream_cut_at_a_frame_boundary_delivers_only_whole_frames() -> None:
    sealer = Sealer(KEY)
    frames = frames_of(sealer, b"one", b"two", b"three")
    opener = Opener(KEY)
    assert open_all(opener, frames[0] + frames[1]) == [b"one", b"two"] and not opener.peer_closed


def test_reordered_frames_are_refused() -> None:
    frames = frames_of(Sealer(KEY), b"one", b"two", b"three")
    opener = Opener(KEY)
    assert opener.receive_data(frames[0]) == [b"one"]
    refused(opener, frames[2] + frames[1], "sealed frame 1 fails authentication")


def test_a_replayed_frame_is_refused() -> None:
    frames = frames_of(Sealer(KEY), b"commit 1", b"commit 2")
    opener = Opener(KEY)
    assert opener.receive_data(frames[0]) == [b"commit 1"]
    refused(opener, frames[0], "sealed frame 1")


def test_a_dropped_frame_is_noticed_at_the_next() -> None:
    frames = frames_of(Sealer(KEY), b"one", b"two", b"three")
    opener = Opener(KEY)
    assert opener.receive_data(frames[0]) == [b"one"]
    refused(opener, frames[2])


def test_injected_frames_are_refused() -> None:
    opener = Opener(KEY)
    assert opener.receive_data(Sealer(KEY).seal(b"real")) == [b"real"]
    forged = Sealer(OTHER)
    forged.frames = 1  # the right nonce, the wrong key
    refused(opener, forged.seal(b"forged"), "sealed with another key")
    raw = HEADER.pack(6) + b"forged" + bytes(TAG_BYTES)
    refused(Opener(KEY), raw, "fails authentication")


def test_a_frame_from_the_other_direction_is_refused() -> None:
    """Each direction has its own key: reflecting a peer's frames back at it fails."""
    to_backup, to_primary = Sealer(KEY), Sealer(OTHER)
    reflected = to_primary.seal(b"ACK 1")
    refused(Opener(KEY), reflected)
    assert Opener(KEY).receive_data(to_backup.seal(b"ok")) == [b"ok"]


def test_nothing_from_a_bad_frame_on_is_delivered() -> None:
    sealer = Sealer(KEY)
    good = sealer.seal(b"good")
    bad = bytearray(sealer.seal(b"bad!"))
    bad[-1] ^= 1
    after = sealer.seal(b"after")
    opener = Opener(KEY)
    with pytest.raises(AuthenticationFailed):
        opener.receive_data(good + bytes(bad) + after)
    assert opener.frames == 1  # the good frame was opened, but the call raised: nothing was handed out


# --------------------------------------------------------------------------- bounds


def test_a_length_over_the_bound_is_refused_before_its_body_is_buffered() -> None:
    opener = Opener(KEY)
    refused(opener, HEADER.pack(FRAME_MAX + 1), f"announces {FRAME_MAX + 1} bytes", f"over the bound of {FRAME_MAX}")
    assert opener.buffered == 0


def test_the_bound_holds_one_byte_at_a_time() -> None:
    opener = Opener(KEY, frame_max=100)
    header = HEADER.pack(101)
    for byte in header[:-1]:
        assert opener.receive_data(bytes([byte])) == []
    refused(opener, header[-1:], "over the bound of 100")


def test_a_final_frame_with_a_body_is_refused() -> None:
    refused(Opener(KEY), HEADER.pack(FINAL | 5), "final=1")


def test_data_after_the_final_frame_is_refused() -> None:
    sealer = Sealer(KEY)
    final = sealer.final()
    refused(Opener(KEY), final + b"x", "after its final sealed frame")
    opener = Opener(KEY)
    opener.receive_data(final)
    refused(opener, b"x", "after its final sealed frame")


def test_the_buffer_holds_at_most_one_frame_plus_the_data_given() -> None:
    sealer = Sealer(KEY, frame_max=100)
    wire = b"".join(sealer.seal(bytes(100)) for _ in range(50))
    opener = Opener(KEY, frame_max=100)
    for start in range(0, len(wire), 7):
        opener.receive_data(wire[start : start + 7])
        assert opener.buffered < HEADER_BYTES + 100 + TAG_BYTES


# --------------------------------------------------------------------------- in front of the backup session


def sealed_checkpoints(sealer: Sealer) -> tuple[bytes, list[bytes]]:
    """A simulated session (opening + three checkpoints), each part sealed as the primary sends it."""
    from tests.bench.seal import encoded_stream

    opening, checkpoints, _payload = encoded_stream(256, 8, 2, compression=True, seed=3)
    return sealer.seal(opening), [b"".join(sealer.seal(chunk) for chunk in chunks) for chunks in checkpoints]


def committed_through(opener: Opener, *parts: bytes) -> tuple[int, AuthenticationFailed | None]:
    """Feed each part in one call (as a part sent whole arrives whole) to an Opener before a BackupSession.

    A call that meets a bad frame hands out nothing, not even the good frames
    before it in the same call: so a part is fed whole, and the last
    checkpoint before the damaged one commits.
    """
    from remus.backup.session import BackupSession

    session = BackupSession()
    try:
        for part in parts + (b"",):
            for plaintext in opener.receive_data(part):
                session.receive_data(plaintext)
    except AuthenticationFailed as exc:
        return session.image.seq, exc
    return session.image.seq, None


def test_a_sealed_session_commits_every_checkpoint() -> None:
    opening, checkpoints = sealed_checkpoints(Sealer(KEY))
    assert committed_through(Opener(KEY), opening + b"".join(checkpoints)) == (3, None)


@pytest.mark.parametrize("where", [0.0, 0.3, 0.7, 0.999])
def test_a_flipped_byte_in_a_checkpoint_commits_nothing_of_it(where: float) -> None:
    opening, checkpoints = sealed_checkpoints(Sealer(KEY))
    third = bytearray(checkpoints[2])
    third[int(len(third) * where)] ^= 0x10
    seq, failure = committed_through(Opener(KEY), opening, checkpoints[0], checkpoints[1], bytes(third))
    assert seq == 2 and failure is not None


def test_a_checkpoint_cut_short_commits_nothing_of_it() -> None:
    opening, checkpoints = sealed_checkpoints(Sealer(KEY))
    cut = checkpoints[2][: len(checkpoints[2]) // 2]
    seq, failure = committed_through(Opener(KEY), opening, checkpoints[0], checkpoints[1], cut)
    assert seq == 2 and failure is not None and "cut inside a sealed frame" in str(failure)


def test_a_checkpoint_replayed_from_the_same_session_commits_nothing() -> None:
    opening, checkpoints = sealed_checkpoints(Sealer(KEY))
    seq, failure = committed_through(Opener(KEY), opening, checkpoints[0], checkpoints[1], checkpoints[1])
    assert seq == 2 and failure is not None

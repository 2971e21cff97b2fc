"""The link handshake, sans I/O: success, every refusal, replay, reflection, and the documented key schedule."""

from __future__ import annotations

import hashlib
import hmac
import struct

import pytest

from remus.errors import AuthenticationFailed, LocalProtocolError, RemoteProtocolError
from remus.link import handshake as hs
from remus.link.handshake import (
    FINISH_BYTES,
    HELLO_BYTES,
    MAGIC,
    PROTOCOL,
    REPLY_BYTES,
    VERSION,
    Initiator,
    Responder,
)
from remus.stream.codec import encode_record
from remus.stream.records import Session, StreamHeader
from tests.helpers import LINK_KEY, Handshake, seeded_random

OTHER_KEY = bytes(range(1, 65))


def fails(side: Responder | Initiator, data: bytes, *words: str) -> str:
    with pytest.raises(AuthenticationFailed) as info:
        side.receive_data(data)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message
    assert side.failed and not side.done
    with pytest.raises(AuthenticationFailed):  # sticky
        side.receive_data(b"x")
    return message


def test_authentication_failed_is_a_remote_protocol_error() -> None:
    assert issubclass(AuthenticationFailed, RemoteProtocolError)


# --------------------------------------------------------------------------- success


def test_both_sides_agree_on_two_distinct_keys() -> None:
    run = Handshake()
    i, r = run.initiator.result, run.responder.result
    assert run.initiator.done and run.responder.done
    sizes = (len(run.hello), len(run.reply), len(run.finish))
    assert sizes == (HELLO_BYTES, REPLY_BYTES, FINISH_BYTES) == (104, 104, 40)
    assert i.send_key == r.recv_key and i.recv_key == r.send_key
    assert i.send_key != i.recv_key and len(i.send_key) == len(i.recv_key) == 32
    transcript = hashlib.sha256(PROTOCOL + run.hello + run.reply + run.finish).digest()
    assert i.transcript_hash == r.transcript_hash == transcript
    assert run.initiator.data_to_send() == run.responder.data_to_send() == b""
    assert run.initiator.unused_data == run.responder.unused_data == b""
    assert "send_key" not in repr(i) and i.send_key.hex() not in repr(i)


def test_every_session_has_fresh_keys() -> None:
    first, second = Handshake(seed=1), Handshake(seed=2)
    assert first.initiator.result.send_key != second.initiator.result.send_key
    assert first.hello != second.hello and first.reply != second.reply


def test_the_default_randomness_is_fresh() -> None:
    one, two = Initiator(LINK_KEY), Initiator(LINK_KEY)
    assert one.start()[8:] != two.start()[8:]


def test_the_messages_start_with_magic_version_and_type() -> None:
    run = Handshake()
    for message, kind in ((run.hello, 1), (run.reply, 2), (run.finish, 3)):
        assert message[:8] == MAGIC + bytes([VERSION, kind, 0, 0])


def test_one_byte_at_a_time_gives_the_same_session() -> None:
    whole = Handshake(seed=7)
    initiator = Initiator(LINK_KEY, rng=seeded_random(7))
    responder = Responder(LINK_KEY, rng=seeded_random(7 + 1_000_000))
    hello = initiator.start()
    for index in range(len(hello)):
        assert responder.bytes_needed == HELLO_BYTES - index
        responder.receive_data(hello[index : index + 1])
        assert responder.data_to_send() == (whole.reply if index == len(hello) - 1 else b"")
    for index in range(len(whole.reply)):
        assert not initiator.done
        initiator.receive_data(whole.reply[index : index + 1])
    assert initiator.data_to_send() == whole.finish
    for index in range(len(whole.finish)):
        assert not responder.done
        responder.receive_data(whole.finish[index : index + 1])
    assert responder.result == whole.responder.result and initiator.result == whole.initiator.result


def test_sealed_frames_right_after_the_finish_are_kept_for_the_opener() -> None:
    run = Handshake(seed=3)
    responder = Responder(LINK_KEY, rng=seeded_random(3 + 1_000_000))
    responder.receive_data(run.hello)
    assert responder.data_to_send() == run.reply
    responder.receive_data(run.finish + b"first frame bytes")
    assert responder.done and responder.unused_data == b"first frame bytes"
    with pytest.raises(LocalProtocolError):
        responder.receive_data(b"more")


def test_the_result_is_not_there_before_the_end() -> None:
    responder = Responder(LINK_KEY)
    with pytest.raises(LocalProtocolError):
        responder.result
    initiator = Initiator(LINK_KEY)
    with pytest.raises(LocalProtocolError):
        initiator.receive_data(b"x")  # start() first
    initiator.start()
    with pytest.raises(LocalProtocolError):
        initiator.start()


def test_a_short_key_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError, match="31 bytes"):
        Responder(b"k" * 31)


# --------------------------------------------------------------------------- the documented key schedule


def _hkdf(ikm: bytes, salt: bytes, info: bytes) -> bytes:
    """RFC 5869 with SHA-256, one block: Expand(Extract(salt, ikm), info, 32)."""
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    return hmac.new(prk, info + b"\x01", hashlib.sha256).digest()


def _x25519_shared(run: Handshake) -> bytes:
    """The dh the initiator computed, recomputed from the seeded ephemeral private key."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

    private = X25519PrivateKey.from_private_bytes(seeded_random(5)(32))
    return private.exchange(X25519PublicKey.from_public_bytes(run.reply[40:72]))


def test_the_key_schedule_is_the_one_the_module_documents() -> None:
    """Every MAC and key recomputed from the module docstring's formulas with the standard library only."""
    run = Handshake(seed=5)

    def h(*parts: bytes) -> bytes:
        return hashlib.sha256(PROTOCOL + b"".join(parts)).digest()

    protocol_hash = hashlib.sha256(PROTOCOL).digest()
    early = _hkdf(LINK_KEY, protocol_hash, b"early")
    binder_key = _hkdf(LINK_KEY, protocol_hash, b"binder")
    assert run.hello[-32:] == hmac.new(binder_key, b"initiator hello" + h(run.hello[:-32]), hashlib.sha256).digest()
    dh = _x25519_shared(run)
    h2 = h(run.hello, run.reply[:-32])
    r_key = _hkdf(dh, early, b"responder finished" + h2)
    assert run.reply[-32:] == hmac.new(r_key, b"responder finished" + h2, hashlib.sha256).digest()
    h3 = h(run.hello, run.reply, run.finish[:8])
    i_key = _hkdf(dh, early, b"initiator finished" + h3)
    assert run.finish[8:] == hmac.new(i_key, b"initiator finished" + h3, hashlib.sha256).digest()
    ht = h(run.hello, run.reply, run.finish)
    assert run.initiator.result.send_key == _hkdf(dh, early, b"initiator to responder" + ht)
    assert run.initiator.result.recv_key == _hkdf(dh, early, b"responder to initiator" + ht)


# --------------------------------------------------------------------------- a stranger without the key


def test_a_wrong_key_gets_no_answer() -> None:
    stranger = Initiator(OTHER_KEY)
    responder = Responder(LINK_KEY)
    fails(responder, stranger.start(), "does not hold this host's key", "remus-keygen", "scp -p")
    assert responder.data_to_send() == b""


def test_the_initiator_checks_the_reply_against_its_key() -> None:
    """A backup with another key that answered anyway (forged REPLY under OTHER_KEY)."""
    initiator = Initiator(LINK_KEY, rng=seeded_random(11))
    hello = initiator.start()
    forger = Responder(OTHER_KEY, rng=seeded_random(12))
    forger._schedule.binder_key = hs._Schedule(LINK_KEY).binder_key  # it can read the hello, not the key
    forger.receive_data(hello)
    fails(initiator, forger.data_to_send(), "the backup does not hold this host's key")


def test_the_old_unauthenticated_protocol_is_refused_at_its_first_byte() -> None:
    old = StreamHeader().encode() + encode_record(Session({"domain": "x", "kind": "sim", "page_size": 4096}))
    assert old.startswith(hs.OLD_STREAM_START)
    responder = Responder(LINK_KEY)
    fails(responder, old[:1], "old unauthenticated remus protocol", "remus-keygen")
    fails(Responder(LINK_KEY), old, "old unauthenticated")
    assert responder.data_to_send() == b""


def test_an_old_receiver_is_recognised_by_the_initiator() -> None:
    initiator = Initiator(LINK_KEY)
    initiator.start()
    fails(initiator, StreamHeader().encode(), "the backup speaks the old unauthenticated remus protocol")


@pytest.mark.parametrize(
    "data, words",
    [
        (b"GET / HTTP/1.1\r\n\r\n", ("bad magic", "b'GET '")),
        (b"\x00" * 200, ("bad magic",)),
        (b"RMLX", ("bad magic",)),
        (MAGIC + bytes([2, 1, 0, 0]), ("version 2", "this host version 1")),
        (MAGIC + bytes([VERSION, 3, 0, 0]), ("type 3", "hello (type 1)")),
        (MAGIC + bytes([VERSION, 1, 0, 1]), ("reserved bits",)),
    ],
)
def test_garbage_is_refused_as_soon_as_it_shows(data: bytes, words: tuple[str, ...]) -> None:
    fails(Responder(LINK_KEY), data, *words)


def test_garbage_fails_on_the_first_wrong_byte() -> None:
    responder = Responder(LINK_KEY)
    responder.receive_data(b"RM")
    fails(responder, b"X", "bad magic")


def test_a_valid_prefix_with_a_forged_body_fails_the_binder() -> None:
    body = MAGIC + bytes([VERSION, 1, 0, 0]) + bytes(96)
    fails(Responder(LINK_KEY), body, "does not hold this host's key")


def test_an_invalid_ephemeral_key_with_a_valid_binder_is_refused() -> None:
    body = MAGIC + bytes([VERSION, 1, 0, 0]) + bytes(32) + bytes(32)  # the all-zero point
    hello = body + hs._Schedule(LINK_KEY).binder(body)
    fails(Responder(LINK_KEY), hello, "invalid ephemeral key")


# --------------------------------------------------------------------------- replay and reflection


def test_a_recorded_session_replayed_to_a_new_responder_fails_at_the_finish() -> None:
    recorded = Handshake(seed=21)
    responder = Responder(LINK_KEY, rng=seeded_random(99))
    responder.receive_data(recorded.hello)  # the binder is valid: the reply proves nothing to the replayer
    assert responder.data_to_send() != recorded.reply
    fails(responder, recorded.finish, "replayed or altered handshake")


def test_a_recorded_reply_replayed_to_a_new_initiator_fails() -> None:
    recorded = Handshake(seed=22)
    initiator = Initiator(LINK_KEY, rng=seeded_random(98))
    initiator.start()
    fails(initiator, recorded.reply, "the backup does not hold this host's key")


def test_the_responders_reply_reflected_back_to_it_fails() -> None:
    run = Handshake(seed=23)
    responder = Responder(LINK_KEY, rng=seeded_random(97))
    responder.receive_data(run.hello)
    reply = responder.data_to_send()
    fails(responder, reply, "type 2", "handshake confirmation (type 3)")  # as its FINISH
    fails(Responder(LINK_KEY), reply, "type 2", "hello (type 1)")  # as a new HELLO
    retyped = reply[:5] + b"\x01" + reply[6:]
    fails(Responder(LINK_KEY), retyped, "does not hold this host's key")  # even with the type rewritten
    as_finish = reply[:5] + b"\x03" + reply[6:8] + reply[-32:]
    fails(responder_after_hello(run), as_finish, "replayed or altered")


def responder_after_hello(run: Handshake) -> Responder:
    responder = Responder(LINK_KEY, rng=seeded_random(96))
    responder.receive_data(run.hello)
    return responder


def test_the_initiators_hello_reflected_back_to_it_fails() -> None:
    initiator = Initiator(LINK_KEY, rng=seeded_random(31))
    hello = initiator.start()
    fails(initiator, hello, "type 1", "reply (type 2)")
    retyped_initiator = Initiator(LINK_KEY, rng=seeded_random(31))
    hello = retyped_initiator.start()
    fails(retyped_initiator, hello[:5] + b"\x02" + hello[6:], "the backup does not hold this host's key")


def test_the_initiators_finish_reflected_to_another_initiator_fails() -> None:
    run = Handshake(seed=24)
    initiator = Initiator(LINK_KEY)
    initiator.start()
    initiator.receive_data(run.finish[:5])
    with pytest.raises(AuthenticationFailed, match="type 3"):
        initiator.receive_data(run.finish[5:])


@pytest.mark.parametrize("index", range(0, HELLO_BYTES, 7))
def test_any_altered_hello_byte_fails(index: int) -> None:
    hello = Handshake(seed=25).hello
    altered = bytearray(hello)
    altered[index] ^= 0x40
    responder = Responder(LINK_KEY)
    with pytest.raises(AuthenticationFailed):
        responder.receive_data(bytes(altered))
    assert responder.data_to_send() == b""


@pytest.mark.parametrize("index", range(REPLY_BYTES))
def test_any_altered_reply_byte_fails(index: int) -> None:
    run = Handshake(seed=26)
    initiator = Initiator(LINK_KEY, rng=seeded_random(26))
    initiator.start()
    altered = bytearray(run.reply)
    altered[index] ^= 0x01
    with pytest.raises(AuthenticationFailed):
        initiator.receive_data(bytes(altered))
    assert initiator.data_to_send() == b"" and not initiator.done


@pytest.mark.parametrize("index", range(FINISH_BYTES))
def test_any_altered_finish_byte_fails(index: int) -> None:
    run = Handshake(seed=27)
    responder = Responder(LINK_KEY, rng=seeded_random(27 + 1_000_000))
    responder.receive_data(run.hello)
    altered = bytearray(run.finish)
    altered[index] ^= 0x80
    with pytest.raises(AuthenticationFailed):
        responder.receive_data(bytes(altered))
    assert not responder.done


# --------------------------------------------------------------------------- cuts and limits


@pytest.mark.parametrize("cut", [0, 1, 8, 50, HELLO_BYTES - 1])
def test_a_hello_cut_short_fails_at_eof(cut: int) -> None:
    responder = Responder(LINK_KEY)
    if cut:
        responder.receive_data(Handshake().hello[:cut])
    fails(responder, b"", "closed the connection during the handshake", f"{cut} of the {HELLO_BYTES} bytes")


@pytest.mark.parametrize("cut", [0, 20, FINISH_BYTES - 1])
def test_a_finish_cut_short_fails_at_eof(cut: int) -> None:
    run = Handshake(seed=28)
    responder = responder_after_hello(run)
    if cut:
        responder.receive_data(run.finish[:cut])
    fails(responder, b"", "closed the connection", "handshake confirmation")


@pytest.mark.parametrize("cut", [0, 1, REPLY_BYTES - 1])
def test_a_reply_cut_short_fails_at_eof(cut: int) -> None:
    run = Handshake(seed=29)
    initiator = Initiator(LINK_KEY, rng=seeded_random(29))
    initiator.start()
    if cut:
        initiator.receive_data(run.reply[:cut])
    fails(initiator, b"", "the backup closed the connection during the handshake")


def test_the_responder_never_holds_more_than_one_message() -> None:
    run = Handshake(seed=30)
    responder = Responder(LINK_KEY, rng=seeded_random(30 + 1_000_000))
    fails(responder, run.hello + b"\x00" * 10_000, "data after its hello")
    assert responder.bytes_needed == 0


def test_the_prefix_layout() -> None:
    assert struct.calcsize(">4sBBH") == hs.PREFIX_BYTES == 8

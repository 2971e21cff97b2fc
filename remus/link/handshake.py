"""The link handshake: both hosts prove they hold the shared key and agree on fresh keys, sans I/O.

No sockets and no clocks: ``Initiator`` (the primary) and ``Responder`` (the
backup) take the bytes the peer sent (``receive_data``) and hand back the
bytes to send (``start`` / ``data_to_send``).  ``remus.link.blocking`` drives
them over a blocking socket; a nonblocking server feeds them from its loop
and applies its own deadline.

Theory of operation.  The shape is TLS 1.3's PSK-DHE handshake (RFC 8446
section 2.2: a ClientHello with a PSK binder and a key share, a ServerHello
with a key share and the server's Finished, then the client's Finished),
with a fixed layout in place of TLS's extensions::

    initiator -> responder   HELLO   prefix | nonce_i | e_i | binder
    responder -> initiator   REPLY   prefix | nonce_r | e_r | r_finished
    initiator -> responder   FINISH  prefix | i_finished

``prefix`` is ``MAGIC``, ``VERSION``, the message type and two zero bytes;
nonces are 32 random bytes, ``e_i``/``e_r`` fresh X25519 public keys.  With
``psk`` the shared key, ``dh`` the X25519 result and ``H(...)`` SHA-256 over
``PROTOCOL`` followed by every handshake byte so far::

    early      = HKDF(salt=SHA256(PROTOCOL), ikm=psk, info="early")
    binder     = HMAC(HKDF(salt=SHA256(PROTOCOL), ikm=psk, info="binder"),
                      "initiator hello" | H(HELLO without binder))
    r_finished = HMAC(HKDF(salt=early, ikm=dh, info="responder finished" | H2),
                      "responder finished" | H2)        H2 = H(HELLO, REPLY without MAC)
    i_finished = HMAC(HKDF(salt=early, ikm=dh, info="initiator finished" | H3),
                      "initiator finished" | H3)        H3 = H(HELLO, REPLY, FINISH prefix)
    send/recv  = HKDF(salt=early, ikm=dh, info="initiator to responder" | Ht)
                 HKDF(salt=early, ikm=dh, info="responder to initiator" | Ht)
                                                        Ht = H(HELLO, REPLY, FINISH)

What each message proves.  HELLO's binder proves the initiator holds the
key, but not that it is live (a recording replays); the responder answers
nothing to a HELLO that fails it, so a stranger learns nothing.  REPLY's MAC
covers the initiator's fresh nonce and ephemeral key under a key that needs
both ``psk`` and ``dh``: the responder holds the key and is live now.  FINISH
covers the responder's fresh nonce and ephemeral key: the initiator holds
the key and is live now.  A replayed recording fails at FINISH (the
responder's nonce and ``e_r`` are new, and ``dh`` needs the initiator's
ephemeral private key, which was never stored); a message reflected back to
its sender fails on its type and, whatever type it is given, on its MAC,
because every MAC key and MAC input is bound to the role that made it.  The
traffic keys depend on ``dh``, so a key stolen later does not open a
recorded session (forward secrecy), and on ``psk``, so an active attacker
without the key cannot get them.

The responder buffers at most one message (``HELLO_BYTES``) before the
initiator has authenticated, and checks the prefix byte by byte as it
arrives: the old unauthenticated protocol (whose stream header starts with
eight 0xFF bytes and "RMUS") is refused at its first byte.
"""

from __future__ import annotations

import abc
import hashlib
import hmac
import os
import struct
from dataclasses import dataclass, field
from typing import Callable, Optional

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from remus.errors import AuthenticationFailed, LocalProtocolError

#: The first four bytes of every handshake message.
MAGIC = b"RMLK"
#: The handshake and sealed-frame version this module speaks.
VERSION = 1
#: Message types (the sixth byte of each message).
HELLO, REPLY, FINISH = 1, 2, 3
#: The name of the protocol, hashed into every transcript and key.
PROTOCOL = b"remus link v1: TLS 1.3 PSK-DHE shape, X25519, HKDF-SHA256, HMAC-SHA256, ChaCha20-Poly1305"

NONCE_BYTES = 32
PUBLIC_BYTES = 32
MAC_BYTES = 32
KEY_BYTES = 32
_PREFIX = struct.Struct(">4sBBH")
PREFIX_BYTES = _PREFIX.size
HELLO_BYTES = PREFIX_BYTES + NONCE_BYTES + PUBLIC_BYTES + MAC_BYTES  # 104
REPLY_BYTES = HELLO_BYTES  # 104
FINISH_BYTES = PREFIX_BYTES + MAC_BYTES  # 40
#: The old protocol's stream header starts with this (``IHDR_MARKER``, then "RMUS").
OLD_STREAM_START = b"\xff" * 8 + b"RMUS"
#: Keys shorter than this are refused (``remus.link.keys.MIN_KEY_BYTES``).
MIN_PSK_BYTES = 32

Random = Callable[[int], bytes]


@dataclass(frozen=True)
class LinkKeys:
    """What a finished handshake gives one side: its two traffic keys and the transcript hash.

    ``send_key`` seals what this side sends, ``recv_key`` opens what it
    receives; the peer's pair is the same two keys swapped.
    ``transcript_hash`` (SHA-256 of the whole handshake) is the same on both
    sides and names the session in logs.  The keys never appear in ``repr``.
    """

    send_key: bytes = field(repr=False)
    recv_key: bytes = field(repr=False)
    transcript_hash: bytes


# --------------------------------------------------------------------------- key schedule


def _prefix(kind: int) -> bytes:
    return _PREFIX.pack(MAGIC, VERSION, kind, 0)


def _transcript(*parts: bytes) -> bytes:
    digest = hashlib.sha256(PROTOCOL)
    for part in parts:
        digest.update(part)
    return digest.digest()


def _hkdf(ikm: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=salt, info=info).derive(ikm)


def _mac(key: bytes, label: bytes, transcript: bytes) -> bytes:
    return hmac.new(key, label + transcript, hashlib.sha256).digest()


class _Schedule:
    """The keys one handshake derives, in the order they become known."""

    def __init__(self, psk: bytes) -> None:
        if len(psk) < MIN_PSK_BYTES:
            raise LocalProtocolError(f"link key of {len(psk)} bytes; at least {MIN_PSK_BYTES} are needed")
        protocol_hash = hashlib.sha256(PROTOCOL).digest()
        self.early = _hkdf(psk, protocol_hash, b"early")
        self.binder_key = _hkdf(psk, protocol_hash, b"binder")
        self.dh = b""

    def binder(self, hello_body: bytes) -> bytes:
        return _mac(self.binder_key, b"initiator hello", _transcript(hello_body))

    def finished(self, role: bytes, transcript: bytes) -> bytes:
        return _mac(_hkdf(self.dh, self.early, role + transcript), role, transcript)

    def traffic(self, direction: bytes, transcript: bytes) -> bytes:
        return _hkdf(self.dh, self.early, direction + transcript)


def _ephemeral(rng: Random) -> tuple[X25519PrivateKey, bytes]:
    private = X25519PrivateKey.from_private_bytes(rng(32))
    public = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return private, public


def _exchange(private: X25519PrivateKey, peer_public: bytes, who: str) -> bytes:
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError:  # a low-order point: the shared secret would be all zeros
        raise AuthenticationFailed(f"{who} sent an invalid ephemeral key") from None


_R_FINISHED = b"responder finished"
_I_FINISHED = b"initiator finished"
_I_TO_R = b"initiator to responder"
_R_TO_I = b"responder to initiator"


# --------------------------------------------------------------------------- message reader


class _Reader:
    """Collects exactly one fixed-size message, checking its prefix byte by byte."""

    def __init__(self, who: str, kind: int, size: int, expected: str, hint: str = "") -> None:
        self.who = who
        self.hint = hint
        self.kind = kind
        self.size = size
        self.expected = expected
        self.buffer = bytearray()

    @property
    def needed(self) -> int:
        return self.size - len(self.buffer)

    def feed(self, data: bytes) -> bytes:
        """Take what the message still needs from ``data``; return the rest."""
        take = data[: self.needed]
        start = len(self.buffer)
        self.buffer += take
        self._check_prefix(start)
        return data[len(take) :]

    def _check_prefix(self, start: int) -> None:
        got = bytes(self.buffer[:PREFIX_BYTES])
        if start >= PREFIX_BYTES or not got:
            return
        if not MAGIC.startswith(got[:4]):
            if OLD_STREAM_START.startswith(got[: len(OLD_STREAM_START)]):
                raise AuthenticationFailed(
                    f"{self.who} speaks the old unauthenticated remus protocol: run this remus version on "
                    f"both hosts and give them the same key (remus-keygen, then scp -p)"
                )
            raise AuthenticationFailed(f"{self.who} did not start a remus link handshake (bad magic {got[:4]!r})")
        if len(got) > 4 and got[4] != VERSION:
            raise AuthenticationFailed(
                f"{self.who} speaks remus link version {got[4]}, this host version {VERSION}: "
                f"run the same remus version on both hosts"
            )
        if len(got) > 5 and got[5] != self.kind:
            raise AuthenticationFailed(
                f"{self.who} sent handshake message type {got[5]} "
                f"where its {self.expected} (type {self.kind}) was due"
            )
        if len(got) > 6 and any(got[6:8]):
            raise AuthenticationFailed(f"{self.who} set reserved bits in its {self.expected}")

    @property
    def complete(self) -> bool:
        return len(self.buffer) == self.size

    def cut(self) -> AuthenticationFailed:
        return AuthenticationFailed(
            f"{self.who} closed the connection during the handshake "
            f"({len(self.buffer)} of the {self.size} bytes of its {self.expected}){self.hint}"
        )


class _Side(abc.ABC):
    """What both roles share: the state, the outgoing bytes, the failure that ended it."""

    _reader: Optional[_Reader]

    def __init__(self, key: bytes, rng: Random) -> None:
        self._schedule = _Schedule(key)
        self._rng = rng
        self._outgoing = b""
        self._result: Optional[LinkKeys] = None
        self._failure: Optional[AuthenticationFailed] = None
        self.unused_data = b""
        """Bytes that arrived after the handshake's last message (sealed frames): feed them to the Opener."""

    @property
    def done(self) -> bool:
        """True once the peer has authenticated and ``result`` is ready."""
        return self._result is not None

    @property
    def failed(self) -> bool:
        return self._failure is not None

    @property
    def bytes_needed(self) -> int:
        """How many more bytes the message being read needs (0 when none is awaited).

        A blocking caller that reads at most this many never reads past the
        handshake.
        """
        return self._reader.needed if self._reader is not None and not self.failed else 0

    @property
    def result(self) -> LinkKeys:
        """The traffic keys.

        Raises:
            LocalProtocolError: the handshake is not done (a caller's bug).
        """
        if self._result is None:
            raise LocalProtocolError("the link handshake has not finished")
        return self._result

    def data_to_send(self) -> bytes:
        """The bytes to send to the peer now (and forget); ``b""`` when there are none."""
        data, self._outgoing = self._outgoing, b""
        return data

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the peer; ``b""`` means the peer closed its side.

        Raises:
            AuthenticationFailed: the peer failed a check, or closed before the
                handshake ended; every later call raises it again.
            LocalProtocolError: called after the handshake is done.
        """
        if self._failure is not None:
            raise self._failure
        if self._result is not None:
            raise LocalProtocolError("the link handshake is done: feed further bytes to the Opener")
        try:
            self._receive(data)
        except AuthenticationFailed as exc:
            self._failure = exc
            self._reader = None
            raise

    def _receive(self, data: bytes) -> None:
        reader = self._reader
        if reader is None:
            raise LocalProtocolError("the initiator's start() must come first")
        if not data:
            raise reader.cut()
        rest = reader.feed(data)
        if reader.complete:
            self._message(bytes(reader.buffer), rest)
        elif rest:
            raise AssertionError("a reader left bytes before its message was complete")

    @abc.abstractmethod
    def _message(self, message: bytes, rest: bytes) -> None:
        """Act on a complete message; ``rest`` is what arrived after it."""


class Initiator(_Side):
    """The primary's side: ``start()`` gives HELLO; REPLY in, FINISH out, then ``done``.

    ``rng`` (default ``os.urandom``) supplies the nonce and the ephemeral
    private key; tests pass a seeded one to replay a case exactly.
    """

    def __init__(self, key: bytes, rng: Random = os.urandom) -> None:
        super().__init__(key, rng)
        self._reader = None
        self._hello = b""
        self._private: Optional[X25519PrivateKey] = None

    def start(self) -> bytes:
        """HELLO, the first message (send it at once).

        Raises:
            LocalProtocolError: called twice.
        """
        if self._hello:
            raise LocalProtocolError("the link handshake was already started")
        self._private, public = _ephemeral(self._rng)
        body = _prefix(HELLO) + self._rng(NONCE_BYTES) + public
        self._hello = body + self._schedule.binder(body)
        self._reader = _Reader(
            "the backup", REPLY, REPLY_BYTES, "reply",
            ": it does not hold this host's key (see its log), or runs an older remus-receiver",
        )
        return self._hello

    def _message(self, reply: bytes, rest: bytes) -> None:
        assert self._private is not None
        body, mac = reply[:-MAC_BYTES], reply[-MAC_BYTES:]
        peer_public = body[PREFIX_BYTES + NONCE_BYTES :]
        self._schedule.dh = _exchange(self._private, peer_public, "the backup")
        self._private = None
        h2 = _transcript(self._hello, body)
        if not hmac.compare_digest(mac, self._schedule.finished(_R_FINISHED, h2)):
            raise AuthenticationFailed(
                "the backup does not hold this host's key (its reply fails the check): "
                "give both hosts the same key file (remus-keygen, then scp -p)"
            )
        finish_prefix = _prefix(FINISH)
        h3 = _transcript(self._hello, reply, finish_prefix)
        finish = finish_prefix + self._schedule.finished(_I_FINISHED, h3)
        self._outgoing += finish
        ht = _transcript(self._hello, reply, finish)
        self._result = LinkKeys(
            self._schedule.traffic(_I_TO_R, ht), self._schedule.traffic(_R_TO_I, ht), ht
        )
        self.unused_data = rest
        self._reader = None


class Responder(_Side):
    """The backup's side: HELLO in, REPLY out, FINISH in, then ``done``.

    Nothing is sent unless HELLO carries a valid binder, and nothing beyond
    one message is buffered.  ``rng`` as for ``Initiator``.
    """

    def __init__(self, key: bytes, rng: Random = os.urandom) -> None:
        super().__init__(key, rng)
        self._reader = _Reader("the primary", HELLO, HELLO_BYTES, "hello")
        self._hello = b""
        self._reply = b""

    def _message(self, message: bytes, rest: bytes) -> None:
        if not self._hello:
            self._on_hello(message, rest)
        else:
            self._on_finish(message, rest)

    def _on_hello(self, hello: bytes, rest: bytes) -> None:
        body, binder = hello[:-MAC_BYTES], hello[-MAC_BYTES:]
        if not hmac.compare_digest(binder, self._schedule.binder(body)):
            raise AuthenticationFailed(
                "the primary does not hold this host's key (its hello fails the check): "
                "give both hosts the same key file (remus-keygen, then scp -p)"
            )
        if rest:
            raise AuthenticationFailed("the primary sent data after its hello, before this host's reply")
        private, public = _ephemeral(self._rng)
        self._schedule.dh = _exchange(private, body[PREFIX_BYTES + NONCE_BYTES :], "the primary")
        reply_body = _prefix(REPLY) + self._rng(NONCE_BYTES) + public
        h2 = _transcript(hello, reply_body)
        self._reply = reply_body + self._schedule.finished(_R_FINISHED, h2)
        self._hello = hello
        self._outgoing += self._reply
        self._reader = _Reader("the primary", FINISH, FINISH_BYTES, "handshake confirmation")

    def _on_finish(self, finish: bytes, rest: bytes) -> None:
        h3 = _transcript(self._hello, self._reply, finish[:PREFIX_BYTES])
        if not hmac.compare_digest(finish[PREFIX_BYTES:], self._schedule.finished(_I_FINISHED, h3)):
            raise AuthenticationFailed(
                "the primary's handshake confirmation fails the check: a replayed or altered handshake"
            )
        ht = _transcript(self._hello, self._reply, finish)
        self._result = LinkKeys(
            self._schedule.traffic(_R_TO_I, ht), self._schedule.traffic(_I_TO_R, ht), ht
        )
        self.unused_data = rest
        self._reader = None

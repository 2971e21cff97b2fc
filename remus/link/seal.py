"""Sealed frames: the bytes of one direction of the link, encrypted and authenticated, sans I/O.

``Sealer`` turns plaintext into frames, ``Opener`` turns frames back into
plaintext; neither touches a socket or a clock.  Each direction has its own
key (from the handshake, ``remus.link.handshake.LinkKeys``) and its own
Sealer/Opener pair.

Theory of operation.  A frame is::

    header  u32 big-endian: bit 31 FINAL, bits 0-30 the plaintext length (at most frame_max)
    body    ChaCha20-Poly1305(key, nonce, plaintext, associated data = header): ciphertext | 16-byte tag

The nonce is 32 zero bits followed by the frame's number in this direction
as a big-endian u64, counted from 0 on both sides and never sent (the
construction of TLS 1.3 and WireGuard).  So a frame that was altered
(header or body), injected (no key), replayed, reordered, dropped, or taken
from the other direction (other key) fails its tag, and the Opener refuses
it and every byte after it.  A header announcing more than ``frame_max``
bytes is refused before anything of its body is buffered.

The FINAL frame (no plaintext) says the sender ended the stream in order;
``Opener.peer_closed`` tells whether it came.  An EOF inside a frame is a
cut and raises; an EOF between frames without FINAL is reported by
``peer_closed`` being false (the replication stream's own CLOSE record and
COMMITs say what was complete).

``NullSealer``/``NullOpener`` frame the same way with no cryptography (no
tag, no secrecy, no integrity): they exist only so ``tests/bench/seal.py``
can measure what sealing costs, and no command-line option reaches them.
"""

from __future__ import annotations

import abc
import struct
from typing import Optional, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from remus.errors import AuthenticationFailed, LocalProtocolError

#: The largest plaintext in one frame; longer plaintexts are split.  64 KiB keeps every
#: buffer below glibc's mmap threshold (1 MiB frames cost page faults worth as much CPU as
#: the cipher: see tests/bench/seal.py), while the 20 bytes of framing stay 0.03 %.
FRAME_MAX = 64 << 10
HEADER = struct.Struct(">I")
HEADER_BYTES = HEADER.size
TAG_BYTES = 16
FINAL = 1 << 31
_LENGTH_MASK = FINAL - 1
#: After this many frames a direction's nonces would repeat; the sender refuses instead.
MAX_FRAMES = 1 << 64


class FrameSealer(Protocol):
    """What ``SealedLink`` needs from a sealer (``Sealer`` or ``NullSealer``)."""

    def seal(self, plaintext: bytes) -> bytes: ...

    def seal_frames(self, plaintext: bytes) -> list[bytes]: ...

    def final(self) -> bytes: ...


class FrameOpener(Protocol):
    """What ``SealedLink`` needs from an opener (``Opener`` or ``NullOpener``)."""

    @property
    def peer_closed(self) -> bool: ...

    def receive_data(self, data: bytes) -> list[bytes]: ...


def _nonce(counter: int) -> bytes:
    return b"\0\0\0\0" + counter.to_bytes(8, "big")


class _Framer(abc.ABC):
    """Splits plaintext into frames and numbers them; subclasses protect the body."""

    def __init__(self, frame_max: int) -> None:
        if not 0 < frame_max <= _LENGTH_MASK:
            raise LocalProtocolError(f"frame_max {frame_max} is out of range")
        self.frame_max = frame_max
        self.frames = 0
        self._finished = False

    def seal(self, plaintext: bytes) -> bytes:
        """``plaintext`` as one or more frames (``b""`` for an empty plaintext: nothing to send).

        Raises:
            LocalProtocolError: after ``final()``, or after ``MAX_FRAMES`` frames.
        """
        frames = self.seal_frames(plaintext)
        return frames[0] if len(frames) == 1 else b"".join(frames)

    def seal_frames(self, plaintext: bytes) -> list[bytes]:
        """Like ``seal``, one bytes object per frame (none for an empty plaintext), to send in order."""
        step = self.frame_max
        if len(plaintext) <= step:
            return [self._frame(0, bytes(plaintext))] if plaintext else []
        return [self._frame(0, bytes(plaintext[start : start + step])) for start in range(0, len(plaintext), step)]

    def final(self) -> bytes:
        """The FINAL frame: the stream ends here, in order.  Nothing may be sealed after it."""
        frame = self._frame(FINAL, b"")
        self._finished = True
        return frame

    def _frame(self, flags: int, chunk: bytes) -> bytes:
        if self._finished:
            raise LocalProtocolError("sealing after the final frame")
        if self.frames >= MAX_FRAMES:
            raise LocalProtocolError("this direction has used every nonce: open a new link")
        header = HEADER.pack(flags | len(chunk))
        body = self._protect(self.frames, header, chunk)
        self.frames += 1
        return header + body

    @abc.abstractmethod
    def _protect(self, counter: int, header: bytes, chunk: bytes) -> bytes:
        """The body of frame ``counter`` carrying ``chunk`` under ``header``."""


class Sealer(_Framer):
    """Seals one direction's plaintext with ChaCha20-Poly1305 under ``key`` (32 bytes)."""

    def __init__(self, key: bytes, frame_max: int = FRAME_MAX) -> None:
        super().__init__(frame_max)
        self._aead = ChaCha20Poly1305(key)

    def _protect(self, counter: int, header: bytes, chunk: bytes) -> bytes:
        return self._aead.encrypt(_nonce(counter), chunk, header)


class NullSealer(_Framer):
    """BENCHMARK ONLY: frames like ``Sealer`` with no encryption and no tag."""

    def __init__(self, frame_max: int = FRAME_MAX) -> None:
        super().__init__(frame_max)

    def _protect(self, counter: int, header: bytes, chunk: bytes) -> bytes:
        return chunk


class _Unframer(abc.ABC):
    """Collects frames from a byte stream, bounds them, and hands each body to ``_unprotect``.

    A frame's body is gathered as views of the received chunks and joined
    once, when it is complete: one copy per byte however the stream was cut.
    """

    _TAG = 0

    def __init__(self, frame_max: int) -> None:
        if not 0 < frame_max <= _LENGTH_MASK:
            raise LocalProtocolError(f"frame_max {frame_max} is out of range")
        self.frame_max = frame_max
        self.frames = 0
        self._header = bytearray()
        self._word: Optional[int] = None  # the header of the frame being read, once whole
        self._pieces: list[memoryview] = []
        self._have = 0
        self._need = 0
        self._peer_closed = False
        self._failure: Optional[AuthenticationFailed] = None

    @property
    def peer_closed(self) -> bool:
        """True once the peer's FINAL frame has been opened."""
        return self._peer_closed

    @property
    def buffered(self) -> int:
        """Bytes held for a frame not yet complete (never more than one frame)."""
        return len(self._header) + self._have

    def receive_data(self, data: bytes) -> list[bytes]:
        """Feed bytes from the peer (``b""`` for EOF); return the plaintexts of the complete frames.

        Raises:
            AuthenticationFailed: a frame failed (altered, injected, replayed,
                reordered, over the bound, data after FINAL) or EOF cut a frame;
                nothing this call opened is returned (not even the frames before
                the bad one), and every later call raises it again.
        """
        if self._failure is not None:
            raise self._failure
        try:
            return self._receive(data)
        except AuthenticationFailed as exc:
            self._failure = exc
            self._header, self._pieces, self._have = bytearray(), [], 0
            raise

    def _receive(self, data: bytes) -> list[bytes]:
        if not data:
            if self.buffered:
                raise AuthenticationFailed(
                    f"the peer's stream was cut inside a sealed frame ({self.buffered} bytes of it arrived)"
                )
            return []
        if self._peer_closed:
            raise AuthenticationFailed("the peer sent data after its final sealed frame")
        view = memoryview(data if type(data) is bytes else bytes(data))  # views must not change under us
        pos = 0
        out: list[bytes] = []
        while pos < len(view) or self._word is not None:
            if self._word is None:
                pos = self._take_header(view, pos)
                if self._word is None:
                    break
            take = min(self._need - self._have, len(view) - pos)
            if take:
                self._pieces.append(view[pos : pos + take])
                self._have += take
                pos += take
            if self._have < self._need:
                break
            word, plaintext = self._open_frame()
            if word & FINAL:
                self._peer_closed = True
                if pos < len(view):
                    raise AuthenticationFailed("the peer sent data after its final sealed frame")
                break
            out.append(plaintext)
        return out

    def _take_header(self, view: memoryview, pos: int) -> int:
        take = min(HEADER_BYTES - len(self._header), len(view) - pos)
        self._header += view[pos : pos + take]
        if len(self._header) == HEADER_BYTES:
            (word,) = HEADER.unpack(self._header)
            length = word & _LENGTH_MASK
            if length > self.frame_max or (word & FINAL and length):
                raise AuthenticationFailed(
                    f"a sealed frame header announces {length} bytes (final={word >> 31}), over the bound of "
                    f"{self.frame_max}: the stream is corrupt or forged"
                )
            self._word = word
            self._need = length + self._TAG
        return pos + take

    def _open_frame(self) -> tuple[int, bytes]:
        assert self._word is not None
        word, header = self._word, bytes(self._header)
        body = bytes(self._pieces[0]) if len(self._pieces) == 1 else b"".join(self._pieces)
        self._header, self._word, self._pieces, self._have, self._need = bytearray(), None, [], 0, 0
        plaintext = self._unprotect(self.frames, header, body)
        self.frames += 1
        return word, plaintext

    @abc.abstractmethod
    def _unprotect(self, counter: int, header: bytes, body: bytes) -> bytes:
        """The plaintext of frame ``counter``, or ``AuthenticationFailed``."""


class Opener(_Unframer):
    """Opens one direction's frames sealed by a ``Sealer`` under the same ``key``."""

    _TAG = TAG_BYTES

    def __init__(self, key: bytes, frame_max: int = FRAME_MAX) -> None:
        super().__init__(frame_max)
        self._aead = ChaCha20Poly1305(key)

    def _unprotect(self, counter: int, header: bytes, body: bytes) -> bytes:
        try:
            return self._aead.decrypt(_nonce(counter), body, header)
        except InvalidTag:
            raise AuthenticationFailed(
                f"sealed frame {counter} fails authentication: altered, injected, replayed, reordered or "
                f"cut short on the way, or sealed with another key"
            ) from None


class NullOpener(_Unframer):
    """BENCHMARK ONLY: reads ``NullSealer`` frames; checks nothing but the framing."""

    def __init__(self, frame_max: int = FRAME_MAX) -> None:
        super().__init__(frame_max)

    def _unprotect(self, counter: int, header: bytes, body: bytes) -> bytes:
        return body

"""The link over real sockets: ``initiate``/``respond`` on loopback TCP, and ``SealedLink``."""

from __future__ import annotations

import socket
import threading
from typing import Callable, Optional

import pytest

from remus.errors import AuthenticationFailed, RemusError, TransportError
from remus.link.blocking import SealedLink, initiate, respond, send_all
from remus.link.handshake import Initiator, Responder
from remus.link.seal import Sealer
from remus.stream.records import StreamHeader
from tests.helpers import LINK_KEY

OTHER_KEY = bytes(range(1, 65))


class Peer(threading.Thread):
    """Runs ``serve(conn)`` on the first connection to a listener on 127.0.0.1; keeps its result or error."""

    def __init__(self, serve: Callable[[socket.socket], object]) -> None:
        super().__init__(daemon=True)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.serve = serve
        self.result: object = None
        self.error: Optional[BaseException] = None
        self.start()

    def run(self) -> None:
        conn, _addr = self.listener.accept()
        with conn:
            try:
                self.result = self.serve(conn)
            except RemusError as exc:
                self.error = exc

    def finish(self) -> None:
        self.join(timeout=30)
        assert not self.is_alive()
        self.listener.close()


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=30)


def read_until_eof(conn: socket.socket, link: SealedLink) -> list[bytes]:
    got: list[bytes] = []
    while True:
        data = conn.recv(65536)
        got += link.receive_data(data)
        if not data:
            return got


def test_a_sealed_session_over_tcp_both_ways() -> None:
    def backup(conn: socket.socket) -> list[bytes]:
        link = respond(conn, LINK_KEY, timeout_s=30)
        got = read_until_eof(conn, link)
        link.send(conn, b"ACK " + str(len(got)).encode())
        link.send_final(conn)
        assert link.peer_closed
        return got

    peer = Peer(backup)
    with connect(peer.port) as sock:
        link = initiate(sock, LINK_KEY, timeout_s=30)
        assert sock.gettimeout() == 30  # restored
        messages = [bytes([n]) * (n * 1000) for n in range(1, 40)]
        for message in messages:
            link.send(sock, message)
        link.send_final(sock)
        sock.shutdown(socket.SHUT_WR)
        assert read_until_eof(sock, link) == [b"ACK 39"]
        assert link.peer_closed
    peer.finish()
    assert peer.error is None and peer.result == messages


def test_writes_from_two_threads_never_interleave() -> None:
    """Heartbeats from one thread, checkpoints from another: every frame opens, each thread's in order."""

    def backup(conn: socket.socket) -> list[bytes]:
        return read_until_eof(conn, respond(conn, LINK_KEY, timeout_s=30))

    peer = Peer(backup)
    with connect(peer.port) as sock:
        link = initiate(sock, LINK_KEY, timeout_s=30)

        def writer(tag: bytes, size: int) -> None:
            for n in range(200):
                link.send(sock, tag + b"%04d" % n + b"." * size)

        threads = [threading.Thread(target=writer, args=(b"H", 10)),
                   threading.Thread(target=writer, args=(b"C", 70_000))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        sock.shutdown(socket.SHUT_WR)
        peer.finish()
    assert peer.error is None and isinstance(peer.result, list)
    stream = b"".join(peer.result)  # a message may span frames; each must arrive whole, uninterrupted
    sizes = {b"H": 5 + 10, b"C": 5 + 70_000}
    seen: dict[bytes, list[bytes]] = {b"H": [], b"C": []}
    at = 0
    while at < len(stream):
        tag = stream[at : at + 1]
        message = stream[at : at + sizes[tag]]
        assert message[5:] == b"." * (sizes[tag] - 5)
        seen[tag].append(message[1:5])
        at += sizes[tag]
    for tag in (b"H", b"C"):
        assert seen[tag] == [b"%04d" % n for n in range(200)]


def test_a_primary_with_the_wrong_key_is_refused_on_both_sides() -> None:
    peer = Peer(lambda conn: respond(conn, LINK_KEY, timeout_s=30))
    with connect(peer.port) as sock:
        with pytest.raises(AuthenticationFailed, match="the backup closed the connection during the handshake"):
            initiate(sock, OTHER_KEY, timeout_s=30)
    peer.finish()
    assert isinstance(peer.error, AuthenticationFailed) and "does not hold this host's key" in str(peer.error)


def test_an_old_receiver_is_named_as_such() -> None:
    def old_receiver(conn: socket.socket) -> None:
        conn.sendall(StreamHeader().encode())
        conn.recv(1024)

    peer = Peer(old_receiver)
    with connect(peer.port) as sock:
        with pytest.raises(AuthenticationFailed, match="old unauthenticated remus protocol"):
            initiate(sock, LINK_KEY, timeout_s=30)
    peer.finish()


def test_an_old_primary_is_refused_by_the_backup() -> None:
    peer = Peer(lambda conn: respond(conn, LINK_KEY, timeout_s=30))
    with connect(peer.port) as sock:
        sock.sendall(StreamHeader().encode())
        assert sock.recv(1024) == b""  # not a byte back
    peer.finish()
    assert isinstance(peer.error, AuthenticationFailed) and "old unauthenticated" in str(peer.error)


def test_a_silent_peer_runs_into_the_deadline() -> None:
    done = threading.Event()

    def silent(conn: socket.socket) -> None:
        done.wait(30)

    peer = Peer(silent)
    with connect(peer.port) as sock:
        with pytest.raises(TransportError, match=r"did not complete the link handshake within 0.2 s"):
            initiate(sock, LINK_KEY, timeout_s=0.2)
    done.set()
    peer.finish()


def test_a_primary_that_stalls_after_its_hello_runs_into_the_backups_deadline() -> None:
    peer = Peer(lambda conn: respond(conn, LINK_KEY, timeout_s=0.2))
    with connect(peer.port) as sock:
        sock.sendall(Initiator(LINK_KEY).start())
        assert len(sock.recv(1024)) > 0  # the reply; then the primary says nothing more
        peer.finish()
    assert isinstance(peer.error, TransportError) and "within 0.2 s" in str(peer.error)


def test_frames_pipelined_behind_the_finish_reach_the_opener() -> None:
    initiator, responder = Initiator(LINK_KEY), Responder(LINK_KEY)
    responder.receive_data(initiator.start())
    initiator.receive_data(responder.data_to_send())
    early = Sealer(initiator.result.send_key).seal(b"sent at once")
    responder.receive_data(initiator.data_to_send() + early)
    link = SealedLink.from_keys(responder.result, responder.unused_data)
    assert link.receive_data(b"") == [b"sent at once"]
    assert link.session_id == responder.result.transcript_hash[:8].hex()


def test_the_unsealed_link_is_plain_framing() -> None:
    sender, receiver = SealedLink.unsealed(), SealedLink.unsealed()
    wire = sender.seal(b"benchmark only")
    assert b"benchmark only" in wire
    assert receiver.receive_data(wire) == [b"benchmark only"]


@pytest.mark.parametrize("sealed", [True, False])
def test_the_benchmarks_pipeline_commits_every_checkpoint(sealed: bool) -> None:
    """tests/bench/seal.py's transfer, small: a primary with the key replicates through a BackupSession."""
    from tests.bench.seal import encoded_stream, one_transfer

    opening, checkpoints, _payload = encoded_stream(256, 32, 3, compression=True, seed=4)
    wall_s, cpu_s = one_transfer(opening, checkpoints, sealed)  # raises unless all 4 checkpoints committed
    assert wall_s > 0 and cpu_s >= 0


class TrickleSocket:
    """A socket whose sendmsg writes at most ``step`` bytes a call, as a blocking socket with a timeout may."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.written = bytearray()
        self.calls = 0

    def sendmsg(self, buffers: list[memoryview]) -> int:
        self.calls += 1
        data = b"".join(bytes(b) for b in buffers)[: self.step]
        self.written += data
        return len(data)


@pytest.mark.parametrize("step", [1, 7, 1000, 10**6])
def test_send_all_writes_every_byte_in_order_whatever_sendmsg_takes(step: int) -> None:
    buffers = [b"a" * 5, b"", b"b" * 1500, b"c", b"d" * 300]
    sock = TrickleSocket(step)
    send_all(sock, buffers)  # type: ignore[arg-type]
    assert bytes(sock.written) == b"".join(buffers)
    assert sock.calls == -(-len(sock.written) // step)

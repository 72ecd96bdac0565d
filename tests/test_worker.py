"""service/worker.py's client socket, in-process: what a request thread writes arrives
whole, and a client that stops reading ends the write within the socket's timeout."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from service.worker import TimeoutSocket


@pytest.fixture
def pair():
    """A TimeoutSocket with a small send buffer, in blocking (timeout) mode, and its peer."""
    ours, peer = socket.socketpair()
    sock = TimeoutSocket(ours.family, ours.type, ours.proto, fileno=ours.detach())
    sock.io_timeout = 0.5
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    sock.setblocking(True)
    yield sock, peer
    sock.close()
    peer.close()


def test_a_write_larger_than_the_socket_buffer_reaches_a_slow_reader_whole(pair):
    sock, peer = pair
    data = os.urandom(1 << 20)
    received = bytearray()

    def read_slowly() -> None:
        while len(received) < len(data):
            time.sleep(0.001)
            chunk = peer.recv(32768)
            if not chunk:
                return
            received.extend(chunk)

    reader = threading.Thread(target=read_slowly)
    reader.start()
    sock.sendall(data)  # the first os.write fills the buffer, the rest waits for the reader
    reader.join(10)
    assert bytes(received) == data


def test_a_small_write_arrives_in_one_piece(pair):
    sock, peer = pair
    sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
    assert peer.recv(1024) == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"


def test_a_client_that_stops_reading_is_a_broken_pipe_after_the_timeout(pair):
    sock, _ = pair
    started = time.monotonic()
    with pytest.raises(BrokenPipeError):
        sock.sendall(b"x" * (4 << 20))
    assert 0.4 < time.monotonic() - started < 5


def test_a_client_that_went_away_is_a_broken_pipe_at_once(pair):
    sock, peer = pair
    peer.close()
    with pytest.raises(BrokenPipeError):
        sock.sendall(b"x" * 100)

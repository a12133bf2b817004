"""bench/delay_proxy.py, the latency bench's stand-in for netem: bytes arrive whole, in order, late.

No sshd: an echo server on 127.0.0.1 behind the proxy, which runs on its own event loop thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.util
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

PROXY_FILE = Path(__file__).resolve().parent.parent / "bench" / "delay_proxy.py"
TIMEOUT = 10.0


def _load_proxy_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("delay_proxy", PROXY_FILE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["delay_proxy"] = module  # dataclass-free, but asyncio callbacks name their module
    spec.loader.exec_module(module)
    return module


delay_proxy = _load_proxy_module()


def _echo_server() -> tuple[socket.socket, threading.Thread]:
    """Echoes every connection until its client half-closes, then closes (one thread per client)."""
    listener = socket.create_server(("127.0.0.1", 0))

    def echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=echo, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    return listener, thread


def _run_proxy(target: int, delay: float) -> Iterator[int]:
    loop = asyncio.new_event_loop()
    proxy = delay_proxy.Proxy(target, delay)
    port = loop.run_until_complete(proxy.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield port
    finally:
        loop.call_soon_threadsafe(proxy.close)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(TIMEOUT)
        loop.close()


@pytest.fixture
def echo_port() -> Iterator[int]:
    listener, thread = _echo_server()
    yield int(listener.getsockname()[1])
    listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); close() alone would not
    listener.close()
    thread.join(TIMEOUT)


@pytest.fixture
def proxy_40ms(echo_port: int) -> Iterator[int]:
    yield from _run_proxy(echo_port, 0.040)


@pytest.fixture
def proxy_no_delay(echo_port: int) -> Iterator[int]:
    yield from _run_proxy(echo_port, 0.0)


def _round_trip(sock: socket.socket, payload: bytes) -> bytes:
    sock.sendall(payload)
    received = b""
    while len(received) < len(payload):
        chunk = sock.recv(65536)
        assert chunk, "the proxy closed the connection mid-reply"
        received += chunk
    return received


def test_a_round_trip_through_the_proxy_takes_at_least_twice_its_one_way_delay(proxy_40ms: int) -> None:
    with socket.create_connection(("127.0.0.1", proxy_40ms), timeout=TIMEOUT) as sock:
        _round_trip(sock, b"warm")  # the proxy's own connect to the target is not part of a round trip
        trips = []
        for _ in range(3):
            started = time.monotonic()
            assert _round_trip(sock, b"ping") == b"ping"
            trips.append(time.monotonic() - started)
    # the lower bound is the behaviour (the delay is applied in both directions); the upper bound
    # only says the delay is not applied several times over, with room for a loaded machine
    assert min(trips) >= 0.079
    assert min(trips) < 0.080 * 4


def test_many_small_writes_arrive_in_order_and_whole_through_a_delayed_proxy(proxy_40ms: int) -> None:
    pieces = [f"{index:06d};".encode() for index in range(3000)]
    with socket.create_connection(("127.0.0.1", proxy_40ms), timeout=TIMEOUT) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for piece in pieces:
            sock.sendall(piece)  # thousands of separate segments, each queued with its own due time
        received = b""
        expected = b"".join(pieces)
        while len(received) < len(expected):
            chunk = sock.recv(65536)
            assert chunk
            received += chunk
    assert received == expected


def test_twenty_megabytes_pass_intact_through_the_proxy_without_delay(proxy_no_delay: int) -> None:
    payload = os.urandom(20 * 1024 * 1024)
    with socket.create_connection(("127.0.0.1", proxy_no_delay), timeout=TIMEOUT) as sock:
        sender = threading.Thread(target=sock.sendall, args=(payload,))
        sender.start()
        digest = hashlib.sha256()
        received = 0
        while received < len(payload):
            chunk = sock.recv(1 << 20)
            assert chunk
            digest.update(chunk)
            received += len(chunk)
        sender.join(TIMEOUT)
    assert digest.digest() == hashlib.sha256(payload).digest()


def test_a_half_close_reaches_the_server_after_the_data_and_its_reply_still_comes_back(proxy_40ms: int) -> None:
    with socket.create_connection(("127.0.0.1", proxy_40ms), timeout=TIMEOUT) as sock:
        sock.sendall(b"last words")
        sock.shutdown(socket.SHUT_WR)  # the echo server answers, then sees EOF and closes
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    assert received == b"last words"


def test_a_client_of_a_proxy_whose_target_is_gone_sees_the_connection_end() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = int(probe.getsockname()[1])  # bound, never listening: connecting is refused
        for port in _run_proxy(dead_port, 0.010):
            with (socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock,
                  contextlib.suppress(ConnectionResetError)):  # a reset is also an end
                assert sock.recv(1) == b""

"""A userspace TCP proxy on 127.0.0.1 that adds a fixed one-way delay in each direction.

    python bench/delay_proxy.py --target PORT --delay-ms 40 [--listen-port 0]

prints ``listening on 127.0.0.1:PORT`` once it accepts, then forwards every connection to
127.0.0.1:TARGET until killed (SIGTERM/SIGINT). A round trip through it costs ``2 x delay``: what
``tc qdisc ... netem delay`` would add, without netem (not on this machine, and not to be used).

How: one asyncio loop, one connection to the target per accepted client. Each direction keeps a
queue of (due time, bytes) in arrival order and writes the head when it is due, so order is
preserved and every chunk is held ``delay`` seconds. TCP_NODELAY on both sockets (a small reply is
not held back by Nagle). With delay 0 a chunk is written at once (no queue, no timer).

What it does not model: the loopback TCP between the endpoints and the proxy has no delay, so
TCP's own congestion window and receive window do not feel the RTT (on a real 80 ms path a 6 MiB
TCP window caps a stream at ~75 MB/s). What is held in flight per direction is capped at
``--window`` (default 32 MiB): beyond it the proxy stops reading that side, as a full TCP window
would. SSH's channel windows *are* modelled, since their window adjustments travel through the
proxy like everything else.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import signal
import socket
import sys
from typing import Any

HOST = "127.0.0.1"
DEFAULT_WINDOW = 32 * 1024 * 1024
EOF = b""  # queued when the source half-closed (data_received never gives empty bytes)


class Direction:
    """One way of one connection: bytes from ``source`` reach ``sink`` ``delay`` seconds later."""

    def __init__(self, loop: asyncio.AbstractEventLoop, delay: float, window: int) -> None:
        self.loop = loop
        self.delay = delay
        self.window = window
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self.queued = 0
        self.timer: asyncio.TimerHandle | None = None
        self.source: asyncio.Transport | None = None
        self.sink: asyncio.Transport | None = None
        self.sink_paused = False
        self.source_paused = False

    def push(self, data: bytes) -> None:
        if self.delay <= 0 and not self.queue and self.sink is not None:
            self._write(data)
            return
        self.queue.append((self.loop.time() + self.delay, data))
        self.queued += len(data)
        self._throttle()
        if self.timer is None and self.sink is not None:
            self._schedule()

    def connect_sink(self, sink: asyncio.Transport) -> None:
        self.sink = sink
        if self.queue:
            self._schedule()

    def _schedule(self) -> None:
        self.timer = self.loop.call_at(self.queue[0][0], self._flush)

    def _flush(self) -> None:
        self.timer = None
        now = self.loop.time()
        while self.queue and self.queue[0][0] <= now:
            _, data = self.queue.popleft()
            self.queued -= len(data)
            self._write(data)
        self._throttle()
        if self.queue:
            self._schedule()

    def _write(self, data: bytes) -> None:
        assert self.sink is not None
        if self.sink.is_closing():
            return
        if not data:  # EOF: pass the half-close on once everything before it is out
            if self.sink.can_write_eof():
                self.sink.write_eof()
            else:
                self.sink.close()
            return
        self.sink.write(data)

    def _throttle(self) -> None:
        """Stop reading the source while the window is full or the sink cannot keep up."""
        if self.source is None:
            return
        full = self.queued >= self.window or self.sink_paused
        if full and not self.source_paused:
            self.source_paused = True
            with contextlib.suppress(RuntimeError):
                self.source.pause_reading()
        elif not full and self.source_paused:
            self.source_paused = False
            with contextlib.suppress(RuntimeError):
                self.source.resume_reading()

    def set_sink_paused(self, paused: bool) -> None:
        self.sink_paused = paused
        self._throttle()


def _nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Side(asyncio.Protocol):
    """One socket of a proxied connection: what it reads goes into ``outgoing``; ``incoming`` writes to it."""

    def __init__(self, outgoing: Direction, incoming: Direction, on_lost: Any) -> None:
        self.outgoing = outgoing
        self.incoming = incoming
        self.on_lost = on_lost
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        _nodelay(transport)
        self.transport = transport
        self.outgoing.source = transport
        self.incoming.connect_sink(transport)

    def data_received(self, data: bytes) -> None:
        self.outgoing.push(data)

    def eof_received(self) -> bool:
        self.outgoing.push(EOF)
        return True  # keep our writing half open: the other direction may still be sending

    def pause_writing(self) -> None:
        self.incoming.set_sink_paused(True)

    def resume_writing(self) -> None:
        self.incoming.set_sink_paused(False)

    def connection_lost(self, exc: Exception | None) -> None:
        self.on_lost(self)


class Proxy:
    """Accepts on 127.0.0.1:``listen_port`` and relays to 127.0.0.1:``target`` with ``delay`` each way."""

    def __init__(self, target: int, delay: float, *, window: int = DEFAULT_WINDOW) -> None:
        self.target = target
        self.delay = delay
        self.window = window
        self.server: asyncio.AbstractServer | None = None
        self.port = 0
        self.connecting: set[asyncio.Task[None]] = set()  # the loop keeps only weak references

    async def start(self, listen_port: int = 0) -> int:
        self.server = await asyncio.get_running_loop().create_server(self._accept, HOST, listen_port)
        self.port = int(self.server.sockets[0].getsockname()[1])
        return self.port

    def _accept(self) -> Side:
        loop = asyncio.get_running_loop()
        up, down = Direction(loop, self.delay, self.window), Direction(loop, self.delay, self.window)
        sides: list[Side] = []

        def lost(side: Side) -> None:
            # one side gone: the other closes once what is queued towards it has been written
            other = sides[1] if side is sides[0] else sides[0]
            towards_other = up if other is sides[1] else down
            if other.transport is not None and not other.transport.is_closing():
                loop.call_at(loop.time() + self.delay, _close_when_drained, towards_other, other.transport)

        client = Side(up, down, lost)
        sides.append(client)
        upstream = Side(down, up, lost)
        sides.append(upstream)
        task = loop.create_task(self._connect(upstream, client))
        self.connecting.add(task)
        task.add_done_callback(self.connecting.discard)
        return client

    async def _connect(self, upstream: Side, client: Side) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.create_connection(lambda: upstream, HOST, self.target)
        except OSError:
            if client.transport is not None:
                client.transport.abort()  # the client sees a reset, as it would without us
            return
        if client.transport is None or client.transport.is_closing():
            upstream.on_lost(client)  # the client left while we connected

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


def _close_when_drained(direction: Direction, transport: asyncio.Transport) -> None:
    if direction.queue:
        direction.loop.call_later(0.01, _close_when_drained, direction, transport)
    else:
        transport.close()


async def serve(target: int, delay: float, listen_port: int, window: int) -> None:
    proxy = Proxy(target, delay, window=window)
    port = await proxy.start(listen_port)
    print(f"listening on {HOST}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    proxy.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", type=int, required=True, help="port on 127.0.0.1 to forward to")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay, each direction (RTT = 2x)")
    parser.add_argument("--listen-port", type=int, default=0, help="port on 127.0.0.1 to accept on (0: any)")
    parser.add_argument("--window", type=int, default=DEFAULT_WINDOW, help="bytes held in flight per direction")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.target, args.delay_ms / 1000.0, args.listen_port, args.window))
    return 0


if __name__ == "__main__":
    sys.exit(main())

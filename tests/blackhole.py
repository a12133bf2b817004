"""A TCP proxy on 127.0.0.1 that can go silent: the network outage TCP does not notice.

Wi-Fi roaming, a sleeping NAT or a VPN re-key drop packets without a reset: both ends keep their
connections and hear nothing. ``Blackhole(port)`` forwards 127.0.0.1:<its port> to
127.0.0.1:<port>; ``silence()`` stops forwarding in both directions and stops accepting (new
connections wait in the listen backlog, as SYNs to a dead path are retried), without closing
anything; ``restore()`` lets everything flow again, including what was held. A thread per
direction of each connection; everything is closed by ``close()``.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from types import TracebackType

CHUNK = 65536


class Blackhole:
    def __init__(self, target_port: int, host: str = "127.0.0.1") -> None:
        self.target = (host, target_port)
        self._listener = socket.create_server((host, 0))
        self.port: int = self._listener.getsockname()[1]
        self._open = threading.Event()
        self._open.set()
        self._closed = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._accept, name="blackhole-accept", daemon=True)]
        self._threads[0].start()

    def silence(self) -> None:
        self._open.clear()

    def restore(self) -> None:
        self._open.set()

    def close(self) -> None:
        self._closed = True
        self._open.set()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in [self._listener, *sockets]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in self._threads:
            thread.join(timeout=5)

    def __enter__(self) -> Blackhole:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._closed:
            self._open.wait()
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self._open.wait()  # accepted just as the path went silent: hold it
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                thread = threading.Thread(target=self._forward, args=(source, sink), daemon=True,
                                          name="blackhole-forward")
                self._threads.append(thread)
                thread.start()

    def _forward(self, source: socket.socket, sink: socket.socket) -> None:
        while not self._closed:
            self._open.wait()
            try:
                data = source.recv(CHUNK)
            except OSError:
                data = b""
            if not data:
                with contextlib.suppress(OSError):
                    sink.shutdown(socket.SHUT_WR)
                return
            self._open.wait()  # read just as the path went silent: deliver it after
            try:
                sink.sendall(data)
            except OSError:
                return

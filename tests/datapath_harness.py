"""The data path without SSH: the real agent and the real tunnel, joined by pipes.

The agent runs exactly as an SSH session runs it (``python -S -c BOOTSTRAP N`` reading the agent
program and the BOOT frame from stdin: bootstrap.agent_input), as a subprocess of the test's own
Python; its stdin/stdout/stderr pipes are the uplink an SSH exec channel would be. A reattach is
a second such session in ``attach`` mode (the agent's splice to ``agent.sock``), as after a real
drop. The kernel is a stand-in (FAKE_KERNEL): five Unix sockets on the connection file's IPC
paths that echo every byte back, so what a client sends must come back exactly once and in order.

``Faulty`` sits between the tunnel and an uplink and injects faults: a cut (the link dies: reads
see EOF, writes fail, the agent sees its stdin close), a truncated write or read followed by a
cut, duplicated frames and delays. ``PipeUplink(deliver=True)`` emulates paramiko's transport
thread (ssh.ExecChannel.deliver_to), so the tunnel's fast path is exercised too.
"""

from __future__ import annotations

import contextlib
import os
import queue
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest

from remote_kernel import bootstrap, connection
from remote_kernel import protocol as P
from remote_kernel.tunnel import Attached, Crashed, Event, Exited, LinkLost, Ready, Tunnel

E = TypeVar("E", Ready, Attached, LinkLost, Exited)
WAIT = 15.0  # seconds any single step may take on a loaded machine before the test fails

# The kernel: stdlib only, started by the agent with the connection file as argv[1]. Every
# connection echoes what it receives (blocking sends: a client that stops reading stops it, which
# is what flow control must handle). On the stdin channel, b"exit:<n>" makes it exit with code n.
FAKE_KERNEL = r"""
import json, os, socket, sys, threading, time
info = json.load(open(sys.argv[1]))
def echo(conn, port):
    try:
        while True:
            data = conn.recv(65536)
            if not data:
                break
            if port == 3 and data.startswith(b"exit:"):
                os._exit(int(data[5:]))
            conn.sendall(data)
    except OSError:
        pass
    finally:
        conn.close()
def serve(listener, port):
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=echo, args=(conn, port), daemon=True).start()
for port in range(1, 6):
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind("%s-%d" % (info["ip"], port))
    listener.listen(64)
    threading.Thread(target=serve, args=(listener, port), daemon=True).start()
sys.stderr.write("fake kernel listening\n")
sys.stderr.flush()
parent = int(os.environ["JPY_PARENT_PID"])
while os.getppid() == parent:
    time.sleep(0.1)
"""


def session(request: dict[str, Any]) -> subprocess.Popen[bytes]:
    """A process running what an SSH session runs, its stdin already holding program and BOOT."""
    payload = bootstrap.agent_payload()
    proc = subprocess.Popen(
        [sys.executable, "-S", "-c", bootstrap.BOOTSTRAP, str(len(payload))],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    assert proc.stdin is not None
    os.write(proc.stdin.fileno(), bootstrap.agent_input(request))  # small: the pipe takes it
    return proc


class PipeUplink:
    """A session's pipes as ssh.ExecChannel presents them to the tunnel. With ``deliver``, a
    reader thread stands in for paramiko's transport thread: stdout goes to the tunnel's sink
    as it arrives, and ``fileno`` is a separate pipe made readable at EOF (as a channel's is)."""

    def __init__(self, proc: subprocess.Popen[bytes], *, deliver: bool = False) -> None:
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        self.proc = proc
        self._in, self._out, self._err = proc.stdin.fileno(), proc.stdout.fileno(), proc.stderr.fileno()
        os.set_blocking(self._err, False)
        self._stderr = b""
        self._closed = False
        self._deliver = deliver
        self._sink: Callable[[bytes], None] | None = None
        self._buffer = bytearray()
        self._eof = False
        self._guard = threading.Lock()
        self._delivering = threading.Lock()  # the sink gets stdout in order, as from paramiko's tap
        self.released = 0
        # Applied to stdout as it is read, by the one thread that reads it (Faulty's faults).
        self.transform: Callable[[bytes], bytes] | None = None
        if deliver:
            self._signal_r, self._signal_w = os.pipe()
            os.set_blocking(self._signal_r, False)
            self._reader = threading.Thread(target=self._transport, name="fake-transport", daemon=True)
            self._reader.start()
        else:
            os.set_blocking(self._out, False)

    def fileno(self) -> int:
        return self._signal_r if self._deliver else self._out

    def recv(self, n: int) -> bytes:
        if not self._deliver:
            data = os.read(self._out, n)
            if data and self.transform is not None:
                data = self.transform(data)
                if not data:
                    raise BlockingIOError("only part of a frame so far")
            return data
        with self._guard:
            if self._buffer:
                data = bytes(self._buffer[:n])
                del self._buffer[:n]
                return data
            if self._eof:
                return b""
        raise BlockingIOError("no stdout data buffered")

    def recv_stderr_ready(self) -> bool:
        if not self._stderr:
            with contextlib.suppress(BlockingIOError, OSError, ValueError):
                self._stderr = os.read(self._err, 65536)
        return bool(self._stderr)

    def recv_stderr(self, n: int) -> bytes:
        data, self._stderr = self._stderr, b""
        return data

    def sendall(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._in, view):]

    def deliver_to(self, sink: Callable[[bytes], None]) -> bool:
        if not self._deliver:
            return False
        with self._delivering:
            with self._guard:
                self._sink = sink
                backlog, self._buffer = bytes(self._buffer), bytearray()
            if backlog:
                sink(backlog)
        return True

    def release(self, consumed: int) -> None:
        self.released += consumed

    def can_send_now(self, size: int) -> bool:
        return not self._closed

    def exit_status(self) -> int | None:
        return self.proc.poll()

    def close_input(self) -> None:
        """The session's stdin closes: what the remote end sees when the connection dies."""
        with contextlib.suppress(OSError):
            self.proc.stdin.close()  # type: ignore[union-attr]

    def close(self) -> None:
        """Close our ends. With a reader thread, stdout is left to it (closed at EOF, which the
        closed stdin brings): closed here, its number could be reused by the next session's
        pipe while the thread still reads it, and steal that session's bytes."""
        if self._closed:
            return
        self._closed = True
        self.close_input()
        for stream in (self.proc.stderr,) if self._deliver else (self.proc.stdout, self.proc.stderr):
            with contextlib.suppress(OSError):
                stream.close()  # type: ignore[union-attr]

    def dispose(self) -> None:
        """After the tunnel is closed and the session ended: the reader thread and the wake-up
        pipe the pump watched."""
        if self._deliver:
            self._reader.join(timeout=WAIT)
            for fd in (self._signal_r, self._signal_w):
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _transport(self) -> None:
        while True:
            try:
                data = os.read(self._out, 65536)
            except OSError:
                data = b""
            eof = not data
            if data and self.transform is not None:
                data = self.transform(data)
            with self._delivering:
                with self._guard:
                    sink = self._sink
                    self._eof = eof
                    if sink is None:
                        self._buffer += data
                if data and sink is not None:
                    sink(data)
                elif eof or data:
                    with contextlib.suppress(OSError):
                        os.write(self._signal_w, b"x")
            if eof:
                with contextlib.suppress(OSError):
                    self.proc.stdout.close()  # type: ignore[union-attr]
                return


class Faulty:
    """An uplink with faults injected, decided by a seeded ``random.Random``:
    ``duplicate`` (probability that a sequenced frame is sent or delivered twice), ``delay``
    (seconds before each write and each read), and ``cut`` / ``truncate_*`` called by the test."""

    def __init__(self, inner: PipeUplink, rng: random.Random, *, duplicate: float = 0.0, delay: float = 0.0) -> None:
        self.inner = inner
        self.rng = rng
        self.duplicate = duplicate
        self.delay = delay
        self.cut_done = False
        self._truncate_send: int | None = None
        self._truncate_recv: int | None = None
        self._garble_recv = False
        self._out_decoder = P.FrameDecoder()
        self._in_decoder = P.FrameDecoder()
        inner.transform = self._incoming

    # faults
    def cut(self) -> None:
        """The link dies: from now reads see EOF and writes fail; the agent's stdin closes."""
        self.cut_done = True
        self.inner.close_input()

    def truncate_next_send(self, keep: int) -> None:
        self._truncate_send = keep

    def truncate_next_recv(self, keep: int) -> None:
        self._truncate_recv = keep

    def garble_next_recv(self) -> None:
        """The next bytes from the agent come after garbage (a corrupt stream, the link still up)."""
        self._garble_recv = True

    # the Uplink protocol
    def fileno(self) -> int:
        return self.inner.fileno()

    def recv(self, n: int) -> bytes:
        if self.cut_done:
            return b""
        return self.inner.recv(n)

    def recv_stderr_ready(self) -> bool:
        return self.inner.recv_stderr_ready()

    def recv_stderr(self, n: int) -> bytes:
        return self.inner.recv_stderr(n)

    def sendall(self, data: bytes) -> None:
        if self.delay:
            time.sleep(self.rng.uniform(0, self.delay))
        if self.cut_done:
            raise BrokenPipeError("the link was cut")
        if self._truncate_send is not None:
            keep, self._truncate_send = min(self._truncate_send, len(data) - 1), None
            self.inner.sendall(data[:keep])
            self.cut()
            raise BrokenPipeError("the link was cut in the middle of a write")
        self.inner.sendall(self._duplicated(self._out_decoder.feed(data)) if self.duplicate else data)

    def deliver_to(self, sink: Callable[[bytes], None]) -> bool:
        return self.inner.deliver_to(sink)

    def release(self, consumed: int) -> None:
        self.inner.release(consumed)

    def can_send_now(self, size: int) -> bool:
        return not self.cut_done and self.inner.can_send_now(size)

    def exit_status(self) -> int | None:
        return -1 if self.cut_done else self.inner.exit_status()  # a dead connection reports none

    def close(self) -> None:
        self.inner.close()

    # helpers
    def _incoming(self, data: bytes) -> bytes:
        """What the tunnel gets of ``data`` (read from the agent's stdout, in order)."""
        if self.cut_done or not data:
            return b""
        if self.delay:
            time.sleep(self.rng.uniform(0, self.delay))
        if self._truncate_recv is not None:
            keep, self._truncate_recv = min(self._truncate_recv, len(data) - 1), None
            self.cut()
            return data[:keep]
        if self._garble_recv:
            self._garble_recv = False
            return b"\xfe" * 32 + data
        return self._duplicated(self._in_decoder.feed(data)) if self.duplicate else data

    def _duplicated(self, frames: list[P.Frame]) -> bytes:
        out = bytearray()
        for kind, sid, seq, payload in frames:
            wire = P.encode(kind, sid, seq, payload)
            out += wire
            if kind not in P.LINK_FRAMES and self.rng.random() < self.duplicate:
                out += wire
        return bytes(out)


class Rig:
    """The launcher's side (a Tunnel on free 127.0.0.1 ports) and an agent session, with the
    events the launcher would handle. Cleans up every process it started, by PID."""

    def __init__(self, *, deliver: bool = False, rng: random.Random | None = None, duplicate: float = 0.0,
                 delay: float = 0.0, grace: float = 30.0, ping: float = 0.5, floor: float = 10.0) -> None:
        self.deliver = deliver
        self.rng = rng or random.Random(0)
        self.duplicate, self.delay = duplicate, delay
        self.grace, self.ping, self.floor = grace, ping, floor
        self.token = secrets.token_hex(16)
        self.base = tempfile.mkdtemp(prefix="rkdp-", dir="/tmp")  # short: IPC paths are limited
        self.events: queue.Queue[Event] = queue.Queue()
        self.seen: list[Event] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self.uplinks: list[PipeUplink] = []
        self.uplink: Faulty | None = None
        self.ready: dict[str, Any] = {}
        self.clients: list[socket.socket] = []
        listeners = connection.bind_listeners(None)
        self.ports = {channel: sock.getsockname()[1] for channel, sock in listeners.items()}
        self.tunnel = Tunnel(listeners, self.events, ping_interval=ping, liveness_floor=floor)

    # ---------------------------------------------------------------- lifecycle

    def start(self, argv: list[str] | None = None) -> dict[str, Any]:
        request = {
            "mode": "start", "name": "fake", "key": "datapath-key", "signature_scheme": "hmac-sha256",
            "argv": argv or ["{python}", "-S", "-c", FAKE_KERNEL, "{connection_file}"], "env": {},
            "token": self.token, "reconnect_grace": self.grace, "startup_timeout": 20.0, "replace": None,
            "runtime_dir": self.base, "output_backlog": None,
        }
        self.uplink = self._uplink(session(request))
        self.tunnel.attach(self.uplink)
        self.tunnel.start()
        self.ready = self.wait_for(Ready).data
        self.confirm()
        return self.ready

    def confirm(self) -> None:
        """Acknowledge what the agent sent and wait until it has taken that in (until then a
        drop makes it give the kernel up: the launcher never knew it)."""
        self.tunnel.acknowledge_now()
        self.echo("hb", b"confirm")

    def reattach(self) -> dict[str, Any]:
        self.attach_session(self.token)
        return self.wait_for(Attached).data

    def attach_session(self, token: str) -> None:
        """A new session in attach mode (the agent's splice), introduced with ``token``."""
        self.uplink = self._uplink(session({"mode": "attach", "dir": self.ready["dir"]}))
        self.tunnel.attach(self.uplink, hello={"token": token})

    def drop(self) -> None:
        """The link dies under both ends; the tunnel notices; a new session reattaches."""
        assert self.uplink is not None
        self.uplink.cut()
        self.wait_for(LinkLost)
        self.reattach()

    def close(self) -> None:
        for client in self.clients:
            client.close()
        with contextlib.suppress(Exception):
            self.tunnel.close()
        for pid in (self.ready.get("kernel_pid"), self.ready.get("agent_pid")):
            if pid:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(int(pid), signal.SIGKILL)
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout=WAIT)
        for uplink in self.uplinks:
            uplink.dispose()
        for proc in self.procs:
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                with contextlib.suppress(OSError):
                    stream.close()  # type: ignore[union-attr]
        shutil.rmtree(self.base, ignore_errors=True)

    def shutdown(self) -> dict[str, Any]:
        """What the launcher does on shutdown: SHUTDOWN, wait for EXITED, acknowledge it."""
        self.tunnel.request_shutdown()
        return self.exited()

    def exited(self) -> dict[str, Any]:
        info = self.wait_for(Exited).data
        self.tunnel.acknowledge_now()
        return info

    def agent_gone(self) -> bool:
        return wait_until(lambda: not _alive(int(self.ready["agent_pid"])))

    # ---------------------------------------------------------------- events and clients

    def wait_for(self, kind: type[E], timeout: float = WAIT) -> E:
        """The next event of ``kind`` (the others are kept in ``seen``); a crash fails the test."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                event = self.events.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            self.seen.append(event)
            if isinstance(event, Crashed):
                raise AssertionError(f"the tunnel crashed: {event.data!r}")  # noqa: TRY004 - a test failure
            if isinstance(event, kind):
                return event
        raise AssertionError(f"no {kind.kind!r} event within {timeout} s; seen: {[e.kind for e in self.seen]}")

    def client(self, channel: str) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.ports[channel]), timeout=WAIT)
        self.clients.append(sock)
        return sock

    def echo(self, channel: str, data: bytes) -> None:
        sock = self.client(channel)
        sock.sendall(data)
        assert read_exactly(sock, len(data)) == data
        sock.close()
        self.clients.remove(sock)

    def _uplink(self, proc: subprocess.Popen[bytes]) -> Faulty:
        self.procs.append(proc)
        self.uplinks.append(PipeUplink(proc, deliver=self.deliver))
        return Faulty(self.uplinks[-1], self.rng, duplicate=self.duplicate, delay=self.delay)


def read_exactly(sock: socket.socket, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        data = sock.recv(min(1 << 20, size - len(chunks)))
        if not data:
            break
        chunks += data
    return bytes(chunks)


def wait_until(condition: Callable[[], bool], timeout: float = WAIT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def _alive(pid: int) -> bool:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        done = 0  # not our child: the agent of a session we started, reparented
    if done:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return _state(pid) != "Z"


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


def pattern(stream: int, size: int) -> bytes:
    """``size`` bytes that name their stream and offset (never starting with 0xFF: iopub relays
    them untouched), so a lost, repeated or reordered chunk shows in a comparison."""
    block = b"".join(b"%02d:%010d;" % (stream % 100, offset) for offset in range(0, size + 14, 14))  # 14-byte blocks
    return block[:size]


@pytest.fixture(name="rig", params=[False, True], ids=["pump-reads", "transport-delivers"])
def rig_fixture(request: pytest.FixtureRequest) -> Iterator[Rig]:
    """A started Rig, once with the pump reading the uplink and once with transport-thread
    delivery (import ``rig_fixture`` into a test module to use ``rig``)."""
    rig = Rig(deliver=request.param)
    try:
        rig.start()
        yield rig
    finally:
        rig.close()

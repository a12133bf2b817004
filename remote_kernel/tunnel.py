"""The local end of the data path.

Listens on the client's ports on 127.0.0.1 (any number of clients per channel), and carries each
client connection as a stream of frames (protocol.py) over one uplink: the stdin/stdout of one
SSH exec channel running the remote agent. Three threads:

- the *pump* runs one poll loop (P.Watcher: epoll/kqueue, no 1024-descriptor limit): accepts
  clients (at most CLIENT_LIMIT per port), reads them, writes clients what they could not take at
  once, sends a client's small request itself when the writer is idle, and checks that the link
  is alive (LIVENESS below);
- the *writer* sequences frames from the outbox (control frames first) and writes them to the
  uplink, whose ``sendall`` blocks when the SSH window is full;
- paramiko's *transport thread* hands the agent's bytes to ``_from_uplink`` as each SSH packet
  is decrypted (ssh.ExecChannel.deliver_to), which parses the frames and writes the clients at
  once: one thread wake-up per reply instead of two. It never sends on the channel: a send may
  wait for a re-key that only this thread can finish, so window grants (``release``) and
  anything else that sends are left to the pump. The pump's state (streams, decoder, receiver)
  is shared with it under ``_work``, which no thread holds while sending on the channel.

Client connections stay open when the uplink drops; ``attach`` joins a new uplink and both ends
re-send what the other has not acknowledged, so a reattach loses nothing. Anything that goes
wrong in a thread is reported as an event (and re-raised by ``close``), never swallowed.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeAlias

from remote_kernel import protocol as P
from remote_kernel.connection import can_see_socket_owners, peer_uid

log = logging.getLogger(__name__)

READ_CHUNK = P.MAX_PAYLOAD
# Take everything paramiko has buffered (up to the channel window, ssh.CHANNEL_WINDOW) in one
# read: a partial read copies the rest of its buffer down (50 MB of output: 0.44 -> 0.41 s).
UPLINK_READ = 16 * 1024 * 1024
RELEASE_STEP = 1024 * 1024  # wake the pump to grant SSH window after this much was delivered
BULK_LIMIT = 4 * 1024 * 1024  # stop reading clients while this much waits in the outbox
WRITE_BATCH = 512 * 1024
DIRECT_LIMIT = 64 * 1024  # a client's frame this small is written by the pump itself when it can
REFUSAL_LOG_INTERVAL = 10.0  # seconds: at most one "refused a connection" warning per interval
FLUSH_TIMEOUT = 2.0
EXIT_STATUS_WAIT = 1.0  # seconds to wait for the exit-status that may follow EOF
CLIENT_LIMIT = 256  # client connections per port; beyond it new ones are closed at once
ACCEPT_BACKOFF = 1.0  # seconds a listener is not watched after EMFILE/ENFILE (it would spin)
# LIVENESS (protocol.Liveness). SSH keepalives notice a silent link after keepalive x 3, TCP after
# minutes; so the pump PINGs every IDLE_PING seconds and declares the link lost when no byte at all
# has come from the agent for the adaptive limit (never below LIVENESS_FLOOR); the launcher
# then reconnects.
IDLE_PING = 2.5
LIVENESS_FLOOR = 10.0


class Uplink(Protocol):
    """What the tunnel needs of an SSH exec channel (ssh.ExecChannel) or a local pipe pair
    (tests/datapath_harness.py). Reads and writes never block the caller on an empty channel:
    ``recv`` raises BlockingIOError when nothing is buffered and returns b"" at EOF."""

    def fileno(self) -> int:
        """Readable when stdout or stderr data, or EOF, arrived."""
        ...

    def recv(self, n: int) -> bytes: ...

    def recv_stderr(self, n: int) -> bytes: ...

    def recv_stderr_ready(self) -> bool: ...

    def sendall(self, data: bytes) -> None:
        """Send everything; may block while the peer's window is full."""
        ...

    def deliver_to(self, sink: Callable[[bytes], None]) -> bool:
        """Hand stdout to ``sink`` as it arrives, on the transport's own thread (False: this
        uplink cannot; the pump reads with ``recv``). The sink never sends on the uplink."""
        ...

    def release(self, consumed: int) -> None:
        """Grant the peer window for ``consumed`` bytes handed to the sink (not from the sink)."""
        ...

    def can_send_now(self, size: int) -> bool:
        """True when ``sendall`` of ``size`` bytes would not wait for window."""
        ...

    def exit_status(self) -> int | None:
        """The remote command's exit status (-1: ended without one), None while it runs."""
        ...

    def close(self) -> None: ...


# What the tunnel reports to the launcher's main thread: one small record per kind.


@dataclass(frozen=True)
class Ready:
    """The agent's READY: the kernel's sockets exist (kernel_pid, agent_pid, dir, python)."""

    data: dict[str, Any]
    kind: ClassVar[str] = "ready"


@dataclass(frozen=True)
class Log:
    """A LOG line from the remote side: the kernel's stdout/stderr, or an agent note."""

    data: str
    kind: ClassVar[str] = "log"


@dataclass(frozen=True)
class Stderr:
    """Text the remote session wrote on its stderr (the setup lines, the bootstrap)."""

    data: str
    kind: ClassVar[str] = "stderr"


@dataclass(frozen=True)
class Exited:
    """The agent's EXITED: the kernel is gone (code, reason, stderr_tail)."""

    data: dict[str, Any]
    kind: ClassVar[str] = "exited"


@dataclass(frozen=True)
class LinkLost:
    """The uplink ended or went silent (``data``: why); the streams wait for a reattach."""

    data: str
    uplink: Uplink
    kind: ClassVar[str] = "link_lost"


@dataclass(frozen=True)
class Attached:
    """The agent's HELLO on a reattach (its state, and what output it had to drop meanwhile)."""

    data: dict[str, Any]
    kind: ClassVar[str] = "attached"


@dataclass(frozen=True)
class Crashed:
    """A tunnel thread failed: ``close`` re-raises it."""

    data: BaseException
    kind: ClassVar[str] = "crashed"


Event: TypeAlias = Ready | Log | Stderr | Exited | LinkLost | Attached | Crashed


class ClientStream(P.StreamFlow):
    """A client connection: its frames' stream id, its channel, and its flow state."""

    def __init__(self, sid: int, channel: str, sock: socket.socket) -> None:
        super().__init__()
        self.sid = sid
        self.channel = channel
        self.sock = sock
        self.closing = False  # the agent closed it: close once ``outbuf`` reached the client
        self.forward = P.forward_port(channel) is not None  # its data goes after the kernel's (Outbox)


class Tunnel:
    def __init__(self, listeners: dict[str, socket.socket], events: queue.Queue[Event], *,
                 ping_interval: float = IDLE_PING, liveness_floor: float = LIVENESS_FLOOR) -> None:
        self._listeners = {sock: channel for channel, sock in listeners.items()}
        self._clients = dict.fromkeys(listeners, 0)  # per channel
        self._accept_paused: dict[socket.socket, float] = {}
        self._refused_logged: set[str] = set()
        self._watcher = P.Watcher()
        self._events = events
        self._ping_interval = ping_interval
        self._live = P.Liveness(liveness_floor, ping_interval, time.monotonic())  # under _work
        self._lock = threading.Condition()
        self._work = threading.RLock()  # see the module docstring
        self._link = P.Link(time.monotonic())
        # The link's parts, by their locks: _lock guards the outbox and sender (the writer
        # thread's), _work the receiver and decoder (the pump's and the transport thread's).
        self._outbox = self._link.outbox
        self._sender = self._link.sender
        self._receiver = self._link.receiver
        self._decoder = self._link.decoder
        self._raw: list[bytes] = []  # link frames and re-sends, written before the outbox
        self._uplink: Uplink | None = None
        self._streams: dict[int, ClientStream] = {}
        self._by_sock: dict[socket.socket, ClientStream] = {}
        self._next_sid = 1
        self._closing: list[socket.socket] = []  # closed by the pump between select rounds
        self._dead_uplinks: list[Uplink] = []  # closed by the pump outside _work (closing sends)
        self._direct: tuple[bytes, Uplink] | None = None  # a request the pump sends after its round
        self._unreleased = 0  # bytes delivered by the transport thread, not yet granted back
        self._wake_pump = False
        self._running = True
        self._sending = False  # the writer thread or the pump is writing to the uplink
        # recv() of 256 KiB allocates (and frees) that much for every small request, ~12 us
        # each (measured): read into one buffer instead.
        self._read_view = memoryview(bytearray(READ_CHUNK))
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)  # a full pipe already wakes the pump: never wait on it
        self._failure: BaseException | None = None
        self._refused = 0  # connections refused by the owner check
        self._refusal_logged = -REFUSAL_LOG_INTERVAL
        self._threads = [
            threading.Thread(target=self._guard, args=(self._pump,), name="rk-pump", daemon=True),
            threading.Thread(target=self._guard, args=(self._writer,), name="rk-writer", daemon=True),
        ]

    # ------------------------------------------------------------------------------ public API

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def attach(self, uplink: Uplink, *, hello: dict[str, Any] | None = None) -> None:
        """Carry the streams over ``uplink``. With ``hello`` (a reattach), introduce ourselves
        and re-send everything the agent has not acknowledged; it drops what it already has."""
        with self._work, self._lock:
            self._uplink = uplink
            self._unreleased = 0
            self._live.restart(time.monotonic())
            if hello is not None:
                self._raw = self._link.resume(hello)
            else:
                self._decoder.reset()
            self._lock.notify_all()
        # Not under _work: the channel hands over its backlog under its own lock, the order the
        # transport thread takes them in. Bytes the pump read before this are handled first.
        uplink.deliver_to(functools.partial(self._from_uplink, uplink))
        self._wake()

    def clients(self) -> int:
        """Clients connected now: each Jupyter client holds one iopub connection."""
        return sum(1 for stream in list(self._streams.values()) if stream.channel == "iopub")

    def add_listener(self, channel: str, sock: socket.socket) -> None:
        """Serve one more local port (a forward, forward.py: ``channel`` is "tcp:<remote port>");
        its clients are checked and carried like the kernel's own."""
        with self._work:
            self._listeners[sock] = channel
            self._clients.setdefault(channel, 0)
        self._wake()

    def acknowledge_now(self) -> None:
        """Confirm everything received (the agent waits for its EXITED to be confirmed)."""
        with self._lock:
            self._raw.append(self._receiver.make_ack())
            self._lock.notify_all()

    def send_signal(self, signum: int) -> None:
        self._put(P.SIGNAL, 0, str(int(signum)).encode())

    def request_shutdown(self) -> None:
        self._put(P.SHUTDOWN, 0)

    def flush(self, timeout: float = FLUSH_TIMEOUT) -> None:
        """Give clients their pending bytes (e.g. the shutdown_reply) before we exit."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(s.outbuf for s in list(self._streams.values())):
            time.sleep(0.02)

    def close_clients(self) -> None:
        """Stop serving here at once: the listeners and every client connection close (as when
        a launcher process is killed), while the uplink stays to deliver what the remote end is
        told next (a stop). The ports are free for a successor at once."""
        with self._work:
            for stream in list(self._streams.values()):
                self._close_stream(stream, tell_peer=True)
            self._closing.extend(self._listeners)
            self._listeners.clear()
        self._wake()

    def close(self) -> None:
        """Stop the threads, close every socket; re-raise what a thread died of."""
        with self._lock:
            self._running = False
            self._lock.notify_all()
        self._wake()
        for thread in self._threads:
            if thread.is_alive() and thread is not threading.current_thread():
                thread.join(timeout=2.0)
        with self._work:
            for stream in list(self._streams.values()):
                stream.sock.close()
            for sock in [*self._listeners, *self._closing]:
                sock.close()
        for uplink in self._take_dead_uplinks():
            with contextlib.suppress(Exception):
                uplink.close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(OSError):
            self._watcher.close()
        if self._failure is not None:
            raise self._failure

    # ------------------------------------------------------------------------------ internals

    def _guard(self, body: Any) -> None:
        try:
            body()
        except BaseException as exc:  # surfaced to the main thread, never lost
            log.debug("tunnel thread %s failed", threading.current_thread().name, exc_info=True)
            self._failure = exc
            self._events.put(Crashed(exc))

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def _put(self, kind: int, sid: int, payload: bytes = b"", background: bool = False) -> None:
        with self._lock:
            self._outbox.put(kind, sid, payload, background)
            self._lock.notify_all()

    def _put_data(self, sid: int, payload: bytes, background: bool = False) -> None:
        """A client's bytes. When the writer thread is idle and the SSH window has room, the pump
        writes the frame itself after its round (``_send_direct``): handing it to the writer cost
        a thread wake-up per request (relay round trip ~300 -> ~270 us measured). Only the pump
        calls this: a signal handler sending on the channel could deadlock on paramiko's lock
        held by the code it interrupted."""
        with self._lock:
            self._outbox.put(P.DATA, sid, payload, background)
            claimed = self._claim_uplink(P.HEADER.size + len(payload))
            if claimed is None:
                self._lock.notify_all()
                return
        self._direct = claimed

    def _send_direct(self, claimed: tuple[bytes, Uplink]) -> None:
        wire, uplink = claimed
        self._send(uplink, wire)
        with self._lock:
            if self._raw or len(self._outbox) or not self._running:
                self._lock.notify_all()

    def _claim_uplink(self, size: int) -> tuple[bytes, Uplink] | None:
        """(Holding the lock) the frame just queued, sequenced, if the pump may send it now: the
        writer is idle, nothing is queued before it, and sending cannot block on the window."""
        uplink = self._uplink
        if uplink is None or self._sending or self._raw or len(self._outbox) != 1 or size > DIRECT_LIMIT:
            return None
        if not uplink.can_send_now(size) or self._sender.unacked_bytes >= P.UNACKED_LIMIT:
            return None
        item = self._link.next_item()
        if item is None:
            return None
        self._sending = True
        return self._sender.sequence(*item), uplink

    def _put_raw(self, wire: bytes) -> None:
        with self._lock:
            self._raw.append(wire)
            self._lock.notify_all()

    # --------------------------------------------------------------------------- writer thread

    def _writer(self) -> None:
        while True:
            with self._lock:
                batch, uplink = self._next_batch()
                if batch is None:
                    return
            self._send(uplink, batch)

    def _send(self, uplink: Uplink, data: bytes) -> None:
        """Write to the uplink (the caller holds the ``_sending`` claim, released here)."""
        try:
            uplink.sendall(data)
        except Exception as exc:  # noqa: BLE001 - any failure of the uplink is a drop
            self._lost(uplink, f"writing to the SSH channel failed: {exc}")
        finally:
            with self._lock:
                self._sending = False

    def _next_batch(self) -> tuple[Any, Any]:
        """Wait (holding the lock) for something to send; None when the tunnel closes.
        Closing still sends pending link frames: the agent waits for the ACK of its EXITED."""
        while True:
            if self._uplink is not None and not self._sending:
                chunks = self._raw
                self._raw = []
                size = sum(len(chunk) for chunk in chunks)
                while self._running and size < WRITE_BATCH and (item := self._link.next_item()) is not None:
                    wire = self._sender.sequence(*item)
                    chunks.append(wire)
                    size += len(wire)
                if chunks:
                    self._sending = True
                    return b"".join(chunks), self._uplink
            if not self._running and not self._sending:
                return None, None
            self._lock.wait()

    def _lost(self, uplink: Uplink, reason: str) -> None:
        with self._lock:
            if self._uplink is not uplink:
                return  # an old uplink failing after a reattach is not news
            self._uplink = None
            self._raw = []
            self._dead_uplinks.append(uplink)  # the pump closes it, holding nothing
        self._events.put(LinkLost(reason, uplink))
        self._wake()

    def _take_dead_uplinks(self) -> list[Uplink]:
        with self._lock:
            dead, self._dead_uplinks = self._dead_uplinks, []
        return dead

    # ----------------------------------------------------------------------------- pump thread

    def _pump(self) -> None:
        while self._running:
            with self._work:
                self._close_sockets()
                self._watcher.update(self._interest())
                uplink = self._uplink
            try:
                events = self._watcher.wait(self._tick())
            except (OSError, ValueError):
                with self._work:
                    self._drop_closed_sockets()
                continue
            if uplink is not None and any(obj is uplink for obj, _ in events):
                self._read_stderr(uplink)  # outside _work: a read may grant window (a send)
            with self._work:
                for obj, mask in events:
                    if mask & P.WRITABLE and (stream := self._by_sock.get(obj)) is not None:
                        self._write_client(stream)
                for obj, mask in events:
                    if mask & P.READABLE:
                        self._on_readable(obj)
                self._timers()
                direct, self._direct = self._direct, None
                consumed, self._unreleased = self._unreleased, 0
            self._after_round(direct, consumed, uplink)

    def _after_round(self, direct: tuple[bytes, Uplink] | None, consumed: int, uplink: Uplink | None) -> None:
        """What sends on the SSH channel, done holding nothing (see the module docstring)."""
        if direct is not None:
            self._send_direct(direct)
        if consumed and uplink is not None:
            try:
                uplink.release(consumed)
            except Exception as exc:  # noqa: BLE001 - any failure of the uplink is a drop
                self._lost(uplink, f"writing to the SSH channel failed: {exc}")
        for dead in self._take_dead_uplinks():
            with contextlib.suppress(Exception):
                dead.close()

    def _close_sockets(self) -> None:
        for sock in self._closing:
            sock.close()
        self._closing.clear()

    def _tick(self) -> float:
        return min(0.25, max(0.01, self._ping_interval / 4))

    def _interest(self) -> dict[int, tuple[Any, int]]:
        """{fd: (object, events)} this round waits for (P.Watcher registers only the changes)."""
        wanted: dict[int, tuple[Any, int]] = {self._wake_r: (self._wake_r, P.READABLE)}
        now = time.monotonic()
        for sock in self._listeners:
            if now >= self._accept_paused.get(sock, 0.0):
                wanted[sock.fileno()] = (sock, P.READABLE)
        uplink = self._uplink
        if uplink is not None:
            wanted[uplink.fileno()] = (uplink, P.READABLE)
        may_read = self._link.may_read_sources(BULK_LIMIT)
        may_read_forwards = self._link.may_read_sources(BULK_LIMIT, background=True)
        for stream in self._streams.values():
            readable = may_read_forwards if stream.forward else may_read
            events = P.READABLE if readable and not stream.peer_paused and not stream.closing else 0
            if stream.outbuf:
                events |= P.WRITABLE
            if events:
                wanted[stream.sock.fileno()] = (stream.sock, events)
        return wanted

    def _on_readable(self, item: Any) -> None:
        if item == self._wake_r:
            with contextlib.suppress(BlockingIOError, OSError):
                os.read(self._wake_r, 4096)
        elif item in self._listeners:
            self._accept(item)
        elif item in self._by_sock:
            self._read_client(self._by_sock[item])
        elif self._uplink is not None and item is self._uplink:
            self._read_stdout(self._uplink)

    def _timers(self) -> None:
        now = time.monotonic()
        uplink = self._uplink
        if uplink is None:
            return
        frame = self._live.ping_if_due(now, self._receiver.received) or self._link.ack_if_due(now)
        if frame is not None:
            self._put_raw(frame)
        silent = self._live.silent_for(now)
        if silent is not None:
            self._lost(uplink, f"link silent for {silent:.0f} s")

    def _drop_closed_sockets(self) -> None:
        for stream in list(self._streams.values()):
            if stream.sock.fileno() < 0:
                self._close_stream(stream, tell_peer=True)

    # ------------------------------------------------------------------------------ clients

    def _accept(self, listener: socket.socket) -> None:
        try:
            sock, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            # Out of descriptors (EMFILE, ENFILE) or buffers: the pending connection keeps the
            # listener readable, so it is not watched for a moment (else the pump spins).
            self._accept_paused[listener] = time.monotonic() + ACCEPT_BACKOFF
            log.warning("cannot accept a connection on %s: %s; pausing %g s",
                        _port_name(self._listeners[listener]), exc.strerror or exc, ACCEPT_BACKOFF)
            return
        channel = self._listeners[listener]
        if self._clients[channel] >= CLIENT_LIMIT:
            sock.close()
            if channel not in self._refused_logged:  # once per burst, not once per connection
                self._refused_logged.add(channel)
                log.warning("refusing connections to %s: %d clients are connected already",
                            _port_name(channel), CLIENT_LIMIT)
            return
        if not self._is_same_user(sock):
            sock.close()
            return
        # Without TCP_NODELAY, Nagle + delayed ACK add ~40 ms to 1-2% of requests (ANCHORS.md).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        stream = ClientStream(self._next_sid, channel, sock)
        self._clients[channel] += 1
        self._next_sid += 1
        self._streams[stream.sid] = stream
        self._by_sock[sock] = stream
        self._put(P.OPEN, stream.sid, stream.channel.encode())

    def _is_same_user(self, sock: socket.socket) -> bool:
        """Only our own user (or root) may use the kernel: another user on this machine could
        otherwise subscribe to iopub and read every output without knowing the key."""
        uid = peer_uid(sock)
        if uid in (os.getuid(), 0):
            return True
        if uid is None and not can_see_socket_owners():
            return True  # no /proc/net/tcp (macOS, BSD): owners cannot be seen, as before; the key guards sending
        owner = "an owner that could not be determined" if uid is None else f"uid {uid}"
        self._refused += 1
        now = time.monotonic()
        if now - self._refusal_logged >= REFUSAL_LOG_INTERVAL:  # a flood must not flood the log
            log.warning("refused a connection to the kernel from %s (only uid %d may connect; %d refused so far)",
                        owner, os.getuid(), self._refused)
            self._refusal_logged = now
        return False

    def _read_client(self, stream: ClientStream) -> None:
        try:
            data = bytes(self._read_view[: stream.sock.recv_into(self._read_view)])
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if data:
            self._put_data(stream.sid, data, stream.forward)
        else:
            self._close_stream(stream, tell_peer=True)

    def _write_client(self, stream: ClientStream) -> None:
        try:
            sent = stream.sock.send(stream.outbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close_stream(stream, tell_peer=True)
            return
        del stream.outbuf[:sent]
        if stream.closing and not stream.outbuf:
            self._close_stream(stream, tell_peer=False)
        elif stream.we_paused and stream.resume_due():
            self._put(P.RESUME, stream.sid)

    def _close_stream(self, stream: ClientStream, *, tell_peer: bool) -> None:
        if self._streams.pop(stream.sid, None) is not None:
            self._clients[stream.channel] -= 1
            self._refused_logged.discard(stream.channel)
        self._by_sock.pop(stream.sock, None)
        # Closed by the pump before its next select: it may be watching this socket right now
        # (when the transport thread closes a stream), and a closed fd's number gets reused.
        self._closing.append(stream.sock)
        self._wake_pump = True
        if tell_peer:
            self._put(P.CLOSE, stream.sid, background=stream.forward)

    # ------------------------------------------------------------------------------ uplink

    def _read_stderr(self, uplink: Uplink) -> None:
        with contextlib.suppress(Exception):
            while uplink.recv_stderr_ready():
                text = uplink.recv_stderr(65536).decode("utf-8", "replace")
                self._events.put(Stderr(text))

    def _read_stdout(self, uplink: Uplink) -> None:
        """Stdout the channel buffered (until deliver_to takes over, or where it cannot), or EOF."""
        try:
            data = uplink.recv(UPLINK_READ)
        except (BlockingIOError, InterruptedError, TimeoutError):
            return
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                return
            data = b""
        except Exception:  # noqa: BLE001 - ssh.SSHError and friends: the link is gone
            data = b""
        if not data:
            # sshd may send the command's exit-status just after EOF; closing the channel first
            # loses it (paramiko then reports -1), and the launcher needs it to say what failed.
            _await_exit_status(uplink, EXIT_STATUS_WAIT)
            self._lost(uplink, "the SSH channel closed")
            return
        self._live.received(time.monotonic())
        try:
            for frame in self._decoder.feed(data):
                self._on_frame(frame)
        except P.ProtocolError as exc:
            self._corrupt(uplink, exc)

    def _corrupt(self, uplink: Uplink, exc: P.ProtocolError) -> None:
        """A stream that stopped making sense: before the agent's first frame it is the remote
        login printing (the launcher says so); later it ends this connection, never the kernel:
        the reattach re-sends whole frames from both ends, as after any drop (the agent does the
        same with a corrupt launcher stream)."""
        if self._receiver.received == 0:
            raise exc
        log.warning("the agent's stream is corrupt (%s): reconnecting", exc)
        self._lost(uplink, f"the agent's stream is corrupt ({exc})")

    def _from_uplink(self, uplink: Uplink, data: bytes) -> None:
        """(paramiko's transport thread) One SSH packet of the agent's output: parse and deliver
        it now. Wakes the pump only when it has something to do: window to grant, a client that
        could not take everything, a socket to close, a stream to read again."""
        try:
            with self._work:
                if self._uplink is not uplink or not self._running:
                    return  # an old link's last packets: the agent re-sends them on reattach
                self._wake_pump = False
                self._live.received(time.monotonic())
                before = self._unreleased
                self._unreleased += len(data)
                for frame in self._decoder.feed(data):
                    self._on_frame(frame)
                wake = self._wake_pump or before < RELEASE_STEP <= self._unreleased  # once per grant
        except P.ProtocolError as exc:
            try:
                self._corrupt(uplink, exc)
            except P.ProtocolError:
                self._failure = exc
                self._events.put(Crashed(exc))
            return
        except BaseException as exc:  # never into paramiko's thread: it would end the connection
            log.debug("delivering the agent's output failed", exc_info=True)
            self._failure = exc
            self._events.put(Crashed(exc))
            return
        if wake:
            self._wake()

    def _on_frame(self, frame: P.Frame) -> None:
        kind, sid, seq, payload = frame
        if kind in P.LINK_FRAMES:
            with self._lock:
                self._sender.acknowledge(seq)
                self._lock.notify_all()
            self._wake_pump = True  # the acknowledgement may let it read clients again
            if kind == P.PONG:
                self._live.pong(time.monotonic())
            elif kind == P.HELLO:
                self._events.put(Attached(_json_object(payload)))
            return
        if not self._receiver.accept(seq, len(payload)):
            return
        handler = _FRAME_HANDLERS.get(kind)
        if handler is not None:
            handler(self, sid, payload)

    def _on_data(self, sid: int, payload: bytes) -> None:
        stream = self._streams.get(sid)
        if stream is None:
            return
        was_empty = not stream.outbuf
        stream.outbuf += payload
        # A small reply is written at once (saves a select round). Bulk output is left to the pump,
        # which writes whatever the client can take when it can: written from here, a 50 MB
        # print took 0.38 s in some runs and 0.7-1.8 s in others, with sshd's CPU up 5-10x.
        if was_empty and len(payload) <= DIRECT_LIMIT:
            self._write_client(stream)
        if was_empty and stream.outbuf:
            self._wake_pump = True  # to watch the client for writing
        if stream.pause_due():
            self._put(P.PAUSE, sid)

    def _on_close(self, sid: int, payload: bytes) -> None:
        stream = self._streams.get(sid)
        if stream is not None and stream.outbuf:
            stream.closing = True  # what came before the CLOSE (an HTTP answer) still reaches the client
            self._wake_pump = True
        elif stream is not None:
            self._close_stream(stream, tell_peer=False)

    def _on_pause(self, sid: int, payload: bytes) -> None:
        if (stream := self._streams.get(sid)) is not None:
            stream.peer_says(P.PAUSE)

    def _on_resume(self, sid: int, payload: bytes) -> None:
        if (stream := self._streams.get(sid)) is not None:
            stream.peer_says(P.RESUME)
            self._wake_pump = True



def _port_name(channel: str) -> str:
    port = P.forward_port(channel)
    return f"the forward to remote port {port}" if port is not None else f"the kernel's {channel} port"


def _await_exit_status(uplink: Uplink, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with contextlib.suppress(Exception):
        while uplink.exit_status() is None and time.monotonic() < deadline:
            time.sleep(0.02)


def _json_object(payload: bytes) -> dict[str, Any]:
    """A frame's JSON object ({} for anything else: the launcher reads fields with .get)."""
    value = P.decode_json(payload)
    return value if isinstance(value, dict) else {}


def _on_ready(tunnel: Tunnel, sid: int, payload: bytes) -> None:
    tunnel._events.put(Ready(_json_object(payload)))


def _on_log(tunnel: Tunnel, sid: int, payload: bytes) -> None:
    tunnel._events.put(Log(payload.decode("utf-8", "replace")))


def _on_exited(tunnel: Tunnel, sid: int, payload: bytes) -> None:
    tunnel._events.put(Exited(_json_object(payload)))


_FRAME_HANDLERS: dict[int, Callable[[Tunnel, int, bytes], None]] = {
    P.DATA: Tunnel._on_data,
    P.CLOSE: Tunnel._on_close,
    P.PAUSE: Tunnel._on_pause,
    P.RESUME: Tunnel._on_resume,
    P.READY: _on_ready,
    P.LOG: _on_log,
    P.EXITED: _on_exited,
}


if TYPE_CHECKING:  # mypy holds the SSH channel to the Uplink protocol (no import at run time)
    from remote_kernel.ssh import ExecChannel

    def _an_exec_channel_is_an_uplink(channel: ExecChannel) -> Uplink:
        return channel

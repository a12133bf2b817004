"""The remote end of the data path: the kernel's nanny. Python 3.8+, standard library only.

Started by the launcher's SSH session (``start`` mode), after stage one (spawn.py) has
- made a private 0700 directory under /tmp/remote-kernel-<uid>/ and written the kernel's 0600
  connection file there with IPC endpoints it chose itself (nothing to collide with on a shared
  login node, and nothing another user can connect to: the traffic never touches TCP);
- started the kernel as the leader of its own process group, with JPY_PARENT_PID set so the kernel
  exits by itself if this process dies;
it
- relays the kernel's five channels as byte streams over its stdin/stdout (protocol.py);
- outlives the SSH session: when the uplink drops it holds the kernel-side connections open for a
  lease of ``reconnect_grace`` seconds, waiting for the launcher to reattach through ``agent.sock``
  (``attach`` mode runs a plain splice between a new session and that socket); when the lease runs
  out it kills the kernel's process group and removes its directory.
The HMAC key and the reattach token arrive on stdin, never in argv.
"""

from __future__ import annotations

import collections
import errno
import json
import os
import select
import signal
import socket
import sys
import time

from remote_kernel import protocol as P
from remote_kernel.remote.spawn import (
    AGENT_SOCKET,
    AgentError,
    KernelProcess,
    Started,
    base_dir,
    is_our_dir,
    write_private,
)

TYPE_CHECKING = False  # typing costs ~2 ms of the agent's start; annotations are strings
if TYPE_CHECKING:
    from typing import Any, Deque, Dict, List, Optional

READ_CHUNK = 256 * 1024
UPLINK_CHUNK = 1024 * 1024
WIRE_LOW_WATER = 512 * 1024  # refill the uplink buffer from the outbox below this
BULK_LIMIT = 4 * 1024 * 1024  # stop reading kernel sockets while this much awaits sequencing
LOOP_TICK = 0.25  # seconds: how often timers (lease, kernel exit, startup) are checked
# While the kernel starts, look for its sockets this often: at LOOP_TICK the launcher waited
# ~0.07 s longer for the first reply (bench/README.md).
STARTING_TICK = 0.01
KERNEL_POLL_INTERVAL = 0.02  # seconds: a busy loop checks the kernel process (waitpid) no more often
KILL_GRACE = 3.0  # seconds between SIGTERM and SIGKILL of the kernel's group
STDERR_TAIL_LINES = 40
ALLOWED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGKILL, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
AGENT_INFO = "agent.json"
AGENT_MARKER = "remote-kernel-agent"  # in the bootstrap (bootstrap.py), hence in our argv


# --------------------------------------------------------------------------------------- streams


class Stream:
    """One client connection of the launcher, mirrored by a connection to the kernel's socket."""

    def __init__(self, sid: int, channel: str, sock: Optional[socket.socket]) -> None:
        self.sid = sid
        self.channel = channel
        self.sock = sock
        self.outbuf = bytearray()
        self.peer_paused = False  # the launcher asked us not to send this stream's data
        self.we_paused = False  # we asked the launcher to hold this stream's data


class Agent:
    def __init__(self, config: Dict[str, Any]) -> None:
        self.config = config
        self.name = str(config.get("name", "kernel"))
        self.token = str(config["token"])
        self.grace = float(config.get("reconnect_grace", 300))
        self.startup_timeout = float(config.get("startup_timeout", 60))
        self.dir = ""
        self.kernel: Optional[KernelProcess] = None
        self.state = "starting"  # starting -> ready -> exiting -> exited
        self.exit_info: Dict[str, Any] = {}
        self.kill_deadline = 0.0
        self.started_at = time.monotonic()
        self.started_wall = time.time()
        self.detached_wall: Optional[float] = None
        self.streams: Dict[int, Stream] = {}
        self.outbox = P.Outbox()
        self.sender = P.ReliableSender()
        self.receiver = P.ReliableReceiver()
        self.decoder = P.FrameDecoder()
        self.wire = bytearray()
        self.uplink_r: Optional[int] = 0
        self.uplink_w: Optional[int] = 1
        self.uplink_sock: Optional[socket.socket] = None
        self.last_rx = time.monotonic()
        self.last_ack = time.monotonic()
        self.listener: Optional[socket.socket] = None
        self.candidates: Dict[socket.socket, P.FrameDecoder] = {}
        self.pipes: Dict[int, str] = {}
        self.tail: Deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self.partial: Dict[int, bytes] = {}
        self.terminate_requested = False
        self.replaced = False  # a restart's new launcher took our place: nobody will reattach
        self.last_kernel_poll = 0.0
        # Reads land in buffers allocated once: os.read/recv of 256 KiB-1 MiB allocate and free
        # that much for every small message, ~12 us each (measured), on every hop of every reply.
        self.read_view = memoryview(bytearray(READ_CHUNK))
        self.uplink_view = memoryview(bytearray(UPLINK_CHUNK))

    # ----------------------------------------------------------------------------- lifecycle

    def run(self, started: Started) -> int:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # outlive the SSH session
        signal.signal(signal.SIGTERM, self._on_sigterm)
        for fd in (0, 1):
            os.set_blocking(fd, False)
        self.dir, self.kernel = started.dir, started.kernel
        if started.error:
            self._fail_startup(started.error)
        else:
            try:
                self._adopt_kernel()
            except (AgentError, OSError) as exc:
                self._fail_startup(str(exc))  # _cleanup stops the kernel
        for frame in self.decoder.feed(started.leftover):
            self._handle_frame(frame)
        try:
            while not self._finished():
                self._step()
        finally:
            self._cleanup()
        return 0

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self.terminate_requested = True

    def _adopt_kernel(self) -> None:
        """Set up around the kernel stage one started: its output pipes, agent.sock, agent.json."""
        assert self.kernel is not None
        for fd, label in ((self.kernel.stdout, "stdout"), (self.kernel.stderr, "stderr")):
            os.set_blocking(fd, False)
            self.pipes[fd] = label
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(os.path.join(self.dir, AGENT_SOCKET))
        self.listener.listen(4)
        self.listener.setblocking(False)
        self._write_info()

    def _write_info(self) -> None:
        """agent.json: what `remote-kernel ps` / `gc` show and act on (no secrets in it)."""
        if not self.dir:
            return
        info = {
            "name": self.name, "agent_pid": os.getpid(), "kernel_pid": self.kernel.pid if self.kernel else None,
            "started": self.started_wall, "grace": self.grace, "python": sys.executable,
            "attached": self.uplink_r is not None, "detached_at": self.detached_wall,
        }
        path = os.path.join(self.dir, AGENT_INFO)
        try:
            os.unlink(path + ".tmp")
        except OSError:
            pass
        write_private(path + ".tmp", json.dumps(info).encode())
        os.replace(path + ".tmp", path)

    def _fail_startup(self, message: str) -> None:
        self.state = "exited"
        self.exit_info = {"code": None, "reason": message, "stderr_tail": "\n".join(self.tail)}
        self.outbox.put(P.EXITED, 0, P.encode_json(self.exit_info))

    def _finished(self) -> bool:
        if self.state != "exited":
            return False
        delivered = self.sender.unacked_bytes == 0 and not len(self.outbox)
        # A replaced kernel's launcher is gone for good (SIGKILLed by a restart), so the EXITED
        # frame cannot be delivered: do not wait out the lease for it.
        # Nor when we were told to stop (SIGTERM from `gc` or the system): nobody waits for it.
        return delivered or self.replaced or self.terminate_requested or self._lease_expired()

    def _lease_expired(self) -> bool:
        return time.monotonic() - self.last_rx > self.grace

    # ----------------------------------------------------------------------------- main loop

    def _step(self) -> None:
        self._fill_wire()
        readers, writers = self._interest()
        tick = STARTING_TICK if self.state == "starting" else LOOP_TICK
        try:
            readable, writable, _ = select.select(readers, writers, [], tick)
        except InterruptedError:
            readable, writable = [], []
        for fd in writable:
            self._on_writable(fd)
        for fd in readable:
            self._on_readable(fd)
        self._timers()
        self._flush_uplink()

    def _flush_uplink(self) -> None:
        """Send what this round produced now rather than one select round later (relay latency)."""
        self._fill_wire()
        if self.uplink_w is not None and self.wire:
            self._write_uplink()

    def _interest(self) -> Any:
        readers: List[Any] = list(self.pipes)
        writers: List[Any] = []
        if self.listener is not None:
            readers.append(self.listener)
        readers.extend(self.candidates)
        if self.uplink_r is not None:
            readers.append(self.uplink_r)
            if self.wire:
                writers.append(self.uplink_w)
        may_read = self.outbox.bulk_bytes < BULK_LIMIT and self.sender.unacked_bytes < P.UNACKED_LIMIT
        for stream in self.streams.values():
            if stream.sock is None:
                continue
            if may_read and not stream.peer_paused:
                readers.append(stream.sock)
            if stream.outbuf:
                writers.append(stream.sock)
        return readers, writers

    def _on_readable(self, fd: Any) -> None:
        if fd is self.listener:
            self._accept_candidate()
        elif fd in self.candidates:
            self._read_candidate(fd)
        elif isinstance(fd, int) and fd in self.pipes:
            self._read_pipe(fd)
        elif fd == self.uplink_r and isinstance(fd, int):
            self._read_uplink()
        elif isinstance(fd, socket.socket):
            self._read_stream(fd)

    def _on_writable(self, fd: Any) -> None:
        if isinstance(fd, int) and fd == self.uplink_w:
            self._write_uplink()
        elif isinstance(fd, socket.socket):
            self._write_stream(fd)

    def _timers(self) -> None:
        now = time.monotonic()
        if self.terminate_requested and self.state in ("starting", "ready"):
            self._stop_kernel("the agent received SIGTERM")
        if self.state == "starting":
            self._check_ready(now)
        if self.state in ("starting", "ready", "exiting") and now - self.last_kernel_poll >= KERNEL_POLL_INTERVAL:
            self.last_kernel_poll = now
            self._check_kernel(now)
        if self.state != "exited" and self._lease_expired():
            self._log("no launcher for %.0f s (reconnect_grace): stopping the kernel" % self.grace)
            self._kill_group(signal.SIGKILL)
            self._check_kernel(now, force=True)
        if self.uplink_w is not None and self.receiver.ack_due(now - self.last_ack):
            self.wire += self.receiver.make_ack()
            self.last_ack = now

    # ----------------------------------------------------------------------------- kernel

    def _check_ready(self, now: float) -> None:
        sockets = [os.path.join(self.dir, "k-%d" % n) for n in P.IPC_PORTS.values()]
        if all(os.path.exists(path) for path in sockets):
            self.state = "ready"
            assert self.kernel is not None
            self.outbox.put(P.READY, 0, P.encode_json({
                "kernel_pid": self.kernel.pid, "agent_pid": os.getpid(), "dir": self.dir,
                "python": sys.version.split()[0],
            }))
            for stream in list(self.streams.values()):
                self._connect_stream(stream)
        elif now - self.started_at > self.startup_timeout:
            self._stop_kernel("the kernel did not open its sockets within startup_timeout=%gs" % self.startup_timeout)

    def _check_kernel(self, now: float, force: bool = False) -> None:
        if self.kernel is None:
            return
        code = self.kernel.poll()
        if code is None and self.state == "exiting" and now > self.kill_deadline:
            self._kill_group(signal.SIGKILL)
            code = self._wait_kernel(1.0)
        if code is None and force:
            code = self._wait_kernel(2.0)
        if code is None:
            return
        self._drain_pipes()
        self._kill_group(signal.SIGKILL)  # whatever the kernel left behind in its group
        reason = self.exit_info.get("reason") or self._describe_exit(code)
        self.exit_info = {"code": code, "reason": reason, "stderr_tail": "\n".join(self.tail)}
        self.state = "exited"
        self._close_streams()
        self._remove_kernel_files()
        self.outbox.put(P.EXITED, 0, P.encode_json(self.exit_info))

    def _wait_kernel(self, timeout: float) -> Optional[int]:
        assert self.kernel is not None
        return self.kernel.wait(timeout)

    def _describe_exit(self, code: int) -> str:
        if code < 0:
            try:
                return "the kernel was killed by %s" % signal.Signals(-code).name
            except ValueError:
                return "the kernel was killed by signal %d" % -code
        return "the kernel exited with code %d" % code

    def _stop_kernel(self, reason: str) -> None:
        if self.state in ("exiting", "exited"):
            return
        self.exit_info["reason"] = reason
        self.state = "exiting"
        self.kill_deadline = time.monotonic() + KILL_GRACE
        self._kill_group(signal.SIGTERM)

    def _kill_group(self, signum: int) -> None:
        if self.kernel is None:
            return
        try:
            os.killpg(self.kernel.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass

    def _read_pipe(self, fd: int) -> None:
        try:
            data = os.read(fd, READ_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            del self.pipes[fd]
            self.last_kernel_poll = 0.0  # the kernel is probably exiting: look now
            return
        self._log_output(fd, data)

    def _drain_pipes(self) -> None:
        for fd in list(self.pipes):
            for _ in range(64):
                try:
                    data = os.read(fd, READ_CHUNK)
                except OSError:
                    break
                if not data:
                    break
                self._log_output(fd, data)
            self.pipes.pop(fd, None)

    def _log_output(self, fd: int, data: bytes) -> None:
        text = (self.partial.pop(fd, b"") + data)
        lines = text.split(b"\n")
        if lines[-1]:
            self.partial[fd] = lines[-1]
        for raw in lines[:-1]:
            line = raw.decode("utf-8", "replace").rstrip()
            if line:
                self.tail.append(line)
                self.outbox.put(P.LOG, 0, line.encode())

    def _log(self, message: str) -> None:
        self.tail.append("remote-kernel agent: " + message)
        if self.state != "exited":  # nothing may follow EXITED (see _open_stream)
            self.outbox.put(P.LOG, 0, ("agent: " + message).encode())

    # ----------------------------------------------------------------------------- streams

    def _open_stream(self, sid: int, channel: str) -> None:
        """Mirror a client connection; until the kernel's sockets exist the stream only buffers
        (closing early connections would make ZMQ lose the client's first request)."""
        if self.state == "exited":
            # Nothing may follow EXITED: the launcher acknowledges it and leaves, so a CLOSE sent
            # now (for a client that reconnected meanwhile) would never be acknowledged and we
            # would wait out the whole lease. The launcher drops its client sockets as it exits.
            return
        if channel not in P.IPC_PORTS or self.state not in ("starting", "ready"):
            self.outbox.put(P.CLOSE, sid)
            return
        self.streams[sid] = Stream(sid, channel, None)
        if self.state == "ready":
            self._connect_stream(self.streams[sid])

    def _connect_stream(self, stream: Stream) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(os.path.join(self.dir, "k-%d" % P.IPC_PORTS[stream.channel]))
        except OSError as exc:
            sock.close()
            self._log("cannot connect to the kernel's %s socket: %s" % (stream.channel, exc))
            self._drop_stream(stream, tell_peer=True)
            return
        sock.setblocking(False)
        stream.sock = sock

    def _stream_by_sock(self, sock: socket.socket) -> Optional[Stream]:
        for stream in self.streams.values():
            if stream.sock is sock:
                return stream
        return None

    def _read_stream(self, sock: socket.socket) -> None:
        stream = self._stream_by_sock(sock)
        if stream is None:
            return
        try:
            data = bytes(self.read_view[: sock.recv_into(self.read_view)])
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self.outbox.put(P.DATA, stream.sid, data)
        else:
            self._drop_stream(stream, tell_peer=True)

    def _write_stream(self, sock: socket.socket) -> None:
        stream = self._stream_by_sock(sock)
        if stream is not None:
            self._send_to_kernel(stream, sock)

    def _send_to_kernel(self, stream: Stream, sock: socket.socket) -> None:
        try:
            sent = sock.send(stream.outbuf)
        except BlockingIOError:
            return
        except OSError:
            self._drop_stream(stream, tell_peer=True)
            return
        del stream.outbuf[:sent]
        if stream.we_paused and len(stream.outbuf) < P.STREAM_LOW_WATER:
            stream.we_paused = False
            self.outbox.put(P.RESUME, stream.sid)

    def _drop_stream(self, stream: Stream, tell_peer: bool) -> None:
        self.streams.pop(stream.sid, None)
        if stream.sock is not None:
            stream.sock.close()
        if tell_peer:
            self.outbox.put(P.CLOSE, stream.sid)

    def _close_streams(self) -> None:
        for stream in list(self.streams.values()):
            self._drop_stream(stream, tell_peer=True)

    # ----------------------------------------------------------------------------- uplink

    def _fill_wire(self) -> None:
        while self.sender.unacked_bytes < P.UNACKED_LIMIT or self.outbox.bulk_bytes == 0:
            if self.uplink_w is not None and len(self.wire) >= WIRE_LOW_WATER:
                return
            item = self.outbox.pop()
            if item is None:
                return
            wire = self.sender.sequence(*item)
            if self.uplink_w is not None:
                self.wire += wire

    def _write_uplink(self) -> None:
        assert self.uplink_w is not None
        try:
            sent = os.write(self.uplink_w, self.wire)
        except BlockingIOError:
            return
        except OSError:
            self._detach("the uplink closed")
            return
        del self.wire[:sent]

    def _read_uplink(self) -> None:
        assert self.uplink_r is not None
        try:
            data = bytes(self.uplink_view[: os.readv(self.uplink_r, [self.uplink_view])])
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._detach("the launcher's SSH session ended")
            return
        self.last_rx = time.monotonic()
        for frame in self.decoder.feed(data):
            self._handle_frame(frame)

    def _detach(self, why: str) -> None:
        if self.uplink_sock is not None:
            self.uplink_sock.close()
        else:
            for fd in {self.uplink_r, self.uplink_w}:
                if fd is not None:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
        self.uplink_r = self.uplink_w = None
        self.uplink_sock = None
        self.wire.clear()
        self.decoder.reset()
        self.detached_wall = time.time()
        self._write_info()
        if self.state != "exited":
            self._log("%s; keeping the kernel for up to %.0f s (reconnect_grace)" % (why, self.grace))

    def _handle_frame(self, frame: P.Frame) -> None:
        kind, sid, seq, payload = frame
        if kind in P.LINK_FRAMES:
            self.sender.acknowledge(seq)
            if kind == P.PING:
                self.wire += P.encode(P.PONG, 0, self.receiver.received)
            return
        if not self.receiver.accept(seq, len(payload)):
            return
        if kind == P.DATA:
            self._on_data(sid, payload)
        elif kind == P.OPEN:
            self._open_stream(sid, payload.decode())
        elif kind == P.CLOSE:
            stream = self.streams.get(sid)
            if stream is not None:
                self._drop_stream(stream, tell_peer=False)
        elif kind in (P.PAUSE, P.RESUME):
            stream = self.streams.get(sid)
            if stream is not None:
                stream.peer_paused = kind == P.PAUSE
        elif kind == P.SIGNAL:
            self._on_signal(int(payload))
        elif kind == P.SHUTDOWN:
            self._stop_kernel("shut down by the launcher")

    def _on_data(self, sid: int, payload: bytes) -> None:
        stream = self.streams.get(sid)
        if stream is None:
            return
        stream.outbuf += payload
        if stream.sock is not None:  # most writes complete at once: save a select round
            self._send_to_kernel(stream, stream.sock)
            if sid not in self.streams:
                return
        if not stream.we_paused and len(stream.outbuf) > P.STREAM_HIGH_WATER:
            stream.we_paused = True
            self.outbox.put(P.PAUSE, sid)

    def _on_signal(self, signum: int) -> None:
        if signum not in [int(s) for s in ALLOWED_SIGNALS]:
            self._log("refusing to send signal %d" % signum)
            return
        self._kill_group(signum)

    # ----------------------------------------------------------------------------- reattach

    def _accept_candidate(self) -> None:
        assert self.listener is not None
        try:
            sock, _ = self.listener.accept()
        except OSError:
            return
        sock.setblocking(False)
        self.candidates[sock] = P.FrameDecoder()

    def _read_candidate(self, sock: socket.socket) -> None:
        decoder = self.candidates[sock]
        try:
            data = sock.recv(READ_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        try:
            frames = decoder.feed(data) if data else None
        except P.ProtocolError:
            frames = None
        if not frames:
            if frames is None:
                del self.candidates[sock]
                sock.close()
            return
        del self.candidates[sock]
        kind, _, acked, payload = frames[0]
        fields = P.decode_json(payload) if kind == P.HELLO else {}
        import hmac  # here, not at the top: ~2.5 ms (OpenSSL) of every start, used only on reattach

        if not hmac.compare_digest(str(fields.get("token", "")), self.token):
            sock.close()
            return
        if fields.get("kill"):
            self.replaced = True
            self._stop_kernel("stopped by a new launcher that took this kernel's place")
            sock.close()
            return
        self._adopt_uplink(sock, decoder, acked, frames[1:])

    def _adopt_uplink(self, sock: socket.socket, decoder: P.FrameDecoder, acked: int, rest: List[P.Frame]) -> None:
        if self.uplink_r is not None:
            self._detach("a new launcher connection replaced the old one")
        self.uplink_sock = sock
        self.uplink_r = self.uplink_w = sock.fileno()
        self.decoder = decoder
        self.last_rx = time.monotonic()
        self.sender.acknowledge(acked)
        self.wire += P.hello({"state": self.state, "dir": self.dir}, self.receiver.received)
        for wire in self.sender.unacknowledged():
            self.wire += wire
        self.detached_wall = None
        self._write_info()
        self._log("launcher reattached; re-sending %d bytes" % self.sender.unacked_bytes)
        for frame in rest:
            self._handle_frame(frame)

    # ----------------------------------------------------------------------------- cleanup

    def _remove_kernel_files(self) -> None:
        for name in ["kernel.json"] + ["k-%d" % n for n in P.IPC_PORTS.values()]:
            try:
                os.unlink(os.path.join(self.dir, name))
            except OSError:
                pass

    def _cleanup(self) -> None:
        if self.kernel is not None and self.kernel.poll() is None:
            self._kill_group(signal.SIGKILL)
            self._wait_kernel(2.0)
        if self.uplink_w is not None and self.wire:
            os.set_blocking(self.uplink_w, True)
            try:
                os.write(self.uplink_w, bytes(self.wire))
            except OSError:
                pass
        if self.dir and is_our_dir(self.dir):
            import shutil  # not at the top: ~1.5 ms of every start

            shutil.rmtree(self.dir, ignore_errors=True)


# ------------------------------------------------------------------------------------ attach


def splice(directory: str, leftover: bytes) -> int:
    """Join this SSH session's stdin/stdout to a running agent's socket (after a dropped link)."""
    if not is_our_dir(directory):
        sys.stderr.write("remote-kernel: %s is not one of our kernel directories\n" % directory)
        return 3
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(os.path.join(directory, AGENT_SOCKET))
    except OSError as exc:
        sys.stderr.write("remote-kernel: the kernel at %s is gone (%s)\n" % (directory, exc))
        return 4
    _write_all(sock.fileno(), leftover)
    pairs = {0: (sock.fileno(), "in"), sock.fileno(): (1, "out")}
    while True:
        readable, _, _ = select.select(list(pairs), [], [])
        for fd in readable:
            data = os.read(fd, READ_CHUNK)
            if not data:
                return 0
            _write_all(pairs[fd][0], data)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            sent = os.write(fd, view)
        except InterruptedError:
            continue
        except OSError as exc:
            if exc.errno == errno.EAGAIN:
                select.select([], [fd], [])
                continue
            raise
        view = view[sent:]


# ------------------------------------------------------------------------------------ listing


def list_agents() -> List[Dict[str, Any]]:
    """Our kernel directories on this host, for `remote-kernel ps` / `gc`."""
    base = base_dir()
    found = []
    for name in sorted(os.listdir(base)):
        path = os.path.join(base, name)
        info: Dict[str, Any] = {"dir": path}
        try:
            with open(os.path.join(path, AGENT_INFO)) as handle:
                info.update(json.load(handle))
        except (OSError, ValueError):
            info["stale"] = True
        pid = info.get("agent_pid")
        info["alive"] = pid is not None and _is_agent(int(pid))
        found.append(info)
    return found


STALE_MIN_AGE = 60.0  # never touch a directory younger than this: its agent may be starting


def collect_garbage(dry_run: bool) -> List[Dict[str, Any]]:
    """Remove directories whose agent is gone; stop agents orphaned well past their lease."""
    actions = []
    now = time.time()
    for info in list_agents():
        path = info["dir"]
        try:
            age = now - os.lstat(path).st_mtime
        except OSError:
            continue
        if not info["alive"] and age > STALE_MIN_AGE:
            actions.append({"action": "remove-stale-dir", "dir": path, "name": info.get("name")})
            if not dry_run and is_our_dir(path):
                import shutil

                shutil.rmtree(path, ignore_errors=True)
        elif info["alive"] and not info.get("attached") and info.get("detached_at") is not None:
            overdue = now - float(info["detached_at"]) - float(info.get("grace", 300))
            if overdue > 30:
                actions.append({"action": "stop-orphan", "dir": path, "name": info.get("name"),
                                "agent_pid": info.get("agent_pid"), "kernel_pid": info.get("kernel_pid")})
                if not dry_run:
                    os.kill(int(info["agent_pid"]), signal.SIGTERM)  # it stops its kernel and cleans up
    return actions


def _is_agent(pid: int) -> bool:
    """Is ``pid`` still one of our agents (not a recycled PID)? The bootstrap carries a marker."""
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as handle:
            return AGENT_MARKER.encode() in handle.read()
    except OSError:
        pass
    try:  # no /proc (macOS): existence is the best we can tell
        os.kill(pid, 0)
    except OSError:
        return False
    return True


# ------------------------------------------------------------------------------------ entry


def main(started: Started) -> int:
    """Stage two: ``started`` is what spawn.begin() read (and, in start mode, started)."""
    config = started.config
    mode = config.get("mode")
    if mode == "start":
        return Agent(config).run(started)
    if mode == "attach":
        return splice(str(config["dir"]), started.leftover)
    if mode == "list":
        sys.stdout.write(json.dumps({"now": time.time(), "agents": list_agents()}) + "\n")
        return 0
    if mode == "gc":
        actions = collect_garbage(bool(config.get("dry_run")))
        sys.stdout.write(json.dumps({"now": time.time(), "actions": actions}) + "\n")
        return 0
    sys.stderr.write("remote-kernel: unknown mode %r\n" % mode)
    return 2

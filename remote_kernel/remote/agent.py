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
from remote_kernel.protocol import AgentState
from remote_kernel.remote.spawn import (
    AGENT_SOCKET,
    AgentError,
    KernelProcess,
    Started,
    await_go,
    base_path,
    is_our_dir,
    no_room_message,
    write_private,
)

TYPE_CHECKING = False  # typing costs ~2 ms of the agent's start; annotations are strings
if TYPE_CHECKING:
    from typing import Any, Deque, Dict, List, Optional, Set, Tuple

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
# Reattach connections on agent.sock before they prove the token: a few, briefly, small. Anyone
# else (a stray or hostile process of the same user) is dropped; the kernel never notices.
CANDIDATE_LIMIT = 16  # a new connection beyond this replaces the oldest pending one
CANDIDATE_TIMEOUT = 5.0  # seconds to send a whole HELLO
HELLO_LIMIT = 4096  # bytes of HELLO payload (the launcher's is ~80)
ACCEPT_BACKOFF = 1.0  # seconds without accepting after EMFILE/ENFILE (a readable listener spins)
# A silent launcher (no byte, not even its PING) is left after this many seconds; each PING names
# the launcher's own deadline, which adapts to the link's round-trip time (tunnel.py).
DEFAULT_SILENCE = 20.0
SILENCE_BOUNDS = (2.0, 3600.0)
DEFAULT_OUTPUT_BACKLOG = 64 * 1024 * 1024  # config "output_backlog": kernel output held for the launcher


# --------------------------------------------------------------------------------------- streams


class Stream(P.StreamFlow):
    """One client connection of the launcher, mirrored by a connection to the kernel's socket
    (or, for a forward's "tcp:<port>" channel, to 127.0.0.1:<port> on this host)."""

    def __init__(self, sid: int, channel: str, sock: Optional[socket.socket]) -> None:
        super().__init__()
        self.sid = sid
        self.channel = channel
        self.sock = sock
        self.connecting = False  # a forward's TCP connect is under way (watched for writable)
        self.forward = P.forward_port(channel) is not None  # its data goes after the kernel's (Outbox)
        self.closing = False  # the launcher closed it: close once ``outbuf`` is written
        # iopub output is read whatever the uplink does (the kernel drops what we do not read),
        # into the backlog, and dropped a whole message at a time when that is full.
        self.framer: Optional[IopubFramer] = IopubFramer() if channel == "iopub" else None


class Candidate:
    """A connection to agent.sock that has not yet sent a valid HELLO."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.buffer = bytearray()
        self.deadline = deadline


ZMTP_GREETING = 64  # ZMTP 3.x: signature (10), version (2), mechanism (20), as-server (1), filler
DELIMITER = b"<IDS|MSG>"
CAPTURE_LIMIT = 1024 * 1024  # a dropped stream message's content up to this is parsed exactly


class IopubFramer:
    """Message boundaries in the kernel->client bytes of one iopub connection (raw ZMTP 3 from
    the kernel's socket: a 64-byte greeting, then frames of flags, size and body; a message is the
    frames up to one without MORE; commands stand alone), so that whole messages can be dropped
    when the backlog is full. Reads frame headers only and skips bodies by arithmetic: O(frames),
    not O(bytes). Dropped messages are counted, with the lines of stream output in them."""

    def __init__(self) -> None:
        self.greeting = bytearray()
        self.broken = False  # not ZMTP 3 with the NULL mechanism: never drop, only relay
        self.header = bytearray()  # a frame header split between reads
        self.body_left = 0
        self.more = False  # the current frame has MORE
        self.command = False  # the current frame is a ZMTP command
        self.in_message = False
        self.dropping = False  # the current message is being dropped
        self.part = -1  # while dropping: index of the current frame after the delimiter
        self.capture: Optional[bytearray] = None  # the current dropped frame's body, when needed
        self.is_stream = False
        # Dropped and not yet reported.
        self.dropped = 0
        self.lines = 0
        self.parent = b"{}"  # parent_header of the last dropped message
        self.session = ""

    def at_boundary(self) -> bool:
        return (not self.broken and len(self.greeting) == ZMTP_GREETING and not self.in_message
                and not self.header and not self.body_left)

    def feed(self, data: bytes, budget: int, resume: Any) -> bytes:
        """The bytes of ``data`` to relay. A message that begins once ``budget`` bytes (what the
        backlog has room for) are spent is dropped; ``resume(self)`` gives the notice put where
        a run of dropped messages ends."""
        if self.broken:
            return data
        if (budget > len(data) and not self.dropping and not self.dropped and not self.header
                and len(self.greeting) == ZMTP_GREETING and self._skim(data)):
            return data
        self._pieces: List[Any] = []
        self._kept = 0
        self._whole = True  # the pieces are all of data, in order: relay data itself (no copy)
        view = memoryview(data)
        pos = 0
        while pos < len(data):
            if len(self.greeting) < ZMTP_GREETING:
                pos = self._feed_greeting(view, pos)
            elif self.body_left:
                pos = self._feed_body(view, pos)
            else:
                pos = self._feed_header(data, pos, budget, resume)
        pieces, self._pieces = self._pieces, []
        return data if self._whole else b"".join(pieces)

    def _skim(self, data: bytes) -> bool:
        """The hot path: a read that is relayed whole (the backlog has room for all of it, nothing
        is being dropped) only moves the frame state to its end, with locals and no copy. False,
        and nothing changed, if it ends inside a frame header (feed() takes the long way then)."""
        pos, size = 0, len(data)
        left, more, command, in_message = self.body_left, self.more, self.command, self.in_message
        open_frame = left > 0
        while True:
            if open_frame:
                if pos + left > size:
                    left -= size - pos
                    break
                pos += left
                left, open_frame = 0, False
                in_message = in_message and (command or more)  # a last data frame ends the message
                command = False
            if pos >= size:
                break
            flags = data[pos]
            width = 9 if flags & 2 else 2
            if size - pos < width:
                return False
            left = int.from_bytes(data[pos + 1:pos + width], "big")
            pos += width
            more, command = bool(flags & 1), bool(flags & 4)
            in_message = in_message or not command
            open_frame = True
        self.body_left, self.more, self.command, self.in_message = left, more, command, in_message
        return True

    def _feed_greeting(self, view: Any, pos: int) -> int:
        take = min(ZMTP_GREETING - len(self.greeting), len(view) - pos)
        self.greeting += view[pos:pos + take]
        if self._greeting_ok():
            self._pieces.append(view[pos:pos + take])
            return pos + take
        self.broken = True
        self._pieces.append(view[pos:])
        return len(view)

    def _feed_body(self, view: Any, pos: int) -> int:
        take = min(self.body_left, len(view) - pos)
        if not self.dropping or self.command:
            self._pieces.append(view[pos:pos + take])
            self._kept += take
        else:
            self._whole = False
            if self.capture is not None:
                self.capture += view[pos:pos + take]
        self.body_left -= take
        if not self.body_left:
            self._frame_end()
        return pos + take

    def _feed_header(self, data: bytes, pos: int, budget: int, resume: Any) -> int:
        start = pos
        pos, header = self._read_header(data, pos)
        if header is None:
            self._whole = False  # kept for the next read, which completes the header
            return pos
        flags, length, raw = header
        if len(raw) != pos - start:
            self._whole = False
        if not self.in_message and not flags & 4:  # a message begins: keep it or drop it whole
            self.in_message = True
            self.dropping = self._kept >= budget
            if self.dropping:
                self.part, self.is_stream = -1, False
            elif self.dropped:
                self._pieces.append(resume(self))
                self._whole = False
        self._frame_start(flags, length)
        if not self.dropping or self.command:
            self._pieces.append(raw)
            self._kept += len(raw)
        else:
            self._whole = False
        if not length:
            self._frame_end()
        return pos

    def _greeting_ok(self) -> bool:
        greeting = self.greeting
        if len(greeting) >= 1 and greeting[0] != 0xFF:
            return False
        if len(greeting) >= 11 and greeting[10] < 3:  # ZMTP 1.0/2.0: another framing
            return False
        return len(greeting) < 16 or bytes(greeting[12:16]) == b"NULL"

    def _read_header(self, data: bytes, pos: int) -> Any:
        """(new position, (flags, length, header bytes) or None while the header is incomplete)."""
        if not self.header and len(data) - pos >= 9:
            flags = data[pos]
            if flags & 2:
                return pos + 9, (flags, int.from_bytes(data[pos + 1:pos + 9], "big"), data[pos:pos + 9])
            return pos + 2, (flags, data[pos + 1], data[pos:pos + 2])
        self.header.append(data[pos])
        need = 9 if self.header[0] & 2 else 2
        if len(self.header) < need:
            return pos + 1, None
        raw = bytes(self.header)
        self.header.clear()
        length = int.from_bytes(raw[1:], "big")
        return pos + 1, (raw[0], length, raw)

    def _frame_start(self, flags: int, length: int) -> None:
        self.more = bool(flags & 1)
        self.command = bool(flags & 4)
        self.body_left = length
        self.capture = None
        if not self.dropping or self.command:
            return
        if self.part >= 0:
            self.part += 1
        wanted = length == len(DELIMITER) if self.part < 0 else (
            self.part in (2, 3) or (self.part == 5 and self.is_stream))
        if wanted and length <= CAPTURE_LIMIT:
            self.capture = bytearray()

    def _frame_end(self) -> None:
        if self.command:
            self.command = False
            return
        if self.dropping and self.capture is not None:
            self._dropped_frame(bytes(self.capture))
            self.capture = None
        if self.more:
            return
        self.in_message = False
        if self.dropping:
            self.dropping = False
            self.dropped += 1

    def _dropped_frame(self, body: bytes) -> None:
        if self.part < 0:
            if body == DELIMITER:
                self.part = 0
        elif self.part == 2:
            header = _json_object(body)
            self.is_stream = header.get("msg_type") == "stream"
            self.session = str(header.get("session") or self.session)
        elif self.part == 3:
            self.parent = body
        elif self.part == 5:
            text = _json_object(body).get("text")
            self.lines += text.count("\n") if isinstance(text, str) else 0


def _json_object(data: bytes) -> Dict[str, Any]:
    try:
        value = json.loads(data.decode("utf-8"))
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def zmtp_message(frames: List[bytes]) -> bytes:
    """ZMTP 3 frames of one message (what libzmq would put on the wire)."""
    out = bytearray()
    for index, body in enumerate(frames):
        more = 1 if index < len(frames) - 1 else 0
        if len(body) > 255:
            out += bytes((more | 2,)) + len(body).to_bytes(8, "big")
        else:
            out += bytes((more, len(body)))
        out += body
    return bytes(out)


class Agent:
    def __init__(self, config: Dict[str, Any]) -> None:
        self.config = config
        self.name = str(config.get("name", "kernel"))
        self.token = str(config["token"])
        self.grace = float(config.get("reconnect_grace", 300))
        self.startup_timeout = float(config.get("startup_timeout", 60))
        self.output_backlog = int(config.get("output_backlog") or DEFAULT_OUTPUT_BACKLOG)
        # The launcher's PINGs keep this alive and name its silence limit (protocol.Liveness).
        self.live = P.Liveness(DEFAULT_SILENCE, now=time.monotonic(), heard=True)
        self.outage_since: Optional[float] = None  # last byte from the launcher before a detach
        self.outage_seconds: Optional[float] = None  # how long the last outage lasted
        self.info_error = ""
        self.dir = ""
        self.kernel: Optional[KernelProcess] = None
        self.state = AgentState.STARTING  # moved only by _enter (protocol.AGENT_TRANSITIONS)
        self.exit_info: Dict[str, Any] = {}
        self.kill_deadline = 0.0
        self.started_at = time.monotonic()
        self.started_wall = time.time()
        self.detached_wall: Optional[float] = None
        self.streams: Dict[int, Stream] = {}
        self.refused_ports: Set[str] = set()  # forward channels whose refusal was logged (once each)
        self.link = P.Link(time.monotonic())
        self.outbox = self.link.outbox
        self.sender = self.link.sender
        self.receiver = self.link.receiver
        self.decoder = self.link.decoder
        self.wire = bytearray()
        self.uplink_r: Optional[int] = 0
        self.uplink_w: Optional[int] = 1
        self.uplink_sock: Optional[socket.socket] = None
        self.listener: Optional[socket.socket] = None
        self.accept_paused_until = 0.0
        self.candidates: Dict[socket.socket, Candidate] = {}
        self.watcher = P.Watcher()
        self.pipes: Dict[int, str] = {}
        self.tail: Deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self.partial: Dict[int, bytes] = {}
        self.terminate_requested = False
        self.replaced = False  # a restart's new launcher took our place: nobody will reattach
        self.confirmed = False  # a launcher acknowledged our frames: it knows this kernel
        self.abandoned = False  # the uplink ended before that: nobody will reattach
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
        self._handle_uplink_bytes(started.leftover)
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
        try:
            self.listener.bind(os.path.join(self.dir, AGENT_SOCKET))
        except OSError as exc:
            raise AgentError(no_room_message(self.dir, exc)) from None
        self.listener.listen(CANDIDATE_LIMIT)
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
            "host": socket.gethostname(), "job_id": self.config.get("job_id"),
        }
        path = os.path.join(self.dir, AGENT_INFO)
        try:
            os.unlink(path + ".tmp")
        except OSError:
            pass
        try:
            write_private(path + ".tmp", json.dumps(info).encode())
            os.replace(path + ".tmp", path)
        except OSError as exc:  # a full /tmp (ENOSPC, EDQUOT), read-only (EROFS): a stale record
            try:
                os.unlink(path + ".tmp")
            except OSError:
                pass
            error = "cannot update %s: %s; the kernel keeps running (ps/gc show an older state)" % (
                path, exc.strerror or exc)
            if error != self.info_error:  # once, not at every reattach
                self._log(error)
            self.info_error = error
            return
        self.info_error = ""

    def _enter(self, state: AgentState) -> bool:
        """Move to ``state`` if protocol.AGENT_TRANSITIONS allows it (False, and no change, if not)."""
        if state not in P.AGENT_TRANSITIONS[self.state]:
            return False
        self.state = state
        return True

    def _fail_startup(self, message: str) -> None:
        if not self._enter(AgentState.EXITED):
            return
        self.exit_info = {"code": None, "reason": message, "stderr_tail": "\n".join(self.tail)}
        self.outbox.put(P.EXITED, 0, P.encode_json(self.exit_info))

    def _finished(self) -> bool:
        if self.state is not AgentState.EXITED:
            return False
        delivered = self.sender.unacked_bytes == 0 and not len(self.outbox)
        # The end of our output is the launcher's acknowledgement (OpenSSH ends a session the same
        # way): once EXITED is written to a live uplink, exit instead of waiting a round trip for
        # its ACK. Lost in a drop at that very moment, the launcher's reattach finds the kernel
        # gone (EXIT_ATTACH_GONE) instead of its exit code.
        written = self.uplink_w is not None and not len(self.outbox) and not self.wire
        # A replaced kernel's launcher is gone for good (SIGKILLed by a restart), so the EXITED
        # frame cannot be delivered: do not wait out the lease for it.
        # Nor when we were told to stop (SIGTERM from `gc` or the system): nobody waits for it.
        return (delivered or written or self.replaced or self.abandoned or self.terminate_requested
                or self._lease_expired())

    def _lease_expired(self) -> bool:
        return time.monotonic() - self.live.last_rx > self.grace

    # ----------------------------------------------------------------------------- main loop

    def _step(self) -> None:
        self._fill_wire()
        self.watcher.update(self._interest())
        tick = STARTING_TICK if self.state is AgentState.STARTING else LOOP_TICK
        events = self.watcher.wait(tick)
        for obj, mask in events:
            if mask & P.WRITABLE:
                self._on_writable(obj)
        for obj, mask in events:
            if mask & P.READABLE:
                self._on_readable(obj)
        self._timers()
        self._flush_uplink()

    def _flush_uplink(self) -> None:
        """Send what this round produced now rather than one select round later (relay latency)."""
        self._fill_wire()
        if self.uplink_w is not None and self.wire:
            self._write_uplink()

    def _interest(self) -> Dict[int, Any]:
        """{fd: (object, events)} this round waits for (P.Watcher registers only the changes)."""
        wanted: Dict[int, Any] = {fd: (fd, P.READABLE) for fd in self.pipes}
        if self.listener is not None and time.monotonic() >= self.accept_paused_until:
            wanted[self.listener.fileno()] = (self.listener, P.READABLE)
        for sock in self.candidates:
            wanted[sock.fileno()] = (sock, P.READABLE)
        if self.uplink_r is not None:
            # A socket uplink (after a reattach) is one descriptor for both directions.
            uplink: Any = self.uplink_sock if self.uplink_sock is not None else self.uplink_r
            wanted[self.uplink_r] = (uplink, P.READABLE)
            if self.wire and self.uplink_w is not None:
                if self.uplink_w == self.uplink_r:
                    wanted[self.uplink_r] = (uplink, P.READABLE | P.WRITABLE)
                else:
                    wanted[self.uplink_w] = (self.uplink_w, P.WRITABLE)
        may_read = (self.link.may_read_sources(BULK_LIMIT), self.link.may_read_sources(BULK_LIMIT, True))
        for stream in self.streams.values():
            peer = stream.sock
            events = self._stream_events(stream, may_read[stream.forward]) if peer is not None else 0
            if events and peer is not None:
                wanted[peer.fileno()] = (peer, events)
        return wanted

    def _stream_events(self, stream: Stream, may_read: bool) -> int:
        if stream.connecting or stream.closing:
            return P.WRITABLE
        events = 0
        # iopub is read whatever the uplink does: the backlog holds it or drops whole messages
        if not stream.peer_paused and (may_read or (stream.framer is not None and not stream.framer.broken)):
            events = P.READABLE
        if stream.outbuf:
            events |= P.WRITABLE
        return events

    def _on_readable(self, obj: Any) -> None:
        if obj is self.listener:
            self._accept_candidate()
        elif obj in self.candidates:
            self._read_candidate(obj)
        elif obj is self.uplink_sock or (isinstance(obj, int) and obj == self.uplink_r):
            if self.uplink_r is not None:
                self._read_uplink()
        elif isinstance(obj, int):
            if obj in self.pipes:
                self._read_pipe(obj)
        else:
            self._read_stream(obj)

    def _on_writable(self, obj: Any) -> None:
        if obj is self.uplink_sock or (isinstance(obj, int) and obj == self.uplink_w):
            if self.uplink_w is not None:
                self._write_uplink()
        elif isinstance(obj, socket.socket):
            self._write_stream(obj)

    def _timers(self) -> None:
        now = time.monotonic()
        if self.terminate_requested and self.state in (AgentState.STARTING, AgentState.READY):
            self._stop_kernel("the agent received SIGTERM")
        if self.state is AgentState.STARTING:
            self._check_ready(now)
        if self.state is not AgentState.EXITED and now - self.last_kernel_poll >= KERNEL_POLL_INTERVAL:
            self.last_kernel_poll = now
            self._check_kernel(now)
        if self.state is not AgentState.EXITED and self._lease_expired():
            self._log("no launcher for %.0f s (reconnect_grace): stopping the kernel" % self.grace)
            self._kill_group(signal.SIGKILL)
            self._check_kernel(now, force=True)
        ack = self.link.ack_if_due(now) if self.uplink_w is not None else None
        if ack is not None:
            self.wire += ack
        silent = self.live.silent_for(now) if self.uplink_r is not None else None
        if silent is not None:
            self._detach("no byte from the launcher for %.0f s: the link is silent" % silent)
        for candidate in [c for c in self.candidates.values() if now > c.deadline]:
            self._drop_candidate(candidate.sock)
        self._report_drops_at_boundaries()

    # ----------------------------------------------------------------------------- kernel

    def _check_ready(self, now: float) -> None:
        sockets = [os.path.join(self.dir, "k-%d" % n) for n in P.IPC_PORTS.values()]
        if all(os.path.exists(path) for path in sockets) and self._enter(AgentState.READY):
            assert self.kernel is not None
            self.outbox.put(P.READY, 0, P.encode_json({
                "kernel_pid": self.kernel.pid, "agent_pid": os.getpid(), "dir": self.dir,
                "python": sys.version.split()[0],
            }))
            for stream in list(self.streams.values()):
                if stream.sock is None:  # a forward's is connected already
                    self._connect_stream(stream)
        elif now - self.started_at > self.startup_timeout:
            self._stop_kernel("the kernel did not open its sockets within startup_timeout=%gs" % self.startup_timeout)

    def _check_kernel(self, now: float, force: bool = False) -> None:
        if self.kernel is None:
            return
        code = self.kernel.poll()
        if code is None and self.state is AgentState.EXITING and now > self.kill_deadline:
            self._kill_group(signal.SIGKILL)
            code = self._wait_kernel(1.0)
        if code is None and force:
            code = self._wait_kernel(2.0)
        if code is None or not self._enter(AgentState.EXITED):
            return
        self._drain_pipes()
        self._kill_group(signal.SIGKILL)  # whatever the kernel left behind in its group
        reason = self.exit_info.get("reason") or self._describe_exit(code)
        self.exit_info = {"code": code, "reason": reason, "stderr_tail": "\n".join(self.tail)}
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
        if not self._enter(AgentState.EXITING):
            return
        self.exit_info["reason"] = reason
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
        if self.state is not AgentState.EXITED:  # nothing may follow EXITED (see _open_stream)
            self.outbox.put(P.LOG, 0, ("agent: " + message).encode())

    # ----------------------------------------------------------------------------- streams

    def _open_stream(self, sid: int, channel: str) -> None:
        """Mirror a client connection; until the kernel's sockets exist the stream only buffers
        (closing early connections would make ZMQ lose the client's first request)."""
        if self.state is AgentState.EXITED:
            # Nothing may follow EXITED: the launcher acknowledges it and leaves, so a CLOSE sent
            # now (for a client that reconnected meanwhile) would never be acknowledged and we
            # would wait out the whole lease. The launcher drops its client sockets as it exits.
            return
        port = P.forward_port(channel)
        if (channel not in P.IPC_PORTS and port is None) or self.state not in (AgentState.STARTING, AgentState.READY):
            self.outbox.put(P.CLOSE, sid)
            return
        self.streams[sid] = Stream(sid, channel, None)
        if self.state is AgentState.READY or port is not None:  # a forward needs no kernel socket
            self._connect_stream(self.streams[sid])

    def _connect_stream(self, stream: Stream) -> None:
        port = P.forward_port(stream.channel)
        if port is not None:
            self._connect_forward(stream, port)
            return
        sock = None
        try:  # EMFILE here too: more clients than descriptors
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(os.path.join(self.dir, "k-%d" % P.IPC_PORTS[stream.channel]))
        except OSError as exc:
            if sock is not None:
                sock.close()
            if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
                # The kernel closed its sockets: it is exiting (a client reconnecting during a
                # normal shutdown). Not news; the exit itself is reported when it is seen.
                self.last_kernel_poll = 0.0
            else:
                self._log("cannot connect to the kernel's %s socket: %s" % (stream.channel, exc))
            self._drop_stream(stream, tell_peer=True)
            return
        sock.setblocking(False)
        stream.sock = sock

    def _connect_forward(self, stream: Stream, port: int) -> None:
        """A forwarded port: TCP to 127.0.0.1:<port> here, without ever waiting in the loop (the
        connect completes when the socket turns writable: _forward_connected)."""
        sock = None
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small requests: no Nagle wait
            code = sock.connect_ex(("127.0.0.1", port))
        except OSError as exc:
            code = exc.errno or errno.EIO
        if sock is not None and code in (0, errno.EINPROGRESS):
            stream.sock, stream.connecting = sock, code != 0
            return
        if sock is not None:
            sock.close()
        self._forward_refused(stream, port, code)

    def _forward_connected(self, stream: Stream, sock: socket.socket) -> None:
        code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            sock.close()
            stream.sock = None
            self._forward_refused(stream, P.forward_port(stream.channel) or 0, code)
            return
        stream.connecting = False
        self.refused_ports.discard(stream.channel)
        if stream.outbuf:
            self._send_to_kernel(stream, sock)

    def _forward_refused(self, stream: Stream, port: int, code: int) -> None:
        """The launcher's client is closed; said once until that port answers again (a browser
        retries every few seconds)."""
        self._drop_stream(stream, tell_peer=True)
        if stream.channel in self.refused_ports:
            return
        self.refused_ports.add(stream.channel)
        if code == errno.ECONNREFUSED:
            self._log("nothing listens on remote port %d (127.0.0.1:%d on this host): closed the forwarded "
                      "connection" % (port, port))
        else:
            self._log("cannot connect to remote port %d: %s" % (port, os.strerror(code)))

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
        if not data:
            self._drop_stream(stream, tell_peer=True)
            return
        if stream.framer is not None:
            data = stream.framer.feed(data, self._room(stream.framer), self._drop_notice)
            if not data:
                return
        self.outbox.put(P.DATA, stream.sid, data, stream.forward)

    def _write_stream(self, sock: socket.socket) -> None:
        stream = self._stream_by_sock(sock)
        if stream is not None and stream.connecting:
            self._forward_connected(stream, sock)
        elif stream is not None:
            self._send_to_kernel(stream, sock)

    def _send_to_kernel(self, stream: Stream, sock: socket.socket) -> None:
        if stream.connecting:
            return
        try:
            sent = sock.send(stream.outbuf)
        except BlockingIOError:
            return
        except OSError:
            self._drop_stream(stream, tell_peer=True)
            return
        del stream.outbuf[:sent]
        if stream.closing and not stream.outbuf:
            self._drop_stream(stream, tell_peer=False)
            return
        if stream.we_paused and stream.resume_due():
            self.outbox.put(P.RESUME, stream.sid)

    def _drop_stream(self, stream: Stream, tell_peer: bool) -> None:
        self.streams.pop(stream.sid, None)
        if stream.sock is not None:
            stream.sock.close()
        if tell_peer:
            self.outbox.put(P.CLOSE, stream.sid, b"", stream.forward)

    def _close_streams(self) -> None:
        for stream in list(self.streams.values()):
            self._drop_stream(stream, tell_peer=True)

    # ----------------------------------------------------------------------------- uplink

    def _fill_wire(self) -> None:
        while self.uplink_w is None or len(self.wire) < WIRE_LOW_WATER:
            item = self.link.next_item()
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
        self.live.received(time.monotonic())
        self._handle_uplink_bytes(data)

    def _handle_uplink_bytes(self, data: bytes) -> None:
        """Frames from the launcher. A corrupt stream ends this connection, never the agent (nor
        the kernel): the launcher reattaches and both ends re-send what the other lacks."""
        try:
            for frame in self.decoder.feed(data):
                self._handle_frame(frame)
        except (P.ProtocolError, ValueError, RecursionError) as exc:
            self._detach("the launcher's stream is corrupt (%s)" % exc)

    def _detach(self, why: str) -> None:
        if self.uplink_r is not None and self.outage_since is None:
            self.outage_since = self.live.last_rx
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
        if not self.confirmed:
            # The launcher never acknowledged anything we sent (READY included): it gave up on this
            # start (startup_timeout, a killed launcher) and has no record to reattach with.
            self.abandoned = True
            self._stop_kernel("the launcher left before the kernel was ready")
        elif self.state is not AgentState.EXITED:
            self._log("%s; keeping the kernel for up to %.0f s (reconnect_grace)" % (why, self.grace))

    def _handle_frame(self, frame: P.Frame) -> None:
        kind, sid, seq, payload = frame
        if kind in P.LINK_FRAMES:
            self.sender.acknowledge(seq)
            self.confirmed = self.confirmed or seq > 0
            if kind == P.PING:
                self.wire += P.encode(P.PONG, 0, self.receiver.received)
                self.live.adopt(payload, SILENCE_BOUNDS)
            return
        if not self.receiver.accept(seq, len(payload)):
            return
        if kind == P.DATA:
            self._on_data(sid, payload)
        elif kind == P.OPEN:
            self._open_stream(sid, payload.decode())
        elif kind == P.CLOSE:
            stream = self.streams.get(sid)
            if stream is not None and stream.outbuf and stream.sock is not None:
                stream.closing = True  # what the client sent before it closed still goes through
            elif stream is not None:
                self._drop_stream(stream, tell_peer=False)
        elif kind in (P.PAUSE, P.RESUME):
            stream = self.streams.get(sid)
            if stream is not None:
                stream.peer_says(kind)
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
        if stream.pause_due():
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
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            # Out of descriptors (EMFILE, ENFILE) or memory: the connection left pending keeps
            # the listener readable, so stop accepting for a moment instead of spinning.
            self.accept_paused_until = time.monotonic() + ACCEPT_BACKOFF
            return
        if len(self.candidates) >= CANDIDATE_LIMIT:
            self._drop_candidate(next(iter(self.candidates)))  # the oldest: a real launcher is quick
        sock.setblocking(False)
        self.candidates[sock] = Candidate(sock, time.monotonic() + CANDIDATE_TIMEOUT)

    def _drop_candidate(self, sock: socket.socket) -> None:
        self.candidates.pop(sock, None)
        sock.close()

    def _read_candidate(self, sock: socket.socket) -> None:
        candidate = self.candidates[sock]
        try:
            data = sock.recv(READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop_candidate(sock)
            return
        candidate.buffer += data
        try:
            hello = parse_hello(candidate.buffer)
        except (ValueError, RecursionError):  # garbage, a huge length, not a JSON object...
            self._drop_candidate(sock)
            return
        if hello is None:
            return
        fields, acked, rest = hello
        import hmac  # here, not at the top: ~2.5 ms (OpenSSL) of every start, used only on reattach

        if not hmac.compare_digest(fields["token"].encode(), self.token.encode()):
            self._drop_candidate(sock)
            return
        del self.candidates[sock]
        if fields.get("kill"):
            self.replaced = True
            self._stop_kernel("stopped by a new launcher that took this kernel's place")
            sock.close()
            return
        if fields.get("fresh"):
            self._rebase()
            acked = 0
        self._adopt_uplink(sock, acked, rest)

    def _rebase(self) -> None:
        """A launcher that takes the kernel over (the old one died with its frame sequence: a
        killed service, a reboot, `remote-kernel attach`): its clients are new, so the old
        streams end here, and both sequences start again. What the kernel printed meanwhile on
        the old streams is not replayed (a Jupyter client would not show it anyway)."""
        if self.uplink_r is not None:
            self._detach("a launcher took the kernel over")
        for stream in list(self.streams.values()):
            self._drop_stream(stream, tell_peer=False)
        self.link.rebase()
        self.wire.clear()
        self.confirmed = True
        self._log("a new launcher took the kernel over")

    def _adopt_uplink(self, sock: socket.socket, acked: int, rest: bytes) -> None:
        if self.uplink_r is not None:
            self._detach("a new launcher connection replaced the old one")
        self.uplink_sock = sock
        self.uplink_r = self.uplink_w = sock.fileno()
        self.live.received(time.monotonic())
        if self.outage_since is not None:
            self.outage_seconds = self.live.last_rx - self.outage_since
            self.outage_since = None
        for wire in self.link.resume(self._hello_fields(), peer_received=acked):
            self.wire += wire
        self.detached_wall = None
        self._write_info()
        self._log("launcher reattached; re-sending %d bytes" % self.sender.unacked_bytes)
        self._handle_uplink_bytes(rest)

    def _hello_fields(self) -> Dict[str, Any]:
        """Our HELLO on a reattach: with what was dropped meanwhile, so the launcher says
        "nothing was lost" only when that is true."""
        framers = [s.framer for s in self.streams.values() if s.framer is not None]
        return {
            "state": self.state.value, "dir": self.dir,
            "kernel_pid": self.kernel.pid if self.kernel is not None else None,
            "agent_pid": os.getpid(), "python": sys.version.split()[0],
            "dropped_messages": max([f.dropped for f in framers] or [0]),
            "dropped_lines": max([f.lines for f in framers] or [0]),
            "dropping": self._backlog() >= self.output_backlog,
            "output_backlog": self.output_backlog, "outage": self.outage_seconds,
        }

    # ----------------------------------------------------------------------------- dropped output

    def _backlog(self) -> int:
        """Bytes read from the kernel that the launcher has not acknowledged."""
        return self.sender.unacked_bytes + self.outbox.bulk_bytes

    def _room(self, framer: IopubFramer) -> int:
        """Bytes of output the backlog takes before the next message is dropped. Once dropping,
        keep dropping until a quarter of the backlog is free again: one gap and one notice per
        outage, not one every time an acknowledgement frees a few KiB while it is re-sent."""
        room = self.output_backlog - self._backlog()
        return room - self.output_backlog // 4 if framer.dropped else room

    def _report_drops_at_boundaries(self) -> None:
        """A run of dropped messages that no kept message has ended yet (the output stopped):
        reported once the backlog has room again, between two messages."""
        for stream in self.streams.values():
            framer = stream.framer
            if framer is not None and framer.dropped and framer.at_boundary() and self._room(framer) > 0:
                self.outbox.put(P.DATA, stream.sid, self._drop_notice(framer))

    def _drop_notice(self, framer: IopubFramer) -> bytes:
        """The ZMTP bytes of a signed ``stream`` message saying what was dropped just before it
        (parent: the last dropped message's, so it shows under the same cell), and a LOG."""
        text = "[remote-kernel] %s lines of output (%s messages) were dropped %s (output_backlog is %s)\n" % (
            format(framer.lines, ","), format(framer.dropped, ","), self._drop_cause(),
            _size(self.output_backlog))
        framer.dropped = framer.lines = 0
        if self.state is not AgentState.EXITED:
            self.outbox.put(P.LOG, 0, text.strip().encode())  # no "agent: ": the launcher warns
        return zmtp_message(self._stream_message(framer, text))

    def _drop_cause(self) -> str:
        if self.outage_since is not None:
            return "during an outage (%.0f s so far)" % (time.monotonic() - self.outage_since)
        if self.outage_seconds is not None:
            return "during a %.0f s outage" % self.outage_seconds
        return "because the connection was too slow for it"

    def _stream_message(self, framer: IopubFramer, text: str) -> List[bytes]:
        """The frames of an iopub stream message, signed with the kernel's key as the kernel would."""
        import hmac  # only when output was dropped

        now = time.time()
        header = json.dumps({
            "msg_id": os.urandom(16).hex(), "msg_type": "stream", "username": "remote-kernel",
            "session": framer.session or os.urandom(16).hex(), "version": "5.3",
            "date": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + ".%06dZ" % int(now % 1 * 1e6),
        }).encode()
        parts = [header, framer.parent, b"{}", json.dumps({"name": "stderr", "text": text}).encode()]
        key = str(self.config.get("key") or "").encode()
        signature = b""
        if key:
            scheme = str(self.config.get("signature_scheme") or "hmac-sha256")
            mac = hmac.new(key, digestmod=scheme.split("-", 1)[-1])
            for part in parts:
                mac.update(part)
            signature = mac.hexdigest().encode()
        return [b"stream.stderr", DELIMITER, signature, *parts]

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
        return P.EXIT_NOT_OUR_DIR
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(os.path.join(directory, AGENT_SOCKET))
    except OSError as exc:
        sys.stderr.write("remote-kernel: the kernel at %s is gone (%s)\n" % (directory, exc))
        return P.EXIT_ATTACH_GONE
    if os.isatty(1):  # `srun -u` gives the step a pty for stdout: pass bytes, not lines
        import tty

        tty.setraw(1)
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


# ------------------------------------------------------------------------------------ batch jobs

JOB_LINGER = 10.0  # seconds a job waits for a restart's new kernel once its last kernel ended
BOOT_LIMIT = 1024 * 1024  # bytes of a BOOT frame's payload (the launcher's is ~1 KiB)
JOB_PREFIX = "rk-"  # the names of our jobs (backends/slurm.py: rk-<entry>-<short id>)
JOB_KIND = "job"  # agent.json "kind" of a job's own directory (its main process, not a kernel's agent)
JOB_FAILED = "job.failed"  # the job's script failed before its agent listened (backends/slurm.py)
JOB_OUTPUT = "job.out"  # the job's script's output (cd, setup lines, python)
JOB_OUTPUT_TAIL = 4000  # bytes of it shown to the launcher
SLURM_TIMEOUT = 5.0  # one squeue/scancel run by `ps`/`gc` (the launcher reads the answer within 10 s)


def _attach_dir(config: Dict[str, Any]) -> str:
    """The directory to splice to: ``dir``, or a batch job's directory found by ``job_dir`` (its
    name, chosen by the launcher) under the bases this host uses, waited for up to ``wait`` s
    (the job's setup lines run before its agent listens)."""
    if config.get("dir"):
        return str(config["dir"])
    name = os.path.basename(str(config.get("job_dir") or ""))
    deadline = time.monotonic() + float(config.get("wait") or 0)
    while True:
        for base in _bases(config.get("runtime_dir")):
            for mark in (AGENT_SOCKET, JOB_FAILED):  # the agent listens, or the script failed first
                if os.path.exists(os.path.join(base, name, mark)):
                    return os.path.join(base, name)
        if time.monotonic() >= deadline:
            return os.path.join(base_path(None), name)
        time.sleep(0.1)


def report_failed_job(directory: str) -> int:
    """A batch job whose script failed before its agent listened (cd, a setup line, python not
    found): the tail of its output goes to the launcher (stderr); removing the marker tells the
    script, which waits for this, that it may end the job."""
    marker = os.path.join(directory, JOB_FAILED)
    status, tail = _read_tail(marker, 64).strip(), _read_tail(os.path.join(directory, JOB_OUTPUT), JOB_OUTPUT_TAIL)
    sys.stderr.write("remote-kernel: the job's script ended with status %s before the agent started; "
                     "the end of %s:\n%s" % (status, os.path.join(directory, JOB_OUTPUT), tail))
    try:
        os.unlink(marker)
    except OSError:
        pass
    return P.EXIT_JOB_FAILED


def _read_tail(path: str, size: int) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - size))
            return handle.read().decode("utf-8", "replace")
    except OSError as exc:
        return "(cannot read it: %s)\n" % (exc.strerror or exc)


def hold(started: Started) -> int:
    """``await`` mode: the main process of a batch job. Listens on <job dir>/agent.sock and runs
    one agent (forked) per BOOT frame that arrives there through `srun --overlap`, so the key
    never appears in the batch script; a restart's new kernel reuses the allocation. The job
    ends when no kernel is left and none was asked for within JOB_LINGER seconds (at first:
    startup_timeout), or on SIGTERM (scancel, the time limit)."""
    if started.error:
        sys.stderr.write("remote-kernel: %s\n" % started.error)
        return P.EXIT_BAD_REQUEST
    stopping: List[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stopping.append(signum))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(os.path.join(started.dir, AGENT_SOCKET))
    listener.listen(CANDIDATE_LIMIT)
    children: List[int] = []
    wait, idle_since = float(started.config.get("startup_timeout") or 60), time.monotonic()
    told = -1
    try:
        while not stopping:
            children = [pid for pid in children if not _reaped(pid)]
            if children:
                wait, idle_since = JOB_LINGER, time.monotonic()
            elif time.monotonic() - idle_since > wait:
                break
            if len(children) != told:
                told = len(children)
                _write_job_info(started, told)
            if select.select([listener], [], [], LOOP_TICK)[0]:
                children += _boot_from(listener)
    finally:
        listener.close()
        for pid in children:  # SIGTERM reached them too (the whole job is signalled)
            _reaped(pid, wait=KILL_GRACE + 2)
        if is_our_dir(started.dir):
            import shutil

            shutil.rmtree(started.dir, ignore_errors=True)
    return 0


def _write_job_info(started: Started, kernels: int) -> None:
    """The job directory's agent.json (the script wrote a first one): `ps`/`gc` on the login node
    see this process, how many kernels it runs, on which host (its PID means nothing elsewhere)."""
    info = {"kind": JOB_KIND, "name": started.config.get("name"), "agent_pid": os.getpid(),
            "started": started.config.setdefault("started", time.time()), "host": socket.gethostname(),
            "job_id": _batch_job_id(), "kernels": kernels}
    path = os.path.join(started.dir, AGENT_INFO)
    try:
        if os.path.lexists(path + ".tmp"):
            os.unlink(path + ".tmp")
        write_private(path + ".tmp", json.dumps(info).encode())
        os.replace(path + ".tmp", path)
    except OSError:
        pass  # a full disk: ps shows the script's first record; the job runs on


def _batch_job_id() -> str:
    return os.environ.get("SLURM_JOB_ID", "")


def _reaped(pid: int, wait: float = 0.0) -> bool:
    deadline = time.monotonic() + wait
    while True:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return True
        if done or time.monotonic() >= deadline:
            return bool(done)
        time.sleep(0.05)


def _boot_from(listener: socket.socket) -> List[int]:
    """Accept one connection; if it starts with a BOOT frame (a start request), fork its agent."""
    try:
        sock, _ = listener.accept()
    except OSError:
        return []
    try:
        sock.settimeout(CANDIDATE_TIMEOUT)
        kind, payload, leftover = _read_boot(sock)
        import marshal

        config = marshal.loads(payload) if kind == P.BOOT else None  # noqa: S302 - our uid's 0700 socket
    except (OSError, ValueError, EOFError, TypeError):
        config = None
    if not isinstance(config, dict) or config.get("mode") != "start":
        sock.close()
        return []
    config["job_id"] = _batch_job_id()  # in its agent.json: gc ends the job when its lease ends
    pid = os.fork()
    if pid:
        sock.close()
        return [pid]
    listener.close()
    code = 1
    try:
        code = _run_booted(Started(config, leftover), sock)
    finally:
        os._exit(code)


def _read_boot(sock: socket.socket) -> Any:
    buffer = b""
    while True:
        if len(buffer) >= P.HEADER.size:
            kind, _sid, _seq, length = P.HEADER.unpack_from(buffer)
            if length > BOOT_LIMIT:
                raise ValueError("BOOT frame too large")
            end = P.HEADER.size + length
            if len(buffer) >= end:
                return kind, buffer[P.HEADER.size:end], buffer[end:]
        data = sock.recv(65536)
        if not data:
            raise EOFError("the connection closed before a whole BOOT frame")
        buffer += data


def _run_booted(started: Started, sock: socket.socket) -> int:
    """In the forked child: start the kernel and serve it with this connection as the uplink."""
    from remote_kernel.remote.spawn import start_kernel

    try:
        start_kernel(started)
    except (AgentError, OSError) as exc:
        started.error = str(exc)
    sock.setblocking(False)
    agent = Agent(started.config)
    agent.uplink_sock = sock
    agent.uplink_r = agent.uplink_w = sock.fileno()
    return agent.run(started)


# ------------------------------------------------------------------------------------ listing


def list_agents(runtime_dir: Any = None) -> List[Dict[str, Any]]:
    """Our kernel directories on this host, for `remote-kernel ps` / `gc`: under ``runtime_dir``
    (the entry's config key) and under the default temporary directory (kernels started before
    runtime_dir was set)."""
    found = []
    for base in _bases(runtime_dir):
        for name in sorted(os.listdir(base)):
            found.append(_agent_info(os.path.join(base, name)))
    return found


def _bases(runtime_dir: Any) -> List[str]:
    """The private bases to look in: each of ``runtime_dir`` (one, or a list: every runtime_dir
    the host's entries name), then the default temporary directory."""
    wanted = list(runtime_dir) if isinstance(runtime_dir, (list, tuple)) else [runtime_dir] if runtime_dir else []
    bases: List[str] = []
    for choice in [*wanted, None]:
        try:
            path = os.path.realpath(base_path(choice))
        except AgentError:
            continue  # e.g. runtime_dir names a variable this host does not set
        try:
            info = os.lstat(path)
        except OSError:
            continue
        private = (info.st_mode & 0o170000) == 0o040000 and info.st_uid == os.getuid() and not info.st_mode & 0o077
        if private and path not in bases:
            bases.append(path)
    return bases


def _agent_info(path: str) -> Dict[str, Any]:
    info: Dict[str, Any] = {"dir": path}
    try:
        with open(os.path.join(path, AGENT_INFO)) as handle:
            info.update(json.load(handle))
    except (OSError, ValueError):
        info["stale"] = True
    pid = info.get("agent_pid")
    if info.get("host") not in (None, socket.gethostname()):
        info["alive"] = None  # a batch job's, on another node (a shared runtime_dir): unknown here
    else:
        info["alive"] = pid is not None and _is_agent(int(pid))
    return info


STALE_MIN_AGE = 60.0  # never touch a directory younger than this: its agent may be starting


def collect_garbage(dry_run: bool, runtime_dir: Any = None, slurm: Optional[Dict[str, Any]] = None,
                    abandoned: Any = ()) -> List[Dict[str, Any]]:
    """Remove directories whose agent is gone; stop agents orphaned well past their lease. With
    ``slurm`` (our jobs in squeue: slurm_jobs()), the directories of batch jobs are judged by their
    job instead, and jobs of ours nothing will use again are cancelled (job_actions)."""
    now = time.time()
    infos = list_agents(runtime_dir)
    jobs = (slurm or {}).get("jobs")
    actions = []
    for info in infos:
        if info.get("kind") == JOB_KIND or (jobs is not None and info.get("job_id")):
            continue  # a batch job's directory: only its job's state tells whether it is in use
        action = _dir_action(info, now)
        if action is not None:
            actions.append(_apply(action, dry_run))
    if jobs is not None:
        actions += job_actions(jobs, infos, {str(job) for job in abandoned}, now, dry_run)
    return actions


def _dir_action(info: Dict[str, Any], now: float) -> Optional[Dict[str, Any]]:
    path = info["dir"]
    try:
        age = now - os.lstat(path).st_mtime
    except OSError:
        return None
    if info["alive"] is False and age > STALE_MIN_AGE:
        return {"action": "remove-stale-dir", "dir": path, "name": info.get("name")}
    if info["alive"] and not info.get("attached") and info.get("detached_at") is not None:
        overdue = now - float(info["detached_at"]) - float(info.get("grace", 300))
        if overdue > 30:
            return {"action": "stop-orphan", "dir": path, "name": info.get("name"),
                    "agent_pid": info.get("agent_pid"), "kernel_pid": info.get("kernel_pid")}
    return None


def _apply(action: Dict[str, Any], dry_run: bool) -> Dict[str, Any]:
    if dry_run:
        return action
    kind = action["action"]
    if kind in ("remove-stale-dir", "remove-job-dir") and is_our_dir(action["dir"]):
        import shutil

        shutil.rmtree(action["dir"], ignore_errors=True)
    elif kind == "stop-orphan":
        os.kill(int(action["agent_pid"]), signal.SIGTERM)  # it stops its kernel and cleans up
    elif kind == "cancel-job":
        error = _slurm_command(["scancel", str(action["job_id"])])[1]
        if error:
            action["error"] = error
    return action


def job_actions(jobs: List[Dict[str, str]], infos: List[Dict[str, Any]], abandoned: Set[str], now: float,
                dry_run: bool) -> List[Dict[str, Any]]:
    """Cancel our jobs (by name) that nothing will use again, with the directories of theirs we see
    here; remove the directories of our jobs that ended. A job whose directories are not visible
    from here (the default: /tmp of its compute node) is left to its own ending (the lease, then
    JOB_LINGER), except a PENDING one whose launcher is known to be gone (``abandoned``)."""
    actions = []
    for job in jobs:
        why = _cancel_reason(job, infos, abandoned, now)
        if why:
            actions.append(_apply({"action": "cancel-job", "job_id": job["id"], "name": job["name"],
                                   "state": job["state"], "node": job["node"], "why": why}, dry_run))
            actions += [_apply(_job_dir_action(info), dry_run) for info in infos
                        if str(info.get("job_id") or "") == job["id"]]
    active = {job["id"] for job in jobs}
    for info in infos:
        ended = info.get("job_id") and str(info["job_id"]) not in active and info["alive"] is not True
        if ended and _age(info["dir"], now) > STALE_MIN_AGE:
            actions.append(_apply(_job_dir_action(info), dry_run))
    return actions


def _cancel_reason(job: Dict[str, str], infos: List[Dict[str, Any]], abandoned: Set[str], now: float) -> str:
    if job["state"] == "PENDING":
        return "its launcher is gone (the job waited in the queue)" if job["id"] in abandoned else ""
    if job["state"] != "RUNNING":
        return ""
    mine = [info for info in infos if str(info.get("job_id") or "") == job["id"]]
    holder = [info for info in mine if info.get("kind") == JOB_KIND]
    kernels = [info for info in mine if info.get("kind") != JOB_KIND]
    if holder and holder[0].get("agent_pid") and holder[0]["alive"] is False:
        return "its main process is gone"
    if kernels and all(_lease_ended(info, now) for info in kernels):
        return "the lease of its kernel ended (no launcher came back)"
    return ""


def _lease_ended(info: Dict[str, Any], now: float) -> bool:
    if info["alive"] is False:
        return True
    detached = info.get("detached_at")
    return not info.get("attached") and detached is not None and now >= float(detached) + float(info.get("grace", 300))


def _job_dir_action(info: Dict[str, Any]) -> Dict[str, Any]:
    return {"action": "remove-job-dir", "dir": info["dir"], "name": info.get("name"), "job_id": info.get("job_id")}


def _age(path: str, now: float) -> float:
    try:
        return now - os.lstat(path).st_mtime
    except OSError:
        return 0.0


def slurm_jobs() -> Dict[str, Any]:
    """Our jobs (named rk-*) in squeue, for `ps`/`gc`: {"jobs": [...]}, or {"error": why}."""
    import pwd

    user = pwd.getpwuid(os.getuid()).pw_name
    output, error = _slurm_command(["squeue", "-h", "-u", user, "-o", "%i|%j|%T|%N|%L|%r"])
    if error:
        return {"error": error}
    jobs = []
    for line in output.splitlines():
        parts = line.strip().split("|", 5)
        if len(parts) == 6 and parts[1].startswith(JOB_PREFIX):
            jobs.append(dict(zip(("id", "name", "state", "node", "left", "reason"), parts)))  # noqa: B905 - 3.8
    return {"jobs": jobs}


def _slurm_command(argv: List[str]) -> Tuple[str, str]:
    """(stdout, "") or ("", what went wrong): a Slurm client command, bounded."""
    import subprocess

    try:
        result = subprocess.run(argv, check=False, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, timeout=SLURM_TIMEOUT)
    except (OSError, subprocess.SubprocessError) as exc:
        return "", "%s: %s" % (argv[0], exc)
    if result.returncode != 0:
        detail = result.stderr.decode("utf-8", "replace").strip()[-300:]
        return "", "%s exited %d: %s" % (argv[0], result.returncode, detail)
    return result.stdout.decode("utf-8", "replace"), ""


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
    if mode in ("start", "spare"):  # a spare: a kernel started ahead, waiting to be taken
        if mode == "spare" and not _spare_taken(started):
            return 1 if started.error else 0
        return Agent(config).run(started)
    if mode == "attach":
        return _attach(config, started.leftover)
    if mode == "await":
        return hold(started)
    if mode in ("list", "gc"):
        sys.stdout.write(json.dumps(inventory(config)) + "\n")
        return 0
    sys.stderr.write("remote-kernel: unknown mode %r\n" % mode)
    return P.EXIT_BAD_REQUEST


def _attach(config: Dict[str, Any], leftover: bytes) -> int:
    directory = _attach_dir(config)
    if config.get("job_dir") and os.path.exists(os.path.join(directory, JOB_FAILED)):
        return report_failed_job(directory)
    return splice(directory, leftover)


def _spare_taken(started: Started) -> bool:
    """A spare kernel (started ahead, waiting): True once a start took it; False when it could
    not start (said on stderr: the service drops a spare whose session ended) or was given up."""
    if started.error:
        sys.stderr.write("remote-kernel: cannot start a spare kernel: %s\n" % started.error)
        return False
    return await_go(started)


def inventory(config: Dict[str, Any]) -> Dict[str, Any]:
    """`ps` (``list``) and `gc` answers; with ``slurm``, our jobs in squeue too (same session)."""
    slurm = slurm_jobs() if config.get("slurm") else None
    answer: Dict[str, Any] = {"now": time.time()}
    if config.get("mode") == "list":
        answer["agents"] = list_agents(config.get("runtime_dir"))
    else:
        answer["actions"] = collect_garbage(bool(config.get("dry_run")), config.get("runtime_dir"), slurm,
                                            config.get("abandoned_jobs") or ())
    if slurm is not None:
        answer["slurm"] = slurm
    return answer


def parse_hello(buffer: bytearray) -> Optional[Any]:
    """(fields, acknowledged seq, the bytes after it) once a whole HELLO is in ``buffer``, None
    until then. ValueError (or RecursionError: deeply nested JSON) for anything else: another
    frame first, a payload over HELLO_LIMIT, not UTF-8 JSON, not an object with a string token."""
    if len(buffer) < P.HEADER.size:
        return None
    kind, _sid, acked, length = P.HEADER.unpack_from(buffer)
    if kind != P.HELLO or length > HELLO_LIMIT:
        raise ValueError("not a HELLO of at most %d bytes" % HELLO_LIMIT)
    end = P.HEADER.size + length
    if len(buffer) < end:
        return None
    fields = json.loads(bytes(buffer[P.HEADER.size:end]).decode("utf-8"))
    if not isinstance(fields, dict) or not isinstance(fields.get("token"), str):
        raise ValueError("a HELLO must be a JSON object with a string token")  # noqa: TRY004 - one error kind for the caller
    return fields, acked, bytes(buffer[end:])


def _size(count: int) -> str:
    return "%g MiB" % (count / 1048576.0) if count >= 1048576 else "%d bytes" % count

"""The framing shared by both ends of the data path.

Pure standard library, and Python 3.8 compatible: this file is also sent to the remote host and
run there (see remote/agent.py), so no 3.9+ syntax or library calls at runtime.

One SSH session's stdin/stdout carry every byte of the kernel's five ZMQ channels as frames::

    type (1 byte) | stream id (4) | seq (8) | payload length (4) | payload

Sequenced frames (everything but the link frames) are numbered per direction from 1. The sender
keeps each one until the peer acknowledges it, so that after a dropped SSH connection the two ends
re-send exactly what the other did not get: ZMQ loses PUB output and ROUTER replies the moment a
TCP peer goes away, so the connections on both ends stay open and the byte streams are resumed.
Link frames (HELLO, ACK, PING, PONG) belong to one connection and are never re-sent; their seq
field carries the sender's cumulative acknowledgement.
"""

from __future__ import annotations

import collections
import enum  # loaded anyway: the agent imports signal, which imports enum
import json
import math
import struct

TYPE_CHECKING = False  # typing costs the remote agent ~2 ms of its start; annotations are strings
if TYPE_CHECKING:
    from typing import Any, Deque, Dict, List, Optional, Tuple

    Frame = Tuple[int, int, int, bytes]  # (type, stream id, seq, payload)

HEADER = struct.Struct(">BIQI")
MAX_PAYLOAD = 256 * 1024
MAX_FRAME_PAYLOAD_ACCEPTED = 16 * 1024 * 1024  # a larger length means a corrupt stream

# Sequenced frames.
OPEN = 1  # launcher -> agent: a client connected to channel <payload> as stream <sid>
DATA = 2  # both: bytes of stream <sid>
CLOSE = 3  # both: stream <sid> is closed
PAUSE = 4  # both: stop sending data of stream <sid> (the receiver's buffer for it is full)
RESUME = 5  # both: stream <sid> may flow again
SIGNAL = 6  # launcher -> agent: deliver signal <payload: decimal number> to the kernel's group
SHUTDOWN = 7  # launcher -> agent: stop the kernel, clean up, exit
READY = 8  # agent -> launcher: JSON, the kernel's sockets exist
LOG = 9  # agent -> launcher: UTF-8 text from the remote side (kernel stderr/stdout, agent notes)
EXITED = 10  # agent -> launcher: JSON, the kernel is gone (exit code, reason, stderr tail)
# Link frames.
HELLO = 20  # both: JSON handshake on (re)attach
ACK = 21  # both: seq field = highest sequence number received in order
PING = 22  # launcher -> agent: keeps the lease, asks for a PONG
PONG = 23  # agent -> launcher
# The first frame of every session, read by stage one of the agent (remote/spawn.py): the
# request (mode, and in start mode the key, token and kernel command) in marshal format 2, which
# every Python 3 reads without importing json (~5 ms before the kernel can start).
BOOT = 24
BOOT_MARSHAL_VERSION = 2

LINK_FRAMES = frozenset((HELLO, ACK, PING, PONG))
# Control frames jump the queue ahead of bulk data (an interrupt must not wait behind 50 MB).
PRIORITY_FRAMES = frozenset((OPEN, CLOSE, PAUSE, RESUME, SIGNAL, SHUTDOWN, READY, EXITED))

CHANNELS = ("shell", "iopub", "stdin", "control", "hb")
# Remote IPC socket suffixes: the kernel binds ipc://<dir>/k-<n> for these fixed "ports".
IPC_PORTS = {"shell": 1, "iopub": 2, "stdin": 3, "control": 4, "hb": 5}
# A forwarded port (remote_kernel/forward.py): OPEN with "tcp:<port>" asks the agent for a TCP
# connection to 127.0.0.1:<port> on its own host (the compute node of a batch job).
FORWARD_PREFIX = "tcp:"

# Per-stream flow control: a receiver whose pending bytes for one stream exceed HIGH asks the
# sender to PAUSE that stream, and RESUMEs it below LOW, so one stalled client cannot hold up
# the others. Globally, a sender stops reading its sources while UNACKED_LIMIT bytes await ACK.
STREAM_HIGH_WATER = 8 * 1024 * 1024
STREAM_LOW_WATER = 1024 * 1024
UNACKED_LIMIT = 64 * 1024 * 1024
ACK_EVERY_BYTES = 1024 * 1024
# A forward's data (Outbox background) is sequenced only while less than this awaits ACK: what is
# sequenced is on its way, and a reply of the kernel sequenced later waits behind all of it (in
# the SSH window, 16 MiB). 2 MiB per round trip is 40 MB/s at 50 ms.
BACKGROUND_IN_FLIGHT = 2 * 1024 * 1024
ACK_EVERY_SECONDS = 0.2


# Exit statuses of a remote session: the one table. The launcher, doctor and the backends read them
# from the channel; stage one (remote/spawn.py) keeps copies, held equal by test_agent_stages.py.
EXIT_BAD_REQUEST = 2  # the first frame is not BOOT, an unknown mode, a batch job's directory not ours
EXIT_SHORT_INPUT = 3  # the bootstrap: stdin ended before the whole agent program arrived
EXIT_NOT_OUR_DIR = 3  # attach: the directory named is not one of our kernel directories
EXIT_ATTACH_GONE = 4  # attach: agent.sock refuses connections: the kernel and its agent are gone
EXIT_JOB_FAILED = 5  # attach: a batch job's script failed before its agent listened (its output on stderr)
EXIT_CWD_FAILED = 97  # the start script: `cd <cwd>` failed
EXIT_NOT_FOUND = 127  # the shell could not run python, or the kernel command could not be executed
REMOTE_EXITS = {
    EXIT_BAD_REQUEST: "the agent refused the request",
    EXIT_SHORT_INPUT: "the agent program did not arrive whole, or (attach) the directory is not ours",
    EXIT_ATTACH_GONE: "the kernel is gone",
    EXIT_JOB_FAILED: "the batch job's script failed before the agent started",
    EXIT_CWD_FAILED: "the working directory does not exist",
    EXIT_NOT_FOUND: "a command was not found",
}


class AgentState(str, enum.Enum):
    """The agent's states (remote/agent.py); the value travels in its HELLO on a reattach."""

    STARTING = "starting"  # the kernel runs; its sockets do not exist yet
    READY = "ready"  # the sockets exist: streams are relayed (READY was sent)
    EXITING = "exiting"  # the kernel was told to stop (SIGTERM; SIGKILL after a grace)
    EXITED = "exited"  # the kernel is gone (EXITED was sent): nothing else may be sent


# The one table of the agent's transitions: a state not listed for the current one is refused.
AGENT_TRANSITIONS = {
    AgentState.STARTING: frozenset((AgentState.READY, AgentState.EXITING, AgentState.EXITED)),
    AgentState.READY: frozenset((AgentState.EXITING, AgentState.EXITED)),
    AgentState.EXITING: frozenset((AgentState.EXITED,)),
    AgentState.EXITED: frozenset(),
}


class ProtocolError(Exception):
    """The byte stream is not a valid frame stream, or a sequence number is out of order."""


def forward_port(channel: str) -> Optional[int]:
    """The remote port of a forward's channel ("tcp:8787" -> 8787); None for anything else."""
    digits = channel[len(FORWARD_PREFIX):] if channel.startswith(FORWARD_PREFIX) else ""
    if not (digits.isascii() and digits.isdigit()) or len(digits) > 5 or not 1 <= int(digits) <= 65535:
        return None
    return int(digits)


def encode(kind: int, sid: int, seq: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(kind, sid, seq, len(payload)) + payload


def encode_json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def decode_json(payload: bytes) -> Any:
    return json.loads(payload.decode())


class FrameDecoder:
    """Incremental parser: feed bytes as they arrive, get whole frames back."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> List[Frame]:
        self._buffer += data
        frames: List[Frame] = []
        view = self._buffer
        offset = 0
        while len(view) - offset >= HEADER.size:
            kind, sid, seq, length = HEADER.unpack_from(view, offset)
            if length > MAX_FRAME_PAYLOAD_ACCEPTED:
                raise ProtocolError("frame of %d bytes: the stream is corrupt" % length)
            end = offset + HEADER.size + length
            if end > len(view):
                break
            frames.append((kind, sid, seq, bytes(view[offset + HEADER.size : end])))
            offset = end
        if offset:
            del self._buffer[:offset]
        return frames

    def reset(self) -> None:
        """Forget a partial frame: the connection that carried it is gone (it will be re-sent)."""
        self._buffer.clear()


class Outbox:
    """Frames waiting to be sequenced and written, control frames first.

    Sequence numbers are assigned when a frame leaves the outbox, so the order on the wire is
    always the sequence order even though control frames overtake queued data.
    """

    def __init__(self) -> None:
        self._priority: Deque[Tuple[int, int, bytes]] = collections.deque()
        self._bulk: Deque[Tuple[int, int, bytes]] = collections.deque()
        self.bulk_bytes = 0
        # Forwarded ports' DATA and CLOSE (forward.py) go after the kernel's own: a 100 MB
        # download through a dashboard's port must not hold up a reply on the shell channel.
        self._background: Deque[Tuple[int, int, bytes]] = collections.deque()
        self.background_bytes = 0

    def put(self, kind: int, sid: int, payload: bytes = b"", background: bool = False) -> None:
        if background and kind in (DATA, CLOSE):
            self._background.append((kind, sid, payload))
            self.background_bytes += len(payload)
        # A CLOSE waits behind queued data, which may be its stream's last bytes.
        elif kind in PRIORITY_FRAMES and not (kind == CLOSE and self._bulk):
            self._priority.append((kind, sid, payload))
        else:
            self._bulk.append((kind, sid, payload))
            self.bulk_bytes += len(payload)

    def pop(self) -> Optional[Tuple[int, int, bytes]]:
        if self._priority:
            return self._priority.popleft()
        if self._bulk:
            item = self._bulk.popleft()
            self.bulk_bytes -= len(item[2])
            return item
        if self._background:
            item = self._background.popleft()
            self.background_bytes -= len(item[2])
            return item
        return None

    def __len__(self) -> int:
        return len(self._priority) + len(self._bulk) + len(self._background)

    def only_background(self) -> bool:
        """Nothing but forwarded ports' frames waits."""
        return not self._priority and not self._bulk and bool(self._background)


class ReliableSender:
    """Assigns sequence numbers and keeps every sequenced frame until the peer acknowledges it."""

    def __init__(self) -> None:
        self.next_seq = 1
        self._unacked: Deque[Tuple[int, bytes]] = collections.deque()
        self.unacked_bytes = 0

    def restart(self) -> None:
        """Forget everything sent: the next frame is seq 1 again (Link.rebase)."""
        self.next_seq = 1
        self._unacked.clear()
        self.unacked_bytes = 0

    def sequence(self, kind: int, sid: int, payload: bytes) -> bytes:
        seq = self.next_seq
        self.next_seq += 1
        wire = encode(kind, sid, seq, payload)
        self._unacked.append((seq, wire))
        self.unacked_bytes += len(wire)
        return wire

    def acknowledge(self, seq: int) -> None:
        while self._unacked and self._unacked[0][0] <= seq:
            self.unacked_bytes -= len(self._unacked.popleft()[1])

    def unacknowledged(self) -> List[bytes]:
        """Everything the peer has not confirmed, in order: what to re-send after a reattach."""
        return [wire for _, wire in self._unacked]

    @property
    def last_sent(self) -> int:
        return self.next_seq - 1


class ReliableReceiver:
    """Accepts sequenced frames exactly once and in order; tells when an ACK is due."""

    def __init__(self) -> None:
        self.received = 0  # highest seq accepted
        self.acked = 0  # highest seq we told the peer about
        self.bytes_since_ack = 0

    def restart(self) -> None:
        """Forget everything received: the peer's next frame is seq 1 (Link.rebase)."""
        self.received = self.acked = self.bytes_since_ack = 0

    def accept(self, seq: int, size: int) -> bool:
        """True if the frame is new; False for a duplicate re-sent after a reattach."""
        if seq <= self.received:
            return False
        if seq != self.received + 1:
            raise ProtocolError("frame %d arrived after %d: frames were lost" % (seq, self.received))
        self.received = seq
        self.bytes_since_ack += size
        return True

    def ack_due(self, seconds_since_ack: float) -> bool:
        if self.received == self.acked:
            return False
        return self.bytes_since_ack >= ACK_EVERY_BYTES or seconds_since_ack >= ACK_EVERY_SECONDS

    def make_ack(self) -> bytes:
        self.acked = self.received
        self.bytes_since_ack = 0
        return encode(ACK, 0, self.received)


def hello(fields: Dict[str, Any], received: int) -> bytes:
    return encode(HELLO, 0, received, encode_json(fields))


class Link:
    """One end's half of the reliable link, the same on both ends (tunnel.py, remote/agent.py):
    what waits to be sent, what waits for acknowledgement, what was received, when to
    acknowledge, and what to send first on a reattach. Each end keeps its own I/O and locking
    (the tunnel's threads, the agent's poll loop) around it."""

    def __init__(self, now: float = 0.0) -> None:
        self.outbox = Outbox()
        self.sender = ReliableSender()
        self.receiver = ReliableReceiver()
        self.decoder = FrameDecoder()
        self.last_ack = now

    def may_read_sources(self, bulk_limit: int, background: bool = False) -> bool:
        """Whether to read clients (kernel sockets; with ``background``, forwarded ports'): their
        data backs up in the outbox, or awaits ACK."""
        queued = self.outbox.background_bytes if background else self.outbox.bulk_bytes
        return queued < bulk_limit and self.sender.unacked_bytes < UNACKED_LIMIT

    def next_item(self) -> Optional[Tuple[int, int, bytes]]:
        """The next frame to sequence; bulk data waits while UNACKED_LIMIT bytes await ACK."""
        if self.sender.unacked_bytes >= UNACKED_LIMIT and (self.outbox.bulk_bytes or self.outbox.background_bytes):
            return None
        if self.sender.unacked_bytes >= BACKGROUND_IN_FLIGHT and self.outbox.only_background():
            return None
        return self.outbox.pop()

    def ack_if_due(self, now: float) -> Optional[bytes]:
        """An ACK frame when enough bytes or time went by since the last one, else None."""
        if not self.receiver.ack_due(now - self.last_ack):
            return None
        self.last_ack = now
        return self.receiver.make_ack()

    def resume(self, fields: Dict[str, Any], peer_received: Optional[int] = None) -> List[bytes]:
        """A new connection: our HELLO (which acknowledges all we received), then every frame the
        peer has not confirmed (``peer_received``: what its HELLO says it has). A partial frame
        of the old connection is forgotten: the peer re-sends it whole."""
        self.decoder.reset()
        if peer_received is not None:
            self.sender.acknowledge(peer_received)
        self.receiver.acked = self.receiver.received
        self.receiver.bytes_since_ack = 0
        return [hello(fields, self.receiver.received), *self.sender.unacknowledged()]

    def rebase(self) -> None:
        """A new peer with no history (a launcher taking over after the old one died with its
        state): both sequences start again at 1. Frames of the old streams are dropped (their
        clients are gone); the link's own news (READY, LOG, EXITED: stream 0) is kept, in order,
        to be sequenced again for the new peer."""
        kept = [(kind, sid, payload) for kind, sid, _, payload in FrameDecoder().feed(
            b"".join(self.sender.unacknowledged())) if sid == 0]
        while True:
            item = self.outbox.pop()
            if item is None:
                break
            if item[1] == 0:
                kept.append(item)
        self.sender.restart()
        self.receiver.restart()
        self.decoder.reset()
        for kind, sid, payload in kept:
            self.outbox.put(kind, sid, payload)


class Liveness:
    """Is the peer still there? A link can go silent without any error (Wi-Fi roaming, a sleeping
    NAT, a VPN re-key): TCP notices after minutes. The launcher PINGs every ``ping_interval``
    seconds and times one PONG at a time (srtt/rttvar, as TCP does, RFC 6298); the link counts as
    lost when nothing at all came for ``limit()`` seconds: never below ``floor`` (a slow link is
    not a dead one), growing with the round trip. Each PING carries that limit and the agent
    ``adopt``s it, so both ends give up on the same schedule. Until ``heard`` (the launcher: the
    agent's first byte; setup lines may run for minutes) silence does not count."""

    def __init__(self, floor: float, ping_interval: float = 0.0, now: float = 0.0, heard: bool = False) -> None:
        self.floor = floor
        self.ping_interval = ping_interval
        self.last_rx = now
        self.last_ping = now
        self.heard = heard
        self.ping_sent: Optional[float] = None  # when the PING being timed was sent
        self.srtt: Optional[float] = None
        self.rttvar = 0.0
        self.adopted: Optional[float] = None  # the peer's limit, from its PING

    def restart(self, now: float) -> None:
        """A new connection: nothing heard on it yet, no PING in flight."""
        self.last_rx = now
        self.heard = False
        self.ping_sent = None

    def received(self, now: float) -> None:
        self.last_rx = now
        self.heard = True

    def ping_if_due(self, now: float, received: int) -> Optional[bytes]:
        """A PING frame (acknowledging ``received``, naming our limit) when one is due."""
        if now - self.last_ping < self.ping_interval:
            return None
        self.last_ping = now
        if self.ping_sent is None:
            self.ping_sent = now  # one round trip timed at a time
        return encode(PING, 0, received, ("%.1f" % self.limit()).encode())

    def pong(self, now: float) -> None:
        if self.ping_sent is None:
            return
        sample = now - self.ping_sent
        self.ping_sent = None
        if self.srtt is None:
            self.srtt, self.rttvar = sample, sample / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - sample)
            self.srtt = 0.875 * self.srtt + 0.125 * sample

    def adopt(self, payload: bytes, bounds: Tuple[float, float]) -> None:
        """The peer's PING names its limit (seconds): use the same, within ``bounds``."""
        try:
            limit = float(payload)
        except ValueError:
            return
        if not math.isnan(limit):
            self.adopted = min(max(limit, bounds[0]), bounds[1])

    def limit(self) -> float:
        """Seconds without a byte from the peer after which the link counts as dead."""
        if self.adopted is not None:
            return self.adopted
        if self.srtt is None:
            return self.floor
        timeout = self.srtt + 4 * self.rttvar  # TCP's retransmission timeout (RFC 6298)
        return max(self.floor, self.ping_interval + 3 * timeout)

    def silent_for(self, now: float) -> Optional[float]:
        """Seconds of silence once they exceed the limit (the link is lost), else None."""
        silent = now - self.last_rx
        return silent if self.heard and silent > self.limit() else None


class StreamFlow:
    """Per-stream flow control, the same on both ends: ``outbuf`` holds what the peer sent for
    this stream that its local socket has not taken yet. Above STREAM_HIGH_WATER we ask the peer
    to PAUSE the stream, below STREAM_LOW_WATER to RESUME it: one stalled client (or kernel
    socket) holds up only its own stream. ``peer_paused``: the peer asked us to hold ours."""

    def __init__(self) -> None:
        self.outbuf = bytearray()
        self.peer_paused = False
        self.we_paused = False

    def pause_due(self) -> bool:
        """After bytes were added to ``outbuf``: True once when the peer must PAUSE."""
        if not self.we_paused and len(self.outbuf) > STREAM_HIGH_WATER:
            self.we_paused = True
            return True
        return False

    def resume_due(self) -> bool:
        """After bytes left ``outbuf``: True once when the peer may RESUME."""
        if self.we_paused and len(self.outbuf) < STREAM_LOW_WATER:
            self.we_paused = False
            return True
        return False

    def peer_says(self, kind: int) -> None:
        """A PAUSE or RESUME frame from the peer for this stream."""
        self.peer_paused = kind == PAUSE


class Watcher:
    """A selector (epoll, kqueue or poll: no 1024-descriptor limit, unlike select) whose
    registrations follow the set of descriptors each round wants, with a system call only for
    what changed since the last round: the relay's hot path costs one wait per round, as before.

    ``update`` takes {fd: (object, mask)}. A registration is renewed when the object behind a
    descriptor number changes (a closed socket's number is reused by the next one: the kernel
    forgets a closed descriptor, a selector's table does not)."""

    def __init__(self) -> None:
        import selectors  # here: protocol.py is imported by the launcher's CLI too

        self._selector = selectors.DefaultSelector()
        self._current: Dict[int, Tuple[Any, int]] = {}

    def update(self, wanted: Dict[int, Tuple[Any, int]]) -> None:
        current = self._current
        for fd in [fd for fd in current if fd not in wanted]:
            self._forget(fd)
        for fd, (obj, mask) in wanted.items():
            old = current.get(fd)
            if old is not None and old[0] is obj:
                if old[1] != mask:
                    self._selector.modify(fd, mask, obj)
                    current[fd] = (obj, mask)
                continue
            if old is not None:
                self._forget(fd)
            try:
                self._selector.register(fd, mask, obj)
            except (OSError, ValueError):  # closed meanwhile, or a regular file (epoll: EPERM)
                continue
            current[fd] = (obj, mask)

    def _forget(self, fd: int) -> None:
        del self._current[fd]
        try:  # noqa: SIM105 - contextlib is one more import for the remote agent's start
            self._selector.unregister(fd)
        except (KeyError, ValueError, OSError):
            pass

    def wait(self, timeout: float) -> List[Tuple[Any, int]]:
        """[(object, events)] ready within ``timeout`` seconds (EVENT_READ 1, EVENT_WRITE 2)."""
        return [(key.data, events) for key, events in self._selector.select(timeout)]

    def close(self) -> None:
        self._current.clear()
        self._selector.close()


READABLE = 1  # selectors.EVENT_READ
WRITABLE = 2  # selectors.EVENT_WRITE

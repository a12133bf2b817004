"""Properties of the frame protocol both ends share (protocol.py), on the pure classes: no
processes, no sockets. Part of the fast data-path layer (`pytest -k datapath`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from remote_kernel import protocol as P

KINDS = st.sampled_from([P.DATA, P.DATA, P.DATA, P.OPEN, P.CLOSE, P.PAUSE, P.RESUME, P.SIGNAL, P.LOG])
FRAMES = st.lists(st.tuples(KINDS, st.integers(0, 5), st.binary(max_size=300)), max_size=40)


@given(frames=FRAMES, cuts=st.lists(st.integers(0, 20_000), max_size=30))
def test_datapath_the_decoder_returns_the_same_frames_however_the_bytes_are_split(
        frames: list[tuple[int, int, bytes]], cuts: list[int]) -> None:
    wire = b"".join(P.encode(kind, sid, seq, payload) for seq, (kind, sid, payload) in enumerate(frames, 1))
    decoder = P.FrameDecoder()
    decoded: list[P.Frame] = []
    start = 0
    for cut in [*sorted({min(cut, len(wire)) for cut in cuts}), len(wire)]:
        decoded += decoder.feed(wire[start:cut])
        start = cut
    assert decoded == [(kind, sid, seq, payload) for seq, (kind, sid, payload) in enumerate(frames, 1)]


@given(frames=FRAMES)
def test_datapath_the_outbox_sends_control_frames_first_and_keeps_each_class_in_order(
        frames: list[tuple[int, int, bytes]]) -> None:
    outbox = P.Outbox()
    for frame in frames:
        outbox.put(*frame)
    popped = []
    while (item := outbox.pop()) is not None:
        popped.append(item)
    control = [f for f in frames if f[0] in P.PRIORITY_FRAMES]
    bulk = [f for f in frames if f[0] not in P.PRIORITY_FRAMES]
    assert popped == control + bulk
    assert outbox.bulk_bytes == 0
    assert len(outbox) == 0


@dataclass
class End:
    """One end of the link as both real ends hold it: outbox, sender, decoder, receiver."""

    outbox: P.Outbox = field(default_factory=P.Outbox)
    sender: P.ReliableSender = field(default_factory=P.ReliableSender)
    receiver: P.ReliableReceiver = field(default_factory=P.ReliableReceiver)
    decoder: P.FrameDecoder = field(default_factory=P.FrameDecoder)
    sent_order: list[tuple[int, int, bytes]] = field(default_factory=list)
    delivered: list[tuple[int, int, bytes]] = field(default_factory=list)

    def sequence_all(self, wire: bytearray) -> None:
        while (item := self.outbox.pop()) is not None:
            self.sent_order.append(item)
            wire += self.sender.sequence(*item)

    def take(self, data: bytes) -> None:
        for kind, sid, seq, payload in self.decoder.feed(data):
            if kind in P.LINK_FRAMES:
                self.sender.acknowledge(seq)  # a link frame's seq is the peer's cumulative ack
            elif self.receiver.accept(seq, len(payload)):
                self.delivered.append((kind, sid, payload))


OPS = st.lists(st.one_of(
    st.tuples(st.just("put"), st.sampled_from("ab"), KINDS, st.binary(max_size=200)),
    st.tuples(st.just("carry"), st.sampled_from("ab"), st.integers(0, 600), st.just(b"")),
    st.tuples(st.just("ack"), st.sampled_from("ab"), st.just(0), st.just(b"")),
    st.tuples(st.just("duplicate"), st.sampled_from("ab"), st.just(0), st.just(b"")),
    st.tuples(st.just("drop"), st.just("a"), st.just(0), st.just(b"")),
), max_size=60)


@settings(max_examples=300)
@given(ops=OPS)
def test_datapath_every_frame_is_delivered_exactly_once_and_in_order_across_any_drops(
        ops: list[tuple[str, str, int, bytes]]) -> None:
    """Two ends, a byte pipe each way that may deliver part of what is in flight, repeat
    unacknowledged frames, or die (what is in flight is lost, partial frames included); after a
    drop, each end re-sends what the other's HELLO says it lacks, as tunnel.py and agent.py do."""
    ends = {"a": End(), "b": End()}
    pipes = {"a": bytearray(), "b": bytearray()}  # bytes in flight from that end
    other = {"a": "b", "b": "a"}
    for op, name, arg, payload in ops:
        end, peer, pipe = ends[name], ends[other[name]], pipes[name]
        if op == "put":
            end.outbox.put(arg, 1, payload)
            end.sequence_all(pipe)
        elif op == "carry":
            peer.take(bytes(pipe[:arg]))
            del pipe[:arg]
        elif op == "ack":
            pipe += end.receiver.make_ack()
        elif op == "duplicate":
            for wire in end.sender.unacknowledged():
                pipe += wire
        else:
            _drop_and_reattach(ends, pipes)
    _drop_and_reattach(ends, pipes)
    for name in "ab":
        ends[other[name]].take(bytes(pipes[name]))
    for name in "ab":
        assert ends[other[name]].delivered == ends[name].sent_order


def _drop_and_reattach(ends: dict[str, End], pipes: dict[str, bytearray]) -> None:
    for name, end in ends.items():
        pipes[name].clear()
        end.decoder.reset()
    for name, end in ends.items():
        peer = ends["b" if name == "a" else "a"]
        end.sender.acknowledge(peer.receiver.received)  # the peer's HELLO names what it has
        for wire in end.sender.unacknowledged():
            pipes[name] += wire


@given(sizes=st.lists(st.integers(0, 3 * P.ACK_EVERY_BYTES), min_size=1, max_size=20))
def test_datapath_an_ack_is_due_after_enough_bytes_or_enough_time_and_never_twice(sizes: list[int]) -> None:
    receiver = P.ReliableReceiver()
    for seq, size in enumerate(sizes, 1):
        assert receiver.accept(seq, size)
        if receiver.ack_due(0.0):
            assert receiver.bytes_since_ack >= P.ACK_EVERY_BYTES
            receiver.make_ack()
    assert receiver.ack_due(P.ACK_EVERY_SECONDS) == (receiver.acked != receiver.received)
    receiver.make_ack()
    assert not receiver.ack_due(3600.0)

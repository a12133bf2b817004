"""The data path in-process: the real agent (a subprocess of this Python, run as an SSH session
runs it) and the real tunnel, joined by pipes instead of SSH, against a stand-in kernel that
echoes every byte (datapath_harness.py). Faults are injected in the uplink. No sshd: the whole
layer runs in seconds (`pytest -k datapath`); the real-sshd tests (test_launch.py,
test_resilience.py) still cover the same paths end to end."""

from __future__ import annotations

import os
import random
import threading

from datapath_harness import WAIT, Rig, pattern, read_exactly, rig_fixture, session
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from remote_kernel import protocol as P
from remote_kernel.tunnel import RELEASE_STEP, Attached, LinkLost

__all__ = ["rig_fixture"]  # fixtures used here



def test_datapath_every_channel_echoes_each_byte_once_and_in_order(rig: Rig) -> None:
    for number, channel in enumerate(("shell", "iopub", "stdin", "control", "hb")):
        data = pattern(number, 300_000)
        rig.echo(channel, data)
    if rig.deliver:  # what the transport thread delivered, the pump granted back as window
        assert sum(uplink.released for uplink in rig.uplinks) >= 5 * 300_000 - RELEASE_STEP


def test_datapath_a_drop_in_the_middle_of_a_transfer_loses_and_repeats_nothing(rig: Rig) -> None:
    client = rig.client("shell")
    data = pattern(1, 2_000_000)
    client.sendall(data[:1_000_000])
    rig.drop()
    client.sendall(data[1_000_000:])
    assert read_exactly(client, len(data)) == data


def test_datapath_a_write_cut_in_the_middle_of_a_frame_is_sent_again_whole(rig: Rig) -> None:
    client = rig.client("control")
    assert rig.uplink is not None
    rig.uplink.truncate_next_send(7)  # inside the next frame's header
    client.sendall(b"first")
    rig.wait_for(LinkLost)
    rig.reattach()
    client.sendall(b"second")
    assert read_exactly(client, 11) == b"firstsecond"


def test_datapath_a_read_cut_in_the_middle_of_a_frame_is_received_again_whole(rig: Rig) -> None:
    client = rig.client("shell")
    assert rig.uplink is not None
    rig.uplink.truncate_next_recv(30)  # the echo's frame arrives in part, then the link dies
    data = pattern(2, 100_000)
    client.sendall(data)
    rig.wait_for(LinkLost)
    rig.reattach()
    assert read_exactly(client, len(data)) == data


def test_datapath_frames_delivered_twice_are_taken_once() -> None:
    rig = Rig(rng=random.Random(7), duplicate=0.5)
    try:
        rig.start()
        for number, channel in enumerate(("shell", "hb", "control")):
            rig.echo(channel, pattern(number, 200_000))
    finally:
        rig.close()


def test_datapath_a_slow_link_delivers_everything_in_order() -> None:
    rig = Rig(rng=random.Random(3), delay=0.005)
    try:
        rig.start()
        rig.echo("shell", pattern(4, 500_000))
    finally:
        rig.close()


def test_datapath_a_stalled_client_holds_up_no_other_and_loses_nothing() -> None:
    """A client that stops reading fills the per-stream water marks on both ends (PAUSE), so its
    own sender blocks; the heartbeat keeps answering; once it reads, everything arrives."""
    rig = Rig()
    try:
        rig.start()
        stalled = rig.client("shell")
        data = pattern(5, 64_000_000)  # more than every buffer on the way holds
        writer = threading.Thread(target=stalled.sendall, args=(data,), daemon=True)
        writer.start()
        for round_trip in range(20):
            rig.echo("hb", b"ping %d" % round_trip)
        assert writer.is_alive()  # the stalled stream is held back, end to end
        assert read_exactly(stalled, len(data)) == data
        writer.join(timeout=15)
        assert not writer.is_alive()
    finally:
        rig.close()


def test_datapath_shutdown_reports_the_exit_and_the_agent_removes_its_directory(rig: Rig) -> None:
    directory = rig.ready["dir"]
    info = rig.shutdown()
    assert info["reason"] == "shut down by the launcher"
    assert rig.agent_gone()
    assert not os.path.exists(directory)


def test_datapath_a_kernel_that_exits_is_reported_with_its_code(rig: Rig) -> None:
    client = rig.client("stdin")
    client.sendall(b"exit:7")
    info = rig.exited()
    assert info["code"] == 7
    assert "exited with code 7" in info["reason"]
    assert rig.agent_gone()


def test_datapath_attaching_after_the_kernel_ended_exits_with_the_gone_code(rig: Rig) -> None:
    rig.shutdown()
    assert rig.agent_gone()
    attach = session({"mode": "attach", "dir": rig.ready["dir"]})
    rig.procs.append(attach)
    assert attach.wait(timeout=WAIT) == P.EXIT_ATTACH_GONE


def test_datapath_a_reattach_with_the_wrong_token_is_refused_and_the_right_one_resumes(rig: Rig) -> None:
    client = rig.client("shell")
    client.sendall(b"before")
    assert read_exactly(client, 6) == b"before"
    assert rig.uplink is not None
    rig.uplink.cut()
    rig.wait_for(LinkLost)
    rig.attach_session("not-the-token")
    rig.wait_for(LinkLost)  # the agent drops that connection: the session ends, no HELLO
    assert not any(isinstance(event, Attached) for event in rig.seen)
    rig.reattach()
    client.sendall(b"after")
    assert read_exactly(client, 5) == b"after"


def test_datapath_without_a_launcher_the_lease_runs_out_and_the_kernel_is_stopped() -> None:
    rig = Rig(grace=1.0)
    try:
        rig.start()
        assert rig.uplink is not None
        rig.uplink.cut()
        rig.wait_for(LinkLost)
        assert rig.agent_gone()
        assert not os.path.exists(rig.ready["dir"])
    finally:
        rig.close()


def test_datapath_a_corrupt_stream_from_the_agent_ends_the_connection_not_the_kernel() -> None:
    rig = Rig()
    try:
        rig.start()
        shell = rig.client("shell")
        assert rig.uplink is not None
        rig.uplink.garble_next_recv()
        shell.sendall(b"before")
        lost = rig.wait_for(LinkLost)
        assert "corrupt" in lost.data
        rig.reattach()
        shell.sendall(b"after")
        assert read_exactly(shell, len(b"beforeafter")) == b"beforeafter"
    finally:
        rig.close()


OPS = st.lists(st.one_of(
    st.tuples(st.just("send"), st.integers(0, 2), st.integers(1, 300_000)),
    st.tuples(st.just("drop"), st.just(0), st.just(0)),
    st.tuples(st.just("cut-send"), st.integers(1, 40), st.just(0)),
    st.tuples(st.just("cut-recv"), st.integers(1, 40), st.just(0)),
), min_size=1, max_size=8)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS, seed=st.integers(0, 2**16), deliver=st.booleans())
def test_datapath_every_byte_arrives_exactly_once_and_in_order_across_any_drops(
        ops: list[tuple[str, int, int]], seed: int, deliver: bool) -> None:
    rig = Rig(deliver=deliver, rng=random.Random(seed), duplicate=0.1)
    try:
        rig.start()
        clients = [rig.client(channel) for channel in ("shell", "control", "hb")]
        sent = [bytearray() for _ in clients]
        for op, arg, size in ops:
            assert rig.uplink is not None
            if op == "send":
                data = pattern(arg * 7 + len(sent[arg]), size)
                clients[arg].sendall(data)
                sent[arg] += data
            elif op == "drop":
                rig.drop()
            else:
                (rig.uplink.truncate_next_send if op == "cut-send" else rig.uplink.truncate_next_recv)(arg)
                clients[2].sendall(b"x" * 50)  # frames both ways (pings too): the cut happens
                sent[2] += b"x" * 50
                rig.wait_for(LinkLost)
                rig.reattach()
        for client, expected in zip(clients, sent, strict=True):
            assert read_exactly(client, len(expected)) == bytes(expected)
    finally:
        rig.close()


def test_datapath_close_clients_frees_the_ports_at_once_and_the_link_still_stops_the_kernel(rig: Rig) -> None:
    """What the service does when an argv launcher is killed (a restart's now=True): its clients
    and ports go at once, as with a killed in-process launcher; the stop still reaches the agent."""
    import socket
    import time

    client = rig.client("shell")
    rig.echo("shell", b"before")
    rig.tunnel.close_clients()
    client.settimeout(WAIT)
    assert client.recv(1) == b""  # the client sees its connection end
    deadline = time.monotonic() + WAIT
    while True:  # the port is free for a successor to bind
        probe = socket.socket()
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as connection.bind_listeners
        try:
            probe.bind(("127.0.0.1", rig.ports["shell"]))
            break
        except OSError:
            assert time.monotonic() < deadline, "the shell port was not freed"
            time.sleep(0.02)
        finally:
            probe.close()
    assert rig.shutdown()["code"] == 0 or rig.agent_gone()

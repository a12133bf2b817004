"""The kernel never dies of bad input to our own code (issue 16, items 2 and 3).

A kernel is started through the real sshd; then this test, as the same user, attacks the agent's
reattach socket (agent.sock) and the launcher's local ports directly: garbage, truncated and
huge frames, wrong tokens, HELLOs that are not JSON objects, more than a thousand idle
connections, and a process out of descriptors. Afterwards the same kernel (same pid) still
answers an execute_request, and a dropped connection is still reattached.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.blocking.client import BlockingKernelClient
from launch_helpers import KernelFacts, execute, kernel_entry, kernel_facts, pid_alive, started_kernel, write_spec
from sshd import SSHServer

from remote_kernel import protocol as P

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]

FLOOD = 1100  # connections: more than select() can watch (FD_SETSIZE 1024)


Kernel = tuple[Any, BlockingKernelClient, KernelFacts, SSHServer]


@pytest.fixture
def kernel(sshd_factory: Any, remote_python: Path) -> Iterator[Kernel]:
    server: SSHServer = sshd_factory()
    entry = kernel_entry(server, remote_python, "robust", host=server.host_entry(name="fixture", keepalive=1.0))
    write_spec(entry)
    with started_kernel("robust") as (km, kc):
        yield km, kc, kernel_facts(kc), server


@pytest.fixture
def many_descriptors() -> Iterator[None]:
    """Room in this test process for FLOOD client sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = FLOOD + 512
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.fail(f"RLIMIT_NOFILE hard limit {hard} < {wanted}: raise it (ulimit -Hn)", pytrace=False)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def agent_socket(facts: KernelFacts) -> str:
    return str(facts.remote_dir / "agent.sock")


def send_and_close(path: str, data: bytes) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(path)
        with contextlib.suppress(OSError):  # the agent may close first: that is the point
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            sock.recv(1)


def hello(payload: bytes, *, kind: int = P.HELLO, length: int | None = None) -> bytes:
    return P.HEADER.pack(kind, 0, 0, len(payload) if length is None else length) + payload


MALFORMED = {
    "garbage": b"\x00\xffgarbage that is not a frame" * 10,
    "a truncated header": hello(b"")[:7],
    "a huge length": hello(b"{}", length=2**32 - 1),
    "a length just over the HELLO limit": hello(b"x", length=4097),
    "another frame kind first": hello(b"{}", kind=P.DATA),
    "a wrong token": hello(json.dumps({"token": "0" * 64}).encode()),
    "a wrong token that is not ASCII": hello(json.dumps({"token": "\u00e9" * 64}, ensure_ascii=False).encode()),
    "a token that is not a string": hello(b'{"token": 12345}'),
    "no token": hello(b'{"kill": true}'),
    "a payload that is not JSON": hello(b"this is not json"),
    "a JSON list": hello(b'["token", "kill"]'),
    "a JSON string": hello(b'"token"'),
    "invalid UTF-8": hello(b'{"token": "\xff\xfe"}'),
    "deeply nested JSON": hello(b"[" * 4000),
    "a truncated payload": hello(b'{"token": "abc"}', length=200),
}


def assert_kernel_lives(kc: BlockingKernelClient, facts: KernelFacts) -> None:
    assert pid_alive(facts.agent_pid), "the agent died"
    assert execute(kc, "print(6 * 7)", timeout=60).stdout.strip() == "42"
    assert kernel_facts(kc).pid == facts.pid


def test_malformed_hellos_on_the_agent_socket_are_dropped_and_the_kernel_lives(kernel: Any) -> None:
    _km, kc, facts, _server = kernel
    path = agent_socket(facts)
    for name, data in MALFORMED.items():
        send_and_close(path, data)
        assert pid_alive(facts.agent_pid), f"the agent died of {name}"
    assert_kernel_lives(kc, facts)


def test_a_peer_that_never_finishes_its_hello_is_dropped_after_a_few_seconds(kernel: Any) -> None:
    _km, kc, facts, _server = kernel
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(agent_socket(facts))
        sock.sendall(hello(b'{"token": "')[:30])
        sock.settimeout(20)
        assert sock.recv(1) == b"", "the agent should close an unauthenticated peer"
    assert_kernel_lives(kc, facts)


def test_a_thousand_idle_connections_to_the_agent_neither_kill_it_nor_stop_a_reattach(
    kernel: Any, many_descriptors: None
) -> None:
    _km, kc, facts, server = kernel
    # The agent inherits sshd's limit; allow it descriptors beyond select()'s 1024 as a login
    # node's might (where ~1,020 connections used to crash it).
    resource.prlimit(facts.agent_pid, resource.RLIMIT_NOFILE, (FLOOD * 2, FLOOD * 2))
    idle = []
    try:
        for _ in range(FLOOD):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            idle.append(sock)
            sock.connect(agent_socket(facts))
        assert_kernel_lives(kc, facts)
        for pid in server.session_pids():  # a dropped network while the flood is still open
            os.kill(pid, signal.SIGKILL)
        assert_kernel_lives(kc, facts)
    finally:
        for sock in idle:
            sock.close()


def test_an_agent_out_of_descriptors_keeps_its_kernel(kernel: Any) -> None:
    _km, kc, facts, _server = kernel
    open_now = len(os.listdir(f"/proc/{facts.agent_pid}/fd"))
    resource.prlimit(facts.agent_pid, resource.RLIMIT_NOFILE, (open_now + 2, open_now + 2))
    idle = []
    try:
        for _ in range(50):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            idle.append(sock)
            sock.connect(agent_socket(facts))
        busy = cpu_seconds_over(facts.agent_pid, 2.0)
        assert busy < 1.0, f"the agent spun ({busy:.2f} s of CPU in 2 s)"
        assert_kernel_lives(kc, facts)
    finally:
        for sock in idle:
            sock.close()


def cpu_seconds_over(pid: int, seconds: float) -> float:
    """CPU time (user + system) ``pid`` used during the next ``seconds``."""

    def cpu() -> float:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    before = cpu()
    time.sleep(seconds)
    return cpu() - before


def flood_port(port: int, count: int) -> list[socket.socket]:
    opened = []
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        opened.append(sock)
        sock.settimeout(5)
        with contextlib.suppress(OSError):  # refused or reset once the launcher is at its limit
            sock.connect(("127.0.0.1", port))
    return opened


@pytest.mark.parametrize("launcher_limit", [None, 128], ids=["default limit", "128 descriptors"])
def test_a_thousand_connections_to_a_launcher_port_do_not_make_it_spin(
    kernel: Any, many_descriptors: None, launcher_limit: int | None
) -> None:
    km, kc, facts, _server = kernel
    launcher = km.provisioner.process.pid
    if launcher_limit is not None:  # then accept() fails with EMFILE before the client cap
        resource.prlimit(launcher, resource.RLIMIT_NOFILE, (launcher_limit, launcher_limit))
    flood = flood_port(kc.shell_port, FLOOD)
    try:
        busy = cpu_seconds_over(launcher, 2.0)
        assert busy < 1.0, f"the launcher spun ({busy:.2f} s of CPU in 2 s)"
        assert_kernel_lives(kc, facts)
    finally:
        for sock in flood:
            sock.close()
    if launcher_limit is None:
        # Once the flood is gone, new clients are served again.
        other = BlockingKernelClient(connection_file=km.connection_file)
        other.load_connection_file()
        other.start_channels()
        try:
            other.wait_for_ready(timeout=60)
            assert execute(other, "print(7 * 6)").stdout.strip() == "42"
        finally:
            other.stop_channels()

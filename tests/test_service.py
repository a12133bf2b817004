"""The per-user service (issue 14): one authenticated connection per host shared by its kernels,
launchers that only relay the lifecycle, a private socket, and what happens when it dies.

Real components: the service daemon as a user gets it (started on demand by a launch), the
private OpenSSH sshd, real ipykernel, jupyter_client's KernelManager.
"""

from __future__ import annotations

import json
import os
import signal
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.manager import KernelManager
from launch_helpers import (
    execute,
    kernel_entry,
    kernel_facts,
    restarted,
    run_cli,
    single_kernel_config,
    started_kernel,
    wait_remote_gone,
    wait_until,
    write_spec,
)
from os_users import OSUser, os_user_fixture, os_users_fixture, run_python_as
from sshd import SSHServer

from remote_kernel.service import paths, testing

pytestmark = pytest.mark.slow
__all__ = ["os_user_fixture", "os_users_fixture"]  # fixtures used here


@pytest.fixture(autouse=True)
def service_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REMOTE_KERNEL_SERVICE", "on")


def service_dir() -> Path:
    return Path(os.environ["XDG_RUNTIME_DIR"]) / "remote-kernel"


def tcp_connections_to(port: int) -> int:
    """Established TCP connections from a client to 127.0.0.1:``port`` (what `ss -tn` lists)."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        remote, state = fields[2], fields[3]
        if state == "01" and int(remote.split(":")[1], 16) == port:
            count += 1
    return count


def accepted_logins(server: SSHServer) -> int:
    return server.log_path.read_text(errors="replace").count("Accepted publickey")


def service_status() -> dict:
    result = run_cli(["--json", "service", "status"])
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture
def three_specs(sshd: SSHServer, remote_python: Path) -> list[str]:
    names = [f"svc{i}" for i in range(3)]
    for name in names:
        write_spec(kernel_entry(sshd, remote_python, name))
    return names


@pytest.fixture
def kernels(three_specs: list[str]) -> Iterator[list]:
    with started_kernel(three_specs[0]) as a, started_kernel(three_specs[1]) as b, started_kernel(three_specs[2]) as c:
        yield [a, b, c]


def test_three_kernels_from_kernel_manager_share_one_authenticated_connection(
        sshd: SSHServer, kernels: list, tmp_path: Path, remote_python: Path) -> None:
    facts = [kernel_facts(kc) for _km, kc in kernels]
    for _km, kc in kernels:
        assert execute(kc, "1+1").result == "2"
    assert tcp_connections_to(sshd.port) == 1
    status = service_status()
    [connection] = status["connections"]
    assert connection["kernels"] == 3
    assert connection["auth"] == "publickey"
    assert len(status["kernels"]) == 3
    config = single_kernel_config(tmp_path / "rk.toml", sshd, "other", remote_python)
    ps = run_cli(["--config", str(config), "--json", "ps"])
    assert ps.returncode == 0, ps.stderr
    [shown] = json.loads(ps.stdout)["service"]["connections"]
    assert (shown["host"], shown["kernels"]) == ("fixture", 3)
    for km, _kc in kernels:
        km.shutdown_kernel(now=False)
    for fact in facts:
        assert wait_remote_gone(fact) == []


def test_a_dropped_connection_is_authenticated_again_once_for_all_its_kernels(
        sshd: SSHServer, kernels: list) -> None:
    before = accepted_logins(sshd)
    [session] = sshd.session_pids()
    os.kill(session, signal.SIGKILL)  # the network "drops": the server side of the connection dies
    for _km, kc in kernels:
        assert execute(kc, "40+2", timeout=60).result == "42"
    assert accepted_logins(sshd) - before == 1
    assert tcp_connections_to(sshd.port) == 1


def test_a_killed_service_is_replaced_and_the_new_one_takes_the_kernel_over_with_its_state(
        sshd: SSHServer, remote_python: Path, tmp_path: Path) -> None:
    write_spec(kernel_entry(sshd, remote_python, "takeover", reconnect_grace=30.0))
    km = KernelManager(kernel_name="takeover")
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=45)
        facts = kernel_facts(kc)
        assert execute(kc, "x = 42").status == "ok"
        pid = testing.service_pid(service_dir())
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        # The argv launcher asks a new service to take the kernel over on the same ports: the
        # client (which knows nothing of this) reconnects by itself and finds its variables.
        # (What a cell sends during the second of the take-over may lose its iopub output, as after
        # any ZMQ reconnect, until the SUB's subscription is through: wait_for_ready waits for that.)
        assert wait_until(lambda: _hosted_with_client(pid, "takeover"), timeout=30)
        kc.wait_for_ready(timeout=30)
        assert execute(kc, "x", timeout=60).result == "42"
        assert kernel_facts(kc).pid == facts.pid
        assert km.is_alive()
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=False)
    assert wait_remote_gone(facts, timeout=20) == []


def _hosted_with_client(dead_pid: int, name: str) -> bool:
    result = run_cli(["--json", "service", "status"])
    if result.returncode != 0:
        return False  # the new service is not up yet
    status = json.loads(result.stdout)
    return status.get("pid") not in (None, dead_pid) and any(
        kernel["name"] == name and kernel["clients"] >= 1 for kernel in status.get("kernels", []))


def test_another_user_cannot_use_the_service_socket(sshd: SSHServer, os_user: OSUser) -> None:
    assert run_cli(["service", "start"]).returncode == 0
    sock = paths.socket_path(service_dir())
    assert stat.S_IMODE(service_dir().stat().st_mode) == 0o700
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    code = f"""
import socket
s = socket.socket(socket.AF_UNIX)
try:
    s.connect({str(sock)!r})
except OSError as exc:
    print("refused", type(exc).__name__)
else:
    try:
        s.sendall(b'{{"op":"status"}}\\n')
        s.settimeout(10)
        print("answer", repr(s.recv(100)))
    except OSError as exc:
        print("answer", type(exc).__name__)
"""
    assert run_python_as(os_user, code).stdout.split()[0] == "refused"
    # Even with the file modes opened up, the peer check (SO_PEERCRED) turns the other uid away.
    os.chmod(sock.parent, 0o777)  # noqa: S103 - the test loosens our own socket on purpose
    os.chmod(sock, 0o777)  # noqa: S103
    try:
        answer = run_python_as(os_user, code).stdout.strip()
        assert answer in ("answer b''", "answer ConnectionResetError", "answer BrokenPipeError"), answer
    finally:
        os.chmod(sock, 0o600)
        os.chmod(sock.parent, 0o700)
    assert service_status()["pid"] == testing.service_pid(service_dir())


def test_service_start_status_stop(sshd: SSHServer) -> None:
    assert run_cli(["service", "status"]).returncode == 1  # not running: status does not start it
    assert run_cli(["service", "start"]).returncode == 0
    pid = testing.service_pid(service_dir())
    assert pid is not None
    assert service_status()["connections"] == []
    stopped = run_cli(["service", "stop"])
    assert stopped.returncode == 0, stopped.stderr
    assert wait_until(lambda: testing.service_pid(service_dir()) is None, timeout=10)
    assert not paths.socket_path(service_dir()).exists()


def test_a_host_that_refuses_a_second_session_gets_a_second_connection(
        sshd_factory: Any, remote_python: Path) -> None:
    server = sshd_factory(extra_config="MaxSessions 1")
    for name in ("one", "two"):
        write_spec(kernel_entry(server, remote_python, name))
    with started_kernel("one") as (_a, kc1), started_kernel("two") as (_b, kc2):
        assert execute(kc1, "1").result == "1"
        assert execute(kc2, "2").result == "2"
        assert tcp_connections_to(server.port) == 2
        assert sorted(c["kernels"] for c in service_status()["connections"]) == [1, 1]


def test_an_idle_service_exits_by_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REMOTE_KERNEL_SERVICE_IDLE", "1")
    assert run_cli(["service", "start"]).returncode == 0
    assert testing.service_pid(service_dir()) is not None
    assert wait_until(lambda: testing.service_pid(service_dir()) is None, timeout=15)
    assert not paths.socket_path(service_dir()).exists()


@pytest.mark.parametrize("spare", [True, False], ids=["spare", "no-spare"])
def test_restart_now_through_the_service_waits_for_the_old_kernel_to_free_the_ports(
        sshd: SSHServer, remote_python: Path, spare: bool) -> None:
    """restart_kernel(now=True) SIGKILLs the launcher and starts the next at once on the same
    connection file; the service still held its ports for ~0.2 s while it stopped the old kernel
    (found by review: 4 of 10 restarts ended with "Address already in use" and a dead kernel)."""
    write_spec(kernel_entry(sshd, remote_python, "restarting", spare_kernel=spare))
    with started_kernel("restarting") as (km, kc):
        for _ in range(4):
            before, after = restarted(km, kc, now=True)
            assert after.pid != before.pid
            assert execute(kc, "'state' in globals()").result == "False"
            assert execute(kc, "print('still here')").stdout.strip() == "still here"
            assert km.is_alive()

"""Kernels that outlive Jupyter and the laptop (issue 15): `start --detach`, `attach` after the
service and every launcher were killed (a reboot, as far as this machine can show one), `stop`,
`interrupt`, `ps`, the lease, and the record nobody else may read.

Real components: the per-user service as a user gets it (started on demand), the private OpenSSH
sshd, real ipykernel, jupyter_client's BlockingKernelClient on the printed connection file.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jupyter_client import BlockingKernelClient
from launch_helpers import (
    execute,
    kernel_facts,
    pid_alive,
    run_cli,
    single_kernel_config,
    wait_remote_gone,
    wait_until,
)
from os_users import OSUser, os_user_fixture, os_users_fixture, run_python_as
from sshd import SSHServer

from remote_kernel.service import testing

pytestmark = pytest.mark.slow
__all__ = ["os_user_fixture", "os_users_fixture"]  # fixtures used here


@pytest.fixture(autouse=True)
def service_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REMOTE_KERNEL_SERVICE", "on")


@pytest.fixture
def config(sshd: SSHServer, remote_python: Path, tmp_path: Path) -> Path:
    return single_kernel_config(tmp_path / "rk.toml", sshd, "lab", remote_python)


def cli_json(config: Path, *args: str, timeout: float = 90.0) -> dict[str, Any]:
    result = run_cli(["--config", str(config), "--json", *args], timeout=timeout)
    assert result.returncode == 0, f"{args}: {result.stdout}\n{result.stderr}"
    text = result.stdout.strip()
    return json.loads(text if text.startswith("{\n") else text.splitlines()[-1])


def client_for(path: str) -> BlockingKernelClient:
    kc = BlockingKernelClient(connection_file=path)
    kc.load_connection_file()
    kc.start_channels()
    kc.wait_for_ready(timeout=30)
    return kc


@pytest.fixture
def detached(config: Path) -> Iterator[dict[str, Any]]:
    started = cli_json(config, "start", "lab", "--detach", "--lease", "5m")  # a leak cleans itself up
    yield started
    run_cli(["--config", str(config), "stop", started["id"]], timeout=60)


def service_dir() -> Path:
    return Path(os.environ["XDG_RUNTIME_DIR"]) / "remote-kernel"


def record_dir() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "remote-kernel" / "kernels"


def detached_rows(config: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = cli_json(config, "ps")["detached"]
    return rows


def test_a_detached_kernel_survives_its_service_and_is_attached_again_with_its_state(
        config: Path, detached: dict[str, Any]) -> None:
    path = detached["connection_file"]
    assert Path(path).parent.name == "external_kernels"
    kc = client_for(path)
    try:
        assert execute(kc, "x = 42").status == "ok"
        facts = kernel_facts(kc)
    finally:
        kc.stop_channels()
    [row] = detached_rows(config)
    assert (row["id"], row["entry"], row["state"]) == (detached["id"], "lab", "attached")
    # `ps` needs no config file to list detached kernels.
    without_config = run_cli(["--json", "ps"])
    assert without_config.returncode == 0, without_config.stderr
    assert [r["id"] for r in json.loads(without_config.stdout)["detached"]] == [detached["id"]]

    # "Reboot": the service (which served the kernel's ports) is killed; nothing local is left running.
    pid = testing.service_pid(service_dir())
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: not pid_alive(pid), timeout=10)
    assert pid_alive(facts.pid)  # the remote kernel waits under its lease
    [row] = detached_rows(config)
    assert row["state"] == "detached"
    assert row["lease_left"] is not None and row["lease_left"] > 0

    attached = cli_json(config, "attach", detached["id"])
    assert attached["connection_file"] == path and not attached["new_ports"]
    kc = client_for(path)  # the same file, key and ports
    try:
        assert execute(kc, "x").result == "42"
        assert kernel_facts(kc).pid == facts.pid
    finally:
        kc.stop_channels()

    stopped = cli_json(config, "stop", detached["id"])
    assert not stopped["was_gone"]
    assert wait_remote_gone(facts, timeout=20) == []
    assert list(record_dir().glob("*.json")) == []
    assert not Path(path).exists()
    assert detached_rows(config) == []


def test_attach_serves_new_ports_when_the_old_ones_are_taken_and_says_so(
        config: Path, detached: dict[str, Any]) -> None:
    path = detached["connection_file"]
    old = json.loads(Path(path).read_text())
    pid = testing.service_pid(service_dir())
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: not pid_alive(pid), timeout=10)
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # The killed service's listener may linger a moment after its process is gone.
    assert wait_until(lambda: _bound(squatter, old["shell_port"]), timeout=10)
    squatter.listen(1)
    try:
        result = run_cli(["--config", str(config), "attach", detached["id"]], timeout=90)
        assert result.returncode == 0, result.stderr
        assert "new ports" in result.stdout
        new = json.loads(Path(path).read_text())
        assert new["shell_port"] != old["shell_port"] and new["key"] == old["key"]
        kc = client_for(path)
        try:
            assert execute(kc, "1+1").result == "2"
        finally:
            kc.stop_channels()
    finally:
        squatter.close()


def _bound(sock: socket.socket, port: int) -> bool:
    try:
        sock.bind(("127.0.0.1", port))
    except OSError:
        return False
    return True


def test_interrupt_stops_the_running_cell_and_the_kernel_lives(config: Path, detached: dict[str, Any]) -> None:
    kc = client_for(detached["connection_file"])
    try:
        msg_id = kc.execute("import time; time.sleep(60)")
        time.sleep(1.0)
        cli_json(config, "interrupt", detached["id"])
        reply = kc.get_shell_msg(timeout=20)
        assert reply["parent_header"]["msg_id"] == msg_id
        assert reply["content"]["ename"] == "KeyboardInterrupt"
        assert execute(kc, "1+1").result == "2"
    finally:
        kc.stop_channels()


def test_a_detached_kernel_whose_lease_ends_unattended_is_reaped_and_gc_forgets_it(config: Path) -> None:
    started = cli_json(config, "start", "lab", "--detach", "--lease", "3s")
    kc = client_for(started["connection_file"])
    try:
        facts = kernel_facts(kc)
    finally:
        kc.stop_channels()
    pid = testing.service_pid(service_dir())
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    assert wait_remote_gone(facts, timeout=30) == []  # the lease (3 s) ran out with nobody attached
    cli_json(config, "gc")
    assert detached_rows(config) == []
    assert list(record_dir().glob("*.json")) == []


def test_the_record_is_private_and_another_user_cannot_read_or_use_it(
        config: Path, detached: dict[str, Any], os_user: OSUser) -> None:
    [record] = record_dir().glob("*.json")
    assert stat.S_IMODE(record.stat().st_mode) == 0o600
    assert stat.S_IMODE(record_dir().stat().st_mode) == 0o700
    assert stat.S_IMODE(Path(detached["connection_file"]).stat().st_mode) == 0o600
    answer = run_python_as(os_user, f"""
try:
    open({str(record)!r}).read()
    print("read")
except OSError as exc:
    print("refused", type(exc).__name__)
""").stdout.split()
    assert answer[0] == "refused"
    # The token is nowhere else: not in the connection file, not in the service's log.
    token = json.loads(record.read_text())["token"]
    assert token not in Path(detached["connection_file"]).read_text()
    assert token not in (service_dir() / "service.log").read_text()


def test_start_detach_refuses_f_and_lease_needs_detach(config: Path) -> None:
    both = run_cli(["--config", str(config), "start", "lab", "--lease", "1h"])
    assert both.returncode == 2 and "--lease goes with --detach" in both.stderr
    bad = run_cli(["--config", str(config), "start", "lab", "--detach", "--lease", "soon"])
    assert bad.returncode == 2 and "--lease" in bad.stderr
    unknown = run_cli(["--config", str(config), "attach", "nosuch"])
    assert unknown.returncode == 2 and "no detached kernel 'nosuch'" in unknown.stderr

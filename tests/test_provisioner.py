"""The jupyter_client provisioner: `sync --provisioner` specs started by a real KernelManager in
this process (no launcher subprocess), with every promise of the argv path: interrupt in both
modes, restart, shutdown that leaves nothing, a dropped connection survived, and a failed start
that raises instead of leaving a kernel id that never answers. The same spec's argv still works
for a client that launches argv itself."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.manager import KernelManager
from jupyter_server_helper import jupyter_server
from launch_helpers import (
    connect_client,
    execute,
    interrupted_cell,
    kernel_facts,
    pid_alive,
    remote_leftovers,
    restarted,
    run_cli,
    single_kernel_config,
    started_kernel,
    user_kernels_dir,
    wait_remote_gone,
    wait_until,
)
from sshd import SSHServer, children_of

from remote_kernel.entry import HostEntry, KernelEntry
from remote_kernel.kernelspec import render_kernel_json
from remote_kernel.provisioner import RemoteKernelProvisioner

Synced = Callable[..., Path]


@pytest.fixture
def synced(sshd: SSHServer, remote_python: Path, tmp_path: Path) -> Synced:
    """``synced(name, **kernel_fields)``: a config entry on the session sshd, synced with --provisioner."""

    def make(name: str = "prov", python: Path | None = None, **fields: Any) -> Path:
        fields.setdefault("reconnect_grace", 20)
        config = single_kernel_config(tmp_path / "remote-kernels.toml", sshd, name, python or remote_python, **fields)
        result = run_cli(["--config", str(config), "sync", "--provisioner"])
        assert result.returncode == 0, result.stderr
        return user_kernels_dir() / name

    return make


def test_a_provisioner_spec_names_our_provisioner_and_keeps_the_argv_fallback() -> None:
    entry = KernelEntry(name="k", host=HostEntry(name="h"), display_name="K", launcher="provisioner")
    spec = render_kernel_json(entry, spec_dir=Path("/specs/k"), config_path=Path("/c.toml"), python="/py")
    assert spec["metadata"]["kernel_provisioner"] == {"provisioner_name": "remote-kernel-provisioner", "config": {}}
    assert spec["argv"] == ["/py", "-m", "remote_kernel", "from-spec", "/specs/k", "-f", "{connection_file}"]
    argv_only = render_kernel_json(KernelEntry(name="k", host=HostEntry(name="h"), display_name="K"),
                                   spec_dir=Path("/specs/k"), config_path=Path("/c.toml"), python="/py")
    assert "kernel_provisioner" not in argv_only["metadata"]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["signal", "message"])
def test_kernel_manager_runs_the_kernel_in_process_and_interrupts_it_in_both_modes(synced: Synced, mode: str) -> None:
    synced("prov", interrupt_mode=mode)
    children_before = _child_pids()
    with started_kernel("prov") as (km, kc):
        assert isinstance(km.provisioner, RemoteKernelProvisioner)
        assert _child_pids() == children_before, "the provisioner must not start a launcher process"
        before = kernel_facts(kc)
        assert execute(kc, "1+1").result == "2"
        assert interrupted_cell(km, kc).ename == "KeyboardInterrupt"
        assert kernel_facts(kc).pid == before.pid
    assert wait_remote_gone(before) == []


@pytest.mark.slow
@pytest.mark.parametrize("now", [False, True], ids=["graceful", "now"])
def test_restart_under_the_provisioner_gives_a_new_kernel_and_leaves_nothing_of_the_old(
    synced: Synced, now: bool
) -> None:
    synced("prov")
    with started_kernel("prov") as (km, kc):
        before, after = restarted(km, kc, now=now)
        assert after.pid != before.pid
        assert execute(kc, "'state' in globals()").result == "False"
        assert wait_remote_gone(before, timeout=10) == []
        assert remote_leftovers(after) != []
    assert wait_remote_gone(after) == []


@pytest.mark.slow
def test_a_dropped_connection_under_the_provisioner_is_reattached_with_the_state_kept(
    sshd_factory: Any, remote_python: Path, tmp_path: Path
) -> None:
    server: SSHServer = sshd_factory()
    config = single_kernel_config(tmp_path / "remote-kernels.toml", server, "prov-drop", remote_python,
                                  reconnect_grace=30)
    assert run_cli(["--config", str(config), "sync", "--provisioner"]).returncode == 0
    with started_kernel("prov-drop") as (_, kc):
        execute(kc, "kept = 'yes'")
        for pid in server.session_pids():
            os.kill(pid, signal.SIGKILL)
        assert execute(kc, "print(kept)", timeout=60).stdout.strip() == "yes"
        facts = kernel_facts(kc)
    assert wait_remote_gone(facts) == []


@pytest.mark.slow
def test_a_failed_start_raises_with_the_reason_and_leaves_no_kernel(
    synced: Synced, python_without_ipykernel: Path
) -> None:
    synced("prov-bad", python=python_without_ipykernel)
    km = KernelManager(kernel_name="prov-bad")
    began = time.monotonic()
    with pytest.raises(Exception, match="ipykernel") as caught:
        km.start_kernel()
    assert time.monotonic() - began < 30
    assert "Traceback" not in str(caught.value)
    assert not km.has_kernel


@pytest.mark.slow
def test_the_same_spec_launches_through_its_argv_where_no_provisioner_is_used(
    synced: Synced, tmp_path: Path
) -> None:
    spec_dir = synced("prov-argv")
    spec = json.loads((spec_dir / "kernel.json").read_text())
    assert spec["metadata"]["kernel_provisioner"]["provisioner_name"] == "remote-kernel-provisioner"
    connection_file = tmp_path / "argv-kernel.json"
    argv = [part.replace("{connection_file}", str(connection_file)) for part in spec["argv"]]
    launcher = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, start_new_session=True)
    try:
        assert wait_until(connection_file.exists, timeout=30)
        kc = connect_client(connection_file)
        assert execute(kc, "6*7").result == "42"
        facts = kernel_facts(kc)
        kc.stop_channels()
    finally:
        launcher.send_signal(signal.SIGTERM)
        launcher.wait(timeout=20)
    assert wait_remote_gone(facts) == []


def _child_pids() -> set[int]:
    """Direct children of this test process (a launcher subprocess would be one)."""
    return set(children_of(os.getpid()))


@pytest.mark.slow
def test_jupyter_server_starts_a_provisioner_kernel_runs_code_on_it_and_shuts_it_down(
    synced: Synced, tmp_path: Path
) -> None:
    synced("prov-server")
    with jupyter_server(tmp_path) as server:
        status, kernel = server.request("POST", "/api/kernels", {"name": "prov-server"})
        assert status == 201, (status, kernel, server.log()[-3000:])
        result = server.execute(kernel["id"], "import os; print('pid', os.getpid(), os.environ.get('JPY_PARENT_PID'))")
        assert result["status"] == "ok", (result, server.log()[-3000:])
        _, pid, agent_pid = result["stdout"].split()
        assert "remote-kernel" in server.log()  # our steps reach the server's log
        assert server.request("DELETE", f"/api/kernels/{kernel['id']}")[0] == 204
        assert wait_until(lambda: not (pid_alive(int(pid)) or pid_alive(int(agent_pid))), timeout=15)


@pytest.mark.slow
def test_a_failed_start_in_jupyter_server_is_an_error_with_the_reason_and_no_ghost_kernel(
    synced: Synced, python_without_ipykernel: Path, tmp_path: Path
) -> None:
    synced("prov-server-bad", python=python_without_ipykernel)
    with jupyter_server(tmp_path) as server:
        status, body = server.request("POST", "/api/kernels", {"name": "prov-server-bad"})
        assert status >= 500, (status, body)
        assert "ipykernel" in json.dumps(body) or "ipykernel" in server.log(), (body, server.log()[-3000:])
        assert server.request("GET", "/api/kernels")[1] == []  # no kernel id left that never answers

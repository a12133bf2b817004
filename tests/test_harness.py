"""The test harness itself: the private sshd, strict host keys, and the isolation of every test."""

from __future__ import annotations

import os
import pwd
import signal
import subprocess
import time
from pathlib import Path

import paramiko
import pytest
from conftest import IsolatedEnv, SSHDFactory
from sshd import SSHServer, children_of, process_gone


def _client_for(server: SSHServer, known_hosts: Path) -> paramiko.SSHClient:
    client = paramiko.SSHClient()
    client.load_host_keys(str(known_hosts))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(
        server.host,
        server.port,
        server.user,
        key_filename=str(server.client_key),
        look_for_keys=False,
        allow_agent=False,
        timeout=10,
    )
    return client


def _run(client: paramiko.SSHClient, command: str) -> str:
    _, stdout, _ = client.exec_command(command, timeout=10)
    return stdout.read().decode().strip()


def test_paramiko_runs_a_command_on_the_sshd_fixture_under_strict_host_keys(
    sshd: SSHServer,
) -> None:
    client = _client_for(sshd, sshd.known_hosts)
    try:
        assert _run(client, "echo ok") == "ok"
    finally:
        client.close()


def test_an_unknown_host_key_is_rejected(sshd: SSHServer, tmp_path: Path) -> None:
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    with pytest.raises(paramiko.SSHException, match="not found in known_hosts"):
        _client_for(sshd, empty)


def test_the_remote_login_gets_a_private_home_not_the_real_one(sshd: SSHServer) -> None:
    client = _client_for(sshd, sshd.known_hosts)
    try:
        assert _run(client, "echo $HOME") == str(sshd.remote_home)
    finally:
        client.close()


def test_isolation_moves_home_ssh_and_jupyter_dirs_under_tmp_path(isolated_env: IsolatedEnv, tmp_path: Path) -> None:
    from jupyter_core import paths

    assert Path.home() == tmp_path / "home"
    assert Path("~/.ssh").expanduser().stat().st_mode & 0o777 == 0o700
    assert Path.cwd() == tmp_path
    for directory in (
        paths.jupyter_data_dir(),
        paths.jupyter_runtime_dir(),
        paths.jupyter_config_dir(),
    ):
        assert Path(directory).is_relative_to(tmp_path)
    real_home = Path(pwd.getpwuid(os.getuid()).pw_dir)
    assert not any(Path(p).is_relative_to(real_home) for p in paths.jupyter_path())
    for name in (
        "SSH_AUTH_SOCK",
        "JUPYTER_PATH",
        "JUPYTER_PREFER_ENV_PATH",
        "REMOTE_KERNEL_CONFIG",
    ):
        assert name not in os.environ


def test_extra_config_overrides_the_defaults_and_servers_stop_at_teardown(
    sshd_factory: SSHDFactory,
) -> None:
    server = sshd_factory(extra_config="AllowTcpForwarding no")
    effective = subprocess.run(
        ["/usr/sbin/sshd", "-T", "-f", str(server.config_path), "-C", "user=" + server.user],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout
    assert "allowtcpforwarding no" in effective
    server.stop()
    assert not server.is_running()


def test_killing_a_session_child_drops_the_connection(sshd_factory: SSHDFactory) -> None:
    sshd = sshd_factory()  # a server of its own: killing sessions must not hit other tests
    client = _client_for(sshd, sshd.known_hosts)
    try:
        assert _run(client, "echo up") == "up"
        sessions = sshd.session_pids()
        assert sessions, "an open connection has a per-connection sshd child"
        for pid in sessions:
            os.kill(pid, signal.SIGKILL)
        transport = client.get_transport()
        assert transport is not None
        deadline = time.monotonic() + 5
        while transport.is_active() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not transport.is_active()
    finally:
        client.close()
    assert all(pid not in children_of(sshd.pid) for pid in sessions)


def test_stop_ends_the_sessions_and_start_comes_back_on_the_same_port(
    sshd_factory: SSHDFactory,
) -> None:
    server = sshd_factory()
    port = server.port
    client = _client_for(server, server.known_hosts)
    try:
        assert _run(client, "echo up") == "up"
        sessions = server.session_pids()
        assert sessions
        server.stop()
        assert all(process_gone(pid) for pid in sessions)
    finally:
        client.close()
    server.start()
    assert server.port == port
    client = _client_for(server, server.known_hosts)
    try:
        assert _run(client, "echo back") == "back"
    finally:
        client.close()

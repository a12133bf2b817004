"""remote_kernel.ssh against real OpenSSH servers on 127.0.0.1 (tests/sshd.py)."""

from __future__ import annotations

import contextlib
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import IsolatedEnv, SSHDFactory
from sshd import SSHServer, generate_key

from remote_kernel import ssh
from remote_kernel.entry import HostEntry
from remote_kernel.errors import ConfigError, HostKeyError, SSHError
from remote_kernel.service import prompts as service_prompts

FOREIGN_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"


def _run(connection: ssh.SSHConnection, command: str, stdin: bytes = b"") -> tuple[bytes, bytes, int]:
    """Run ``command``; return stdout, stderr and the exit status (bounded: 10 s)."""
    channel = connection.open_exec(command)
    if stdin:
        channel.sendall(stdin)
    channel.shutdown_write()
    out, err = b"", b""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        select.select([channel], [], [], 0.5)
        while channel.recv_ready():
            out += channel.recv(65536)
        while channel.recv_stderr_ready():
            err += channel.recv_stderr(65536)
        status = channel.exit_status()
        if status is not None and not channel.recv_ready() and not channel.recv_stderr_ready():
            channel.close()
            return out, err, status
    raise AssertionError(f"{command!r} did not finish in 10 s")


def _eof_and_exit_status(channel: ssh.ExecChannel, timeout: float) -> int | None:
    """Wait (bounded) until a non-blocking channel has both read EOF and its exit status, which
    sshd sends in either order; returns the status."""
    eof = False
    deadline = time.monotonic() + timeout
    while not (eof and channel.exit_status() is not None) and time.monotonic() < deadline:
        with contextlib.suppress(BlockingIOError):
            rest = channel.recv(100)
            assert rest == b"", f"unexpected output after the reply: {rest!r}"
            eof = True
        time.sleep(0.01)
    assert eof, f"no EOF within {timeout} s"
    return channel.exit_status()


def _send_until_it_fails(channel: ssh.ExecChannel, deadline: float) -> None:
    """The first writes may still land in buffers before the transport notices the drop."""
    while time.monotonic() < deadline:
        channel.sendall(b"x" * 65536)
        time.sleep(0.01)


def _write_ssh_config(env: IsolatedEnv, text: str) -> Path:
    path = env.ssh_dir / "config"
    path.write_text(text)
    path.chmod(0o600)
    return path


@pytest.fixture
def jump_and_target(sshd_factory: SSHDFactory) -> tuple[SSHServer, SSHServer]:
    return sshd_factory(), sshd_factory()


# -- connecting and running ------------------------------------------------------------------


def test_connect_runs_a_command_under_strict_host_key_checking(sshd: SSHServer) -> None:
    with ssh.connect(sshd.host_entry()) as connection:
        assert connection.is_active()
        assert _run(connection, "echo ok") == (b"ok\n", b"", 0)
    assert not connection.is_active()


def test_exec_channel_carries_stdin_stdout_stderr_and_the_exit_status(sshd: SSHServer) -> None:
    payload = os.urandom(300_000)  # larger than one SSH window: sendall must block, not drop
    with ssh.connect(sshd.host_entry()) as connection:
        out, err, status = _run(connection, "cat; echo oops >&2; exit 7", stdin=payload)
    assert (out, err, status) == (payload, b"oops\n", 7)


def test_exec_channel_non_blocking_recv_raises_blocking_io_error_until_data_arrives(
    sshd: SSHServer,
) -> None:
    with ssh.connect(sshd.host_entry()) as connection:
        channel = connection.open_exec("read line; echo got $line")
        channel.set_blocking(False)
        with pytest.raises(BlockingIOError):
            channel.recv(100)
        channel.sendall(b"hello\n")
        readable, _, _ = select.select([channel], [], [], 10)
        assert readable == [channel]
        # paramiko signals the channel's pipe a moment before the bytes land in its buffer
        # (BufferedPipe.feed sets the event first), so "readable" may still mean "not yet".
        deadline = time.monotonic() + 10
        while True:
            try:
                data = channel.recv(100)
                break
            except BlockingIOError:
                assert time.monotonic() < deadline
                time.sleep(0.001)
        assert data == b"got hello\n"
        # sshd may send the exit status before EOF or after it (1 run in 6): wait for both
        assert _eof_and_exit_status(channel, timeout=10) == 0
        assert channel.recv(100) == b""  # EOF, even in non-blocking mode
        channel.close()
        assert channel.closed


def test_sendall_after_the_server_died_raises_ssh_error(sshd_factory: SSHDFactory) -> None:
    server = sshd_factory()
    connection = ssh.connect(server.host_entry())
    channel = connection.open_exec("cat >/dev/null")
    channel.sendall(b"before\n")
    for pid in server.session_pids():
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    with pytest.raises(SSHError, match="lost the SSH channel") as caught:
        _send_until_it_fails(channel, deadline)
    assert caught.value.host == connection.host.label
    deadline = time.monotonic() + 10  # the channel may close a moment before the transport
    while connection.is_active() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not connection.is_active()
    connection.close()


def test_a_dropped_connection_wakes_a_select_and_reads_eof(sshd_factory: SSHDFactory) -> None:
    server = sshd_factory()
    with ssh.connect(server.host_entry()) as connection:
        channel = connection.open_exec("sleep 30")
        for pid in server.session_pids():
            os.kill(pid, signal.SIGKILL)
        readable, _, _ = select.select([channel], [], [], 10)
        assert readable == [channel]
        assert channel.recv(10) == b""


def test_a_command_on_a_closed_connection_is_explained_in_words_not_paramiko_jargon(
    sshd_factory: SSHDFactory,
) -> None:
    server = sshd_factory()
    with ssh.connect(server.host_entry()) as connection:
        for pid in server.session_pids():
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while connection.is_active() and time.monotonic() < deadline:
            time.sleep(0.02)
        with pytest.raises(SSHError) as caught:
            connection.open_exec("echo never")
    text = str(caught.value)
    assert text.startswith(f"cannot run a command on {connection.host.label}: the SSH connection closed before")
    assert "No existing session" not in text and "not active" not in text


# -- host keys -------------------------------------------------------------------------------


def test_an_unknown_host_key_is_refused_naming_the_known_hosts_file(sshd: SSHServer, tmp_path: Path) -> None:
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"otherhost {FOREIGN_KEY}\n")
    with pytest.raises(HostKeyError) as caught:
        ssh.connect(sshd.host_entry(known_hosts=str(known_hosts)))
    text = str(caught.value)
    assert str(known_hosts) in text
    assert f"ssh-keyscan -p {sshd.port} 127.0.0.1 >> {known_hosts}" in text
    assert f"[127.0.0.1]:{sshd.port}" in text
    assert "accept-new" in text
    assert known_hosts.read_text() == f"otherhost {FOREIGN_KEY}\n"  # nothing recorded


def test_accept_new_records_the_key_then_strict_accepts_it(
    sshd: SSHServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    known_hosts = tmp_path / "fresh" / "known_hosts"  # neither file nor directory exists yet
    with caplog.at_level(logging.WARNING, logger="remote_kernel.ssh"):
        ssh.connect(sshd.host_entry(known_hosts=str(known_hosts), host_key_policy="accept-new")).close()
    assert known_hosts.read_text() == f"[127.0.0.1]:{sshd.port} {sshd.host_key_pub}\n"
    assert known_hosts.stat().st_mode & 0o777 == 0o600
    assert known_hosts.parent.stat().st_mode & 0o777 == 0o700
    assert "Permanently added" in caplog.text
    with ssh.connect(sshd.host_entry(known_hosts=str(known_hosts))) as connection:
        assert _run(connection, "echo again")[0] == b"again\n"
    assert known_hosts.read_text().count("\n") == 1


@pytest.mark.parametrize("policy", ["strict", "accept-new"])
def test_a_changed_host_key_is_refused_naming_file_and_line(sshd: SSHServer, tmp_path: Path, policy: str) -> None:
    known_hosts = tmp_path / "known_hosts"
    stale = f"[127.0.0.1]:{sshd.port} {FOREIGN_KEY}\n"
    known_hosts.write_text(f"# my hosts\nlab.example.org {FOREIGN_KEY}\n{stale}")
    with pytest.raises(HostKeyError, match="HOST KEY CHANGED") as caught:
        ssh.connect(sshd.host_entry(known_hosts=str(known_hosts), host_key_policy=policy))
    assert f"{known_hosts}:3" in str(caught.value)
    assert "line 3 of" in str(caught.value)
    assert known_hosts.read_text().endswith(stale)  # not overwritten, nothing appended


def test_a_known_key_of_another_type_counts_as_changed(sshd: SSHServer, tmp_path: Path) -> None:
    other = generate_key(tmp_path / "ecdsa", "ecdsa").with_suffix(".pub").read_text().split()
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{sshd.port} {other[0]} {other[1]}\n")
    with pytest.raises(HostKeyError, match=f"{known_hosts}:1"):
        ssh.connect(sshd.host_entry(known_hosts=str(known_hosts), host_key_policy="accept-new"))


def test_hashed_known_hosts_entries_are_recognised(sshd: SSHServer, tmp_path: Path) -> None:
    known_hosts = tmp_path / "known_hosts"
    shutil.copy(sshd.known_hosts, known_hosts)
    subprocess.run(["ssh-keygen", "-H", "-f", str(known_hosts)], check=True, capture_output=True)
    assert known_hosts.read_text().startswith("|1|")
    with ssh.connect(sshd.host_entry(known_hosts=str(known_hosts))) as connection:
        assert connection.is_active()


def test_host_patterns_follow_openssh_rules() -> None:
    assert ssh.host_matches("[127.0.0.1]:2222", "[127.0.0.1]:2222")
    assert not ssh.host_matches("[127.0.0.1]:2222", "[127.0.0.1]:2223")
    assert not ssh.host_matches("127.0.0.1", "[127.0.0.1]:2222")
    assert ssh.host_matches("*.example.org,!bad.example.org", "Lab.Example.org")
    assert not ssh.host_matches("*.example.org,!bad.example.org", "bad.example.org")
    assert ssh.host_matches("lab?", "lab1")
    assert not ssh.host_matches("lab?", "lab12")


# -- authentication --------------------------------------------------------------------------


def test_an_unauthorized_client_key_fails_naming_the_key_path(sshd: SSHServer, tmp_path: Path) -> None:
    stranger = generate_key(tmp_path / "id_stranger")
    with pytest.raises(SSHError, match="authentication to") as caught:
        ssh.connect(sshd.host_entry(identity_file=str(stranger)))
    assert str(stranger) in str(caught.value)
    assert "PRIVATE KEY" not in str(caught.value)


def test_a_missing_identity_file_is_named(sshd: SSHServer, tmp_path: Path) -> None:
    with pytest.raises(SSHError, match="no such file") as caught:
        ssh.connect(sshd.host_entry(identity_file=str(tmp_path / "nope")))
    assert str(tmp_path / "nope") in str(caught.value)


def test_an_encrypted_key_without_a_terminal_says_to_use_ssh_agent(sshd: SSHServer, tmp_path: Path) -> None:
    key = generate_key(tmp_path / "id_locked", passphrase="correct horse")  # noqa: S106 - test key
    sshd.authorize(key.with_suffix(".pub"))
    with pytest.raises(SSHError, match="encrypted") as caught:
        ssh.connect(sshd.host_entry(identity_file=str(key)))
    assert f"ssh-add {key}" in str(caught.value)
    assert "correct horse" not in str(caught.value)


@pytest.mark.parametrize(("answers", "works"), [(["secret"], True), (["no", "nope", "never"], False)])
def test_an_encrypted_key_on_a_terminal_asks_for_its_passphrase(
    sshd: SSHServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    answers: list[str],
    works: bool,
) -> None:
    key = sshd.add_client_key("id_prompted", "ecdsa", passphrase="secret")  # noqa: S106
    prompts: list[str] = []

    def fake_getpass(prompt: str) -> str:
        prompts.append(prompt)
        return answers[len(prompts) - 1]

    monkeypatch.setattr(service_prompts, "stdin_is_a_terminal", lambda: True)
    monkeypatch.setattr(service_prompts.getpass, "getpass", fake_getpass)
    entry = sshd.host_entry(identity_file=str(key))
    with caplog.at_level(logging.DEBUG):
        if works:
            ssh.connect(entry).close()
        else:
            with pytest.raises(SSHError, match="not unlocked"):
                ssh.connect(entry)
    assert prompts == [f"Enter passphrase for key '{key}': "] * len(answers)
    assert not any(answer in caplog.text for answer in answers if len(answer) > 3)


@pytest.mark.parametrize("key_type", ["rsa", "ecdsa", "ed25519"])
def test_client_keys_of_every_common_type_work(sshd: SSHServer, key_type: str) -> None:
    key = sshd.add_client_key(f"id_{key_type}_extra", key_type)
    with ssh.connect(sshd.host_entry(identity_file=str(key))) as connection:
        assert _run(connection, "echo ok")[0] == b"ok\n"


def test_an_encrypted_key_held_by_ssh_agent_needs_no_passphrase(
    sshd: SSHServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain = sshd.add_client_key("id_agent", "ed25519")
    locked = tmp_path / "id_agent_locked"
    shutil.copy(plain, locked)
    shutil.copy(plain.with_suffix(".pub"), locked.with_suffix(".pub"))
    locked.chmod(0o600)
    subprocess.run(
        ["ssh-keygen", "-q", "-p", "-P", "", "-N", "secret", "-f", str(locked)],
        check=True,
        capture_output=True,
    )
    agent_socket = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(agent_socket)], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not agent_socket.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        monkeypatch.setenv("SSH_AUTH_SOCK", str(agent_socket))
        subprocess.run(["ssh-add", "-q", str(plain)], check=True, capture_output=True, timeout=10)
        with ssh.connect(sshd.host_entry(identity_file=str(locked))) as connection:
            assert _run(connection, "echo agent")[0] == b"agent\n"
    finally:
        agent.terminate()
        agent.wait(timeout=10)


def test_logs_name_the_auth_method_and_never_key_material(sshd: SSHServer, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        ssh.connect(sshd.host_entry()).close()
    assert f"with public key {sshd.client_key}" in caplog.text
    private = sshd.client_key.read_text().splitlines()[1:-1]
    assert not any(line in caplog.text for line in private)
    assert sshd.host_key_pub.split()[1] not in caplog.text


# -- network failures ------------------------------------------------------------------------


def test_a_refused_port_says_to_check_sshd(sshd: SSHServer) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound but not listening: connections are refused
        with pytest.raises(SSHError, match="refused") as caught:
            ssh.connect(sshd.host_entry(port=port), timeout=5)
    assert f"is sshd running on 127.0.0.1:{port}?" in str(caught.value)


def test_a_port_that_never_speaks_ssh_times_out_with_a_hint(sshd: SSHServer) -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(SSHError, match="handshake") as caught:
            ssh.connect(sshd.host_entry(port=port), timeout=1)
    assert time.monotonic() - started < 10
    assert "an SSH server?" in str(caught.value)


# -- ~/.ssh/config and ProxyJump -------------------------------------------------------------


def test_hosts_resolve_through_ssh_config(
    sshd: SSHServer, isolated_env: IsolatedEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_ssh_config(isolated_env, sshd.ssh_config_block("lab") + "\nHost *\n    User nobody\n")
    resolved = ssh.resolve_host(HostEntry(name="lab"))
    assert (resolved.alias, resolved.hostname, resolved.port) == ("lab", "127.0.0.1", sshd.port)
    assert resolved.user == sshd.user
    assert resolved.identity_files == (str(sshd.client_key),)
    assert resolved.known_hosts[0] == str(sshd.known_hosts)
    assert resolved.identities_only
    with ssh.connect(HostEntry(name="lab")) as connection:
        assert _run(connection, "echo via-config")[0] == b"via-config\n"


def test_explicit_fields_win_over_ssh_config(isolated_env: IsolatedEnv) -> None:
    _write_ssh_config(isolated_env, "Host lab\n  HostName lab.example.org\n  User alice\n  Port 2222\n")
    resolved = ssh.resolve_host(HostEntry(name="lab", user="bob", port=22, known_hosts="~/kh"))
    assert (resolved.hostname, resolved.user, resolved.port) == ("lab.example.org", "bob", 22)
    assert resolved.known_hosts[0] == str(isolated_env.home / "kh")
    assert resolved.describe() == "bob@lab.example.org:22"


def test_defaults_apply_without_ssh_config(isolated_env: IsolatedEnv) -> None:
    (isolated_env.ssh_dir / "id_rsa").write_text("not really a key")
    resolved = ssh.resolve_host(HostEntry(name="somewhere"))
    assert resolved.port == 22
    assert resolved.identity_files == (str(isolated_env.ssh_dir / "id_rsa"),)
    assert resolved.known_hosts[0] == str(isolated_env.ssh_dir / "known_hosts")
    assert resolved.host_key_policy == "strict"


def test_a_bad_port_in_ssh_config_is_a_config_error_naming_the_file(isolated_env: IsolatedEnv) -> None:
    config = _write_ssh_config(isolated_env, "Host lab\n  Port twenty\n")
    with pytest.raises(ConfigError, match="Port") as caught:
        ssh.resolve_host(HostEntry(name="lab"))
    assert str(config) in str(caught.value)


def test_a_proxy_jump_loop_is_reported(isolated_env: IsolatedEnv) -> None:
    _write_ssh_config(isolated_env, "Host a\n  ProxyJump b\nHost b\n  ProxyJump a\n")
    with pytest.raises(SSHError, match="ProxyJump loop: a -> b -> a"):
        ssh.resolve_host(HostEntry(name="a"))


def test_proxy_jump_from_host_entries_goes_through_the_jump_host(
    jump_and_target: tuple[SSHServer, SSHServer],
) -> None:
    jump, target = jump_and_target
    entry = target.host_entry(name="target", proxy_jump=(jump.host_entry(name="jump"),))
    with ssh.connect(entry) as connection:
        assert connection.host.describe() == f"{target.user}@127.0.0.1:{target.port} via jump"
        assert _run(connection, "echo through")[0] == b"through\n"
        assert jump.session_pids(), "the jump host carries the connection"
        for pid in jump.session_pids():
            os.kill(pid, signal.SIGKILL)  # cutting the jump cuts the target
        deadline = time.monotonic() + 10
        while connection.is_active() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not connection.is_active()


def test_proxy_jump_from_ssh_config_verifies_every_hop_with_its_own_known_hosts(
    jump_and_target: tuple[SSHServer, SSHServer], isolated_env: IsolatedEnv
) -> None:
    jump, target = jump_and_target
    # the target's key is known only under an alias: it is reachable only as the jump's target
    target.known_hosts.write_text(target.known_hosts_line("target.internal"))
    _write_ssh_config(
        isolated_env,
        jump.ssh_config_block("jump")
        + target.ssh_config_block("target")
        + "    ProxyJump jump\n    HostKeyAlias target.internal\n",
    )
    resolved = ssh.resolve_host(HostEntry(name="target"))
    assert [hop.alias for hop in ssh.hop_chain(resolved)] == ["jump", "target"]
    assert resolved.known_hosts_name == "target.internal"
    with ssh.connect(resolved) as connection:
        assert _run(connection, "echo two-hops")[0] == b"two-hops\n"


def test_a_proxy_jump_target_string_uses_the_default_known_hosts_and_keys(
    jump_and_target: tuple[SSHServer, SSHServer], isolated_env: IsolatedEnv
) -> None:
    jump, target = jump_and_target
    (isolated_env.ssh_dir / "known_hosts").write_text(jump.known_hosts_line())
    shutil.copy(jump.client_key, isolated_env.ssh_dir / "id_ed25519")
    _write_ssh_config(
        isolated_env,
        target.ssh_config_block("target") + f"    ProxyJump ssh://{jump.user}@127.0.0.1:{jump.port}\n",
    )
    resolved = ssh.resolve_host(HostEntry(name="target"))
    (hop,) = resolved.jumps
    assert (hop.hostname, hop.port, hop.user) == ("127.0.0.1", jump.port, jump.user)
    assert hop.known_hosts[0] == str(isolated_env.ssh_dir / "known_hosts")
    assert hop.identity_files == (str(isolated_env.ssh_dir / "id_ed25519"),)
    with ssh.connect(resolved) as connection:
        assert _run(connection, "echo string-jump")[0] == b"string-jump\n"


def test_an_unknown_key_behind_a_jump_is_refused_for_that_hop(
    jump_and_target: tuple[SSHServer, SSHServer], tmp_path: Path
) -> None:
    jump, target = jump_and_target
    empty = tmp_path / "empty"
    empty.write_text("")
    entry = target.host_entry(name="target", known_hosts=str(empty), proxy_jump=(jump.host_entry(name="jump"),))
    with pytest.raises(HostKeyError) as caught:
        ssh.connect(entry)
    assert caught.value.host == f"{target.user}@127.0.0.1:{target.port} (target)"
    assert f"-J {jump.user}@127.0.0.1:{jump.port}" in str(caught.value)
    assert "ssh-keyscan" not in str(caught.value)  # it cannot reach a host behind a jump


def test_a_jump_host_without_tcp_forwarding_says_so(sshd_factory: SSHDFactory) -> None:
    jump = sshd_factory(extra_config="AllowTcpForwarding no")
    target = sshd_factory()
    entry = target.host_entry(proxy_jump=(jump.host_entry(name="jump"),))
    with pytest.raises(SSHError, match="AllowTcpForwarding"):
        ssh.connect(entry)


def test_connections_can_be_used_from_several_threads(sshd: SSHServer) -> None:
    results: list[bytes] = []
    with ssh.connect(sshd.host_entry()) as connection:
        threads = [
            threading.Thread(target=lambda i=i: results.append(_run(connection, f"echo {i}")[0])) for i in range(4)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=20)
    assert sorted(results) == [b"0\n", b"1\n", b"2\n", b"3\n"]


def test_deliver_to_hands_over_the_backlog_first_then_every_packet_and_release_keeps_output_flowing(
    sshd: SSHServer,
) -> None:
    """The launcher's fast path (tunnel.py): stdout goes to a sink on paramiko's thread. What was
    buffered before comes first, in order; 40 MiB (2.5 windows) flow only because the reader
    grants window with release(); EOF still wakes a select on the channel."""
    size = 40 * 2**20
    command = f"printf first-; read go; head -c {size} /dev/zero | tr '\\0' y; printf -- -end"
    received: list[bytes] = []
    threads: set[str] = set()

    def sink(data: bytes) -> None:
        threads.add(threading.current_thread().name)
        received.append(data)

    with ssh.connect(sshd.host_entry()) as connection:
        channel = connection.open_exec(command)
        deadline = time.monotonic() + 10
        while not channel.recv_ready() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert channel.recv_ready(), "the first output never arrived"
        assert channel.deliver_to(sink)
        assert not channel.recv_ready()  # handed to the sink, not left in the buffer
        channel.sendall(b"go\n")
        released = 0
        deadline = time.monotonic() + 60
        while sum(map(len, received)) < size + 10 and time.monotonic() < deadline:
            total = sum(map(len, received))
            channel.release(total - released)
            released = total
            time.sleep(0.005)
        readable, _, _ = select.select([channel], [], [], 10)
        assert readable, "EOF did not wake select"
        channel.set_blocking(False)
        assert channel.recv(10) == b""
    data = b"".join(received)
    assert len(data) == size + 10
    assert data[:6] == b"first-" and data[-4:] == b"-end" and data.count(b"y") == size
    assert threads - {threading.current_thread().name}, "the sink ran only on the caller's thread (the backlog)"


def test_the_tap_stays_out_where_paramiko_lacks_a_private_name_it_needs() -> None:
    """(test_launch runs a whole kernel without the tap, reading through recv.)"""

    class ChannelWithoutBuffer:
        transport = None

    channel = ChannelWithoutBuffer()
    assert ssh._StdoutTap.install(channel) is None  # type: ignore[arg-type]
    assert not hasattr(channel, "in_buffer")

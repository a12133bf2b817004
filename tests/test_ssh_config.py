"""~/.ssh/config as OpenSSH reads it: Include (issue 12 item 2) and ProxyCommand (item 3), against
real OpenSSH servers on 127.0.0.1 (tests/sshd.py)."""

from __future__ import annotations

import os
import select
import time
from pathlib import Path

import pytest
from conftest import IsolatedEnv, SSHDFactory
from sshd import SSHServer, children_of, process_gone

from remote_kernel import ssh
from remote_kernel.entry import HostEntry
from remote_kernel.errors import ConfigError, SSHError


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o600)
    return path


def _echo(connection: ssh.SSHConnection, word: str) -> bytes:
    """``echo word`` on the connection; its stdout (bounded: 10 s)."""
    channel = connection.open_exec(f"echo {word}")
    channel.shutdown_write()
    out = b""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        select.select([channel], [], [], 0.5)
        data = channel.recv(65536)
        if not data:
            return out
        out += data
    raise AssertionError(f"echo {word} did not finish in 10 s")


def _settings(server: SSHServer) -> str:
    """The lines of ``server.ssh_config_block`` without its ``Host`` line."""
    return server.ssh_config_block("unused").split("\n", 1)[1]


# -- Include -----------------------------------------------------------------------------------


def test_a_host_defined_in_a_file_included_by_a_glob_connects(sshd: SSHServer, isolated_env: IsolatedEnv) -> None:
    _write(isolated_env.ssh_dir / "config", "Include config.d/*.conf\n")
    _write(isolated_env.ssh_dir / "config.d" / "10-other.conf", "Host other\n  HostName other.example.org\n")
    _write(isolated_env.ssh_dir / "config.d" / "20-lab.conf", sshd.ssh_config_block("lab"))
    resolved = ssh.resolve_host(HostEntry(name="lab"))
    assert (resolved.hostname, resolved.port) == ("127.0.0.1", sshd.port)
    with ssh.connect(HostEntry(name="lab")) as connection:
        assert _echo(connection, "included") == b"included\n"


def test_an_include_inside_a_host_block_applies_only_to_that_block(
    sshd: SSHServer, isolated_env: IsolatedEnv
) -> None:
    _write(
        isolated_env.ssh_dir / "config",
        "Host lab\n"
        "    Include ~/.ssh/lab.conf\n"
        "    User lab-user-after-the-include\n"  # still Host lab: the included file opened no block
        "    Include lab-extra.conf\n"
        "    HostKeyAlias lab-alias\n"  # still Host lab: the included block ended with its file
        "Host other\n"
        "    HostName other.example.org\n",
    )
    _write(isolated_env.ssh_dir / "lab.conf", _settings(sshd).replace(f"    User {sshd.user}\n", ""))
    # its own Host * block applies only where the including "Host lab" does
    _write(isolated_env.ssh_dir / "lab-extra.conf", "Host *\n    ForwardAgent yes\n")
    lab = ssh.resolve_host(HostEntry(name="lab", user=sshd.user))
    assert (lab.hostname, lab.port, lab.host_key_alias) == ("127.0.0.1", sshd.port, "lab-alias")
    assert ssh.resolve_host(HostEntry(name="lab")).user == "lab-user-after-the-include"
    other = ssh._SSHConfig(isolated_env.ssh_dir / "config").lookup("other")
    assert other["hostname"] == "other.example.org"
    assert "port" not in other and "forwardagent" not in other and "hostkeyalias" not in other
    assert ssh._SSHConfig(isolated_env.ssh_dir / "config").lookup("lab")["forwardagent"] == "yes"
    sshd.known_hosts.write_text(sshd.known_hosts_line("lab-alias"))
    try:
        with ssh.connect(HostEntry(name="lab", user=sshd.user)) as connection:
            assert _echo(connection, "block") == b"block\n"
    finally:
        sshd.known_hosts.write_text(sshd.known_hosts_line())


def test_an_include_inside_a_match_block_applies_where_the_match_does(isolated_env: IsolatedEnv) -> None:
    _write(
        isolated_env.ssh_dir / "config",
        "Host lab\n    HostName 127.0.0.1\nMatch host 127.0.0.1\n    Include local.conf\n",
    )
    _write(isolated_env.ssh_dir / "local.conf", "Port 2222\nHost lab*\n    User bob\n")
    lab = ssh.resolve_host(HostEntry(name="lab"))
    assert (lab.port, lab.user) == (2222, "bob")
    lab2 = ssh.resolve_host(HostEntry(name="lab2", hostname="lab2.example.org"))
    assert lab2.port == 22 and lab2.user != "bob"


def test_the_first_value_wins_across_included_files(sshd: SSHServer, isolated_env: IsolatedEnv) -> None:
    _write(isolated_env.ssh_dir / "config", "Include config.d/*\nHost *\n    Port 1\n    User nobody\n")
    _write(isolated_env.ssh_dir / "config.d" / "a.conf", sshd.ssh_config_block("lab"))
    _write(isolated_env.ssh_dir / "config.d" / "b.conf", "Host lab\n    Port 2\n    HostName 192.0.2.1\n")
    resolved = ssh.resolve_host(HostEntry(name="lab"))
    assert (resolved.hostname, resolved.port, resolved.user) == ("127.0.0.1", sshd.port, sshd.user)
    with ssh.connect(resolved) as connection:
        assert _echo(connection, "first") == b"first\n"


def test_several_paths_on_one_include_line_are_read_in_order_and_a_missing_one_is_ignored(
    isolated_env: IsolatedEnv,
) -> None:
    _write(isolated_env.ssh_dir / "config", 'Include nosuch.conf "two words.conf" nomatch.d/* one.conf\n')
    _write(isolated_env.ssh_dir / "two words.conf", "Host lab\n    Port 2222\n")
    _write(isolated_env.ssh_dir / "one.conf", "Host lab\n    Port 1111\n    User alice\n")
    resolved = ssh.resolve_host(HostEntry(name="lab"))
    assert (resolved.port, resolved.user) == (2222, "alice")


def test_an_include_loop_is_an_error_naming_the_file_and_line(isolated_env: IsolatedEnv) -> None:
    config = _write(isolated_env.ssh_dir / "config", "Host lab\n    Port 2222\n")
    _write(isolated_env.ssh_dir / "loop.conf", "# includes itself\nInclude loop.conf\n")
    config.write_text("Include loop.conf\n")
    with pytest.raises(ConfigError) as caught:
        ssh.resolve_host(HostEntry(name="lab"))
    assert f"{isolated_env.ssh_dir / 'loop.conf'}:2" in str(caught.value)
    assert "more than 16" in str(caught.value)


def test_an_unreadable_included_file_is_an_error_naming_the_file_and_line(isolated_env: IsolatedEnv) -> None:
    config = _write(isolated_env.ssh_dir / "config", "Host lab\n    Include broken.conf\n")
    (isolated_env.ssh_dir / "broken.conf").symlink_to("broken.conf")  # ELOOP, even for root
    with pytest.raises(ConfigError) as caught:
        ssh.resolve_host(HostEntry(name="lab"))
    assert f"{config}:2" in str(caught.value)
    assert "cannot read included file" in str(caught.value)
    assert str(isolated_env.ssh_dir / "broken.conf") in str(caught.value)


def test_a_line_without_a_value_in_an_included_file_is_named_with_its_line(isolated_env: IsolatedEnv) -> None:
    _write(isolated_env.ssh_dir / "config", "Include bad.conf\n")
    bad = _write(isolated_env.ssh_dir / "bad.conf", "Host lab\n    Port 22\n    ForwardAgent\n")
    with pytest.raises(ConfigError) as caught:
        ssh.resolve_host(HostEntry(name="lab"))
    assert f"{bad}:3" in str(caught.value)


# -- ProxyCommand ------------------------------------------------------------------------------


def _recording_proxy(tmp_path: Path) -> tuple[Path, Path]:
    """A ProxyCommand script that writes its pid and arguments to a file, then becomes
    ``nc 127.0.0.1 PORT`` (PORT: its second argument)."""
    record = tmp_path / "proxy-args"
    script = _write(
        tmp_path / "proxy.sh",
        f'#!/bin/sh\necho "$$ $*" > {record}\nexec nc 127.0.0.1 "$2"\n',
    )
    script.chmod(0o700)
    return script, record


def test_a_host_behind_a_proxy_command_connects_through_it_and_the_command_stops_with_the_connection(
    sshd: SSHServer, isolated_env: IsolatedEnv, tmp_path: Path
) -> None:
    script, record = _recording_proxy(tmp_path)
    # lab.invalid cannot be resolved: a direct connection cannot succeed
    _write(
        isolated_env.ssh_dir / "config",
        sshd.ssh_config_block("lab").replace("HostName 127.0.0.1", "HostName lab.invalid")
        + f"    ProxyCommand {script} %h %p %r %n %k 100%%\n",
    )
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(sshd.known_hosts_line(f"[lab.invalid]:{sshd.port}"))
    entry = HostEntry(name="lab", known_hosts=str(known_hosts))
    resolved = ssh.resolve_host(entry)
    assert resolved.proxy_command == f"{script} lab.invalid {sshd.port} {sshd.user} lab lab 100%"
    assert resolved.jumps == ()
    with ssh.connect(resolved) as connection:
        assert _echo(connection, "proxied") == b"proxied\n"
        pid_text, args = record.read_text().split(" ", 1)
        assert args == f"lab.invalid {sshd.port} {sshd.user} lab lab 100%\n"
        proxy_pid = int(pid_text)
        assert not process_gone(proxy_pid)
        # in a session of its own: Jupyter's interrupt (a signal to our process group) misses it
        assert os.getpgid(proxy_pid) != os.getpgid(0)
    deadline = time.monotonic() + 10
    while not process_gone(proxy_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process_gone(proxy_pid), "the ProxyCommand outlived its connection"


def test_a_failing_proxy_command_names_the_host_the_command_and_its_stderr(
    sshd: SSHServer, isolated_env: IsolatedEnv
) -> None:
    command = "sh -c 'echo no route to %h >&2; exit 3'"
    _write(isolated_env.ssh_dir / "config", sshd.ssh_config_block("lab") + f"    ProxyCommand {command}\n")
    started = time.monotonic()
    with pytest.raises(SSHError) as caught:
        ssh.connect(HostEntry(name="lab"), timeout=10)
    assert time.monotonic() - started < 8  # the exit is noticed, not waited out
    text = str(caught.value)
    assert text.startswith(f"the ProxyCommand for {sshd.user}@127.0.0.1:{sshd.port} (lab) exited (status 3)")
    assert "sh -c 'echo no route to 127.0.0.1 >&2; exit 3'" in text
    assert "no route to 127.0.0.1" in text.split("its stderr:")[1]
    assert caught.value.host == f"{sshd.user}@127.0.0.1:{sshd.port} (lab)"


def test_a_proxy_command_that_reaches_no_ssh_server_says_so(sshd: SSHServer, isolated_env: IsolatedEnv) -> None:
    _write(isolated_env.ssh_dir / "config", sshd.ssh_config_block("lab") + "    ProxyCommand cat /dev/zero\n")
    with pytest.raises(SSHError, match="did not lead to an SSH server") as caught:
        ssh.connect(HostEntry(name="lab"), timeout=2)
    assert "cat /dev/zero" in str(caught.value)


def test_proxy_command_first_wins_over_a_later_proxy_jump(
    sshd: SSHServer, isolated_env: IsolatedEnv, tmp_path: Path
) -> None:
    script, _record = _recording_proxy(tmp_path)
    _write(
        isolated_env.ssh_dir / "config",
        sshd.ssh_config_block("lab") + f"    ProxyCommand {script} %h %p\n" + "Host *\n    ProxyJump nosuch.invalid\n",
    )
    resolved = ssh.resolve_host(HostEntry(name="lab"))
    assert (resolved.proxy_command, resolved.jumps) == (f"{script} 127.0.0.1 {sshd.port}", ())
    with ssh.connect(resolved) as connection:
        assert _echo(connection, "command-first") == b"command-first\n"


def test_proxy_jump_first_wins_over_a_later_proxy_command_and_none_counts(isolated_env: IsolatedEnv) -> None:
    _write(
        isolated_env.ssh_dir / "config",
        "Host lab\n    ProxyJump bastion\n"
        "Host direct\n    ProxyCommand none\n"
        "Host *\n    ProxyCommand false\n    ProxyJump nosuch\n",
    )
    lab = ssh.resolve_host(HostEntry(name="lab"))
    assert ([hop.alias for hop in lab.jumps], lab.proxy_command) == (["bastion"], None)
    direct = ssh.resolve_host(HostEntry(name="direct"))
    assert (direct.jumps, direct.proxy_command) == ((), None)
    # an explicit proxy_jump ([hosts] table) comes before ~/.ssh/config
    explicit = ssh.resolve_host(HostEntry(name="other", proxy_jump=(HostEntry(name="bastion"),)))
    assert ([hop.alias for hop in explicit.jumps], explicit.proxy_command) == (["bastion"], None)


def test_a_jump_host_reached_by_its_own_proxy_command(
    sshd_factory: SSHDFactory, isolated_env: IsolatedEnv
) -> None:
    jump, target = sshd_factory(), sshd_factory()
    _write(
        isolated_env.ssh_dir / "config",
        jump.ssh_config_block("jump")
        + "    ProxyCommand nc %h %p\n"
        + target.ssh_config_block("target")
        + "    ProxyJump jump\n",
    )
    resolved = ssh.resolve_host(HostEntry(name="target"))
    assert [(hop.alias, hop.proxy_command) for hop in ssh.hop_chain(resolved)] == [
        ("jump", f"nc 127.0.0.1 {jump.port}"),
        ("target", None),
    ]
    assert resolved.describe().endswith(f"via ProxyCommand 'nc 127.0.0.1 {jump.port}' -> jump")
    with ssh.connect(resolved) as connection:
        assert _echo(connection, "two-hops") == b"two-hops\n"
        assert jump.session_pids(), "the jump host carries the connection"


@pytest.mark.parametrize(("command", "problem"), [("nc %h %x", "unknown token %x"), ("-", "stdin/stdout")])
def test_a_proxy_command_remote_kernel_cannot_run_is_a_config_error(
    isolated_env: IsolatedEnv, command: str, problem: str
) -> None:
    config = _write(isolated_env.ssh_dir / "config", f"Host lab\n    ProxyCommand {command}\n")
    with pytest.raises(ConfigError, match=problem) as caught:
        ssh.resolve_host(HostEntry(name="lab"))
    assert str(config) in str(caught.value)


# -- a kernel through both ---------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_kernel_on_an_included_host_behind_a_proxy_command_runs_and_survives_an_interrupt(
    sshd: SSHServer, isolated_env: IsolatedEnv, remote_python: Path
) -> None:
    """The whole path: ~/.ssh/config includes the host, whose ProxyCommand carries the kernel's
    traffic; Jupyter's interrupt signals the launcher's process group, and the ProxyCommand (in a
    session of its own) must not die of it."""
    from launch_helpers import execute, interrupted_cell, kernel_entry, started_kernel, write_spec

    known_hosts = _write(isolated_env.ssh_dir / "known_hosts", sshd.known_hosts_line(f"[lab.invalid]:{sshd.port}"))
    block = (
        sshd.ssh_config_block("lab")
        .replace("HostName 127.0.0.1", "HostName lab.invalid")  # reachable only through the proxy
        .replace(str(sshd.known_hosts), str(known_hosts))
    )
    _write(isolated_env.ssh_dir / "config", "Include config.d/*.conf\n")
    _write(isolated_env.ssh_dir / "config.d" / "lab.conf", block + "    ProxyCommand nc 127.0.0.1 %p\n")
    write_spec(kernel_entry(sshd, remote_python, "proxied", host=HostEntry(name="lab")))
    with started_kernel("proxied") as (km, kc):
        (proxy_pid,) = [pid for pid in children_of(km.provisioner.process.pid) if _command_of(pid)[0] == "nc"]
        assert interrupted_cell(km, kc).ename == "KeyboardInterrupt"
        assert km.is_alive(), "the launcher died of the interrupt"
        assert execute(kc, "1+1").result == "2"
        assert not process_gone(proxy_pid), "the interrupt killed the ProxyCommand (the launcher had to reconnect)"


def _command_of(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")

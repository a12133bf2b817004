"""`remote-kernel doctor` (issue 18, part 1): real sshd, real ipykernel, the real CLI as a subprocess.

- `doctor KERNEL` passes against the test sshd and prints every step, the round trip timed.
- A changed host key fails the host key step naming known_hosts file:line and the ssh-keygen -R fix;
  a python without ipykernel fails the ipykernel step with the pip command; a login shell (or a
  setup line) that prints on stdout fails the login shell step with its fix. Later steps say why
  they were skipped.
- A host that accepts TCP and never speaks SSH fails its handshake step after the connect timeout,
  without a traceback; without arguments every host gets one line, checked at once.
- `--json` is one document with every step; a config that does not load is exit 2.
"""

from __future__ import annotations

import json
import os
import pwd
import subprocess
from pathlib import Path
from typing import Any

import pytest
from launch_helpers import host_table, kernel_table, run_cli, write_config
from sshd import SSHServer, generate_key
from test_inventory import silent_ssh_host

from remote_kernel import ssh
from remote_kernel.doctor import HOST_STEPS, STEPS
from remote_kernel.entry import HostEntry

pytestmark = pytest.mark.timeout(180)

SHORT_TIMEOUT = 2  # --timeout for the hosts that never answer


def doctor(config: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return run_cli(["--config", str(config), "doctor", *args], timeout=timeout)


def step_lines(stdout: str) -> dict[str, str]:
    """``{step name: its line}`` from doctor's plain output (``  ok    name   figure``)."""
    found: dict[str, str] = {}
    for line in stdout.splitlines():
        words = line.split()
        if line.startswith("  ") and not line.startswith("   ") and len(words) >= 2:
            name = next((s for s in sorted(STEPS, key=len, reverse=True) if line[8:].startswith(s)), words[1])
            found[name] = line
    return found


def status_of(line: str) -> str:
    return line.split(maxsplit=1)[0]


def figure_of(steps: dict[str, str], name: str) -> str:
    return steps[name][8:].removeprefix(name).strip()


def lines_after(stdout: str, step_line: str) -> str:
    """The detail and fix lines printed under one step."""
    rest = stdout.split(step_line, 1)[1].splitlines()[1:]
    return "\n".join(line for line in rest[: next((i for i, x in enumerate(rest) if not x.startswith("   ")),
                                                   len(rest))])


def one_kernel(tmp_path: Path, server: SSHServer, python: Path | str, **fields: Any) -> Path:
    return write_config(tmp_path / "remote-kernels.toml", hosts={"fixture": host_table(server)},
                        kernels={"lab": kernel_table("fixture", python, **fields)})


def assert_no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    assert "paramiko" not in result.stderr, result.stderr


# ----------------------------------------------------------------------------- the whole path


@pytest.mark.slow
def test_doctor_kernel_passes_against_the_test_sshd_and_prints_every_step(
    tmp_path: Path, sshd: SSHServer, remote_python: Path
) -> None:
    result = doctor(one_kernel(tmp_path, sshd, remote_python), "lab")
    assert result.returncode == 0, result.stdout + result.stderr
    steps = step_lines(result.stdout)
    assert list(steps) == list(STEPS), result.stdout
    assert {name: status_of(line) for name, line in steps.items() if status_of(line) != "ok"} == {}, result.stdout
    assert f"matches {sshd.known_hosts}:1" in steps["host key"]
    assert f"publickey with {sshd.client_key}" in steps["auth"] and "server offers: publickey" in steps["auth"]
    assert "prints nothing on stdout" in steps["login shell"]
    assert str(remote_python) in steps["python"]
    assert "IPC sockets: yes" in steps["pyzmq"]
    assert "AllowTcpForwarding is irrelevant" in steps["port forwarding"]
    for phase in ("start", "kernel_info", "1+1", "shutdown"):
        assert f"{phase} " in steps["kernel round trip"], steps["kernel round trip"]
    assert result.stdout.strip().splitlines()[-1].startswith("ok")
    assert_no_traceback(result)


# ----------------------------------------------------------------------------- failing steps


def test_a_changed_host_key_fails_the_host_key_step_with_the_known_hosts_line_and_the_fix(
    tmp_path: Path, sshd: SSHServer, remote_python: Path
) -> None:
    other = generate_key(tmp_path / "other_host_key")
    known_hosts = tmp_path / "known_hosts"
    wrong_key = " ".join(other.with_suffix(".pub").read_text().split()[:2])
    known_hosts.write_text(f"# the server was reinstalled\n[127.0.0.1]:{sshd.port} {wrong_key}\n")
    config = write_config(tmp_path / "remote-kernels.toml",
                          hosts={"fixture": host_table(sshd, known_hosts=str(known_hosts))},
                          kernels={"lab": kernel_table("fixture", remote_python)})
    result = doctor(config, "lab")
    assert result.returncode == 1, result.stdout + result.stderr
    steps = step_lines(result.stdout)
    assert status_of(steps["host key"]) == "FAIL" and "HOST KEY CHANGED" in steps["host key"]
    assert f"{known_hosts}:2" in steps["host key"]
    assert f"ssh-keygen -R '[127.0.0.1]:{sshd.port}' -f {known_hosts}" in lines_after(result.stdout, steps["host key"])
    assert [status_of(steps[name]) for name in ("tcp", "ssh handshake")] == ["ok", "ok"]
    assert figure_of(steps, "auth") == "skipped: host key failed"
    assert status_of(steps["kernel round trip"]) == "skip"
    assert_no_traceback(result)


@pytest.mark.slow
def test_a_python_without_ipykernel_fails_the_ipykernel_step_with_the_pip_command(
    tmp_path: Path, sshd: SSHServer, python_without_ipykernel: Path
) -> None:
    result = doctor(one_kernel(tmp_path, sshd, python_without_ipykernel), "lab")
    assert result.returncode == 1, result.stdout + result.stderr
    steps = step_lines(result.stdout)
    assert status_of(steps["python"]) == "ok" and str(python_without_ipykernel) in steps["python"]
    assert status_of(steps["ipykernel"]) == "FAIL" and "No module named 'ipykernel'" in steps["ipykernel"]
    assert f"{python_without_ipykernel} -m pip install ipykernel" in lines_after(result.stdout, steps["ipykernel"])
    assert figure_of(steps, "kernel round trip") == "skipped: ipykernel failed"
    assert_no_traceback(result)


def test_a_python_that_is_not_there_fails_the_python_step_and_says_how_to_name_it(
    tmp_path: Path, sshd: SSHServer
) -> None:
    result = doctor(one_kernel(tmp_path, sshd, "/nonexistent/bin/python3"), "lab")
    assert result.returncode == 1, result.stdout + result.stderr
    steps = step_lines(result.stdout)
    assert status_of(steps["python"]) == "FAIL" and "exit status 127" in steps["python"]
    assert "full path" in lines_after(result.stdout, steps["python"])
    assert [status_of(steps[name]) for name in ("ipykernel", "pyzmq", "private dir", "clock")] == ["skip"] * 4


def write_echoing_rc_files(home: Path, text: str) -> None:
    """Startup files every login shell reads for a command over ssh, each printing ``text``."""
    (home / ".bashrc").write_text(f'echo "{text}"\n')
    (home / ".zshenv").write_text(f'echo "{text}"\n')
    (home / ".cshrc").write_text(f'echo "{text}"\n')
    (home / ".config" / "fish").mkdir(parents=True, exist_ok=True)
    (home / ".config" / "fish" / "config.fish").write_text(f'echo "{text}"\n')


def test_a_login_shell_that_prints_on_stdout_fails_the_login_shell_step_with_the_fix(
    tmp_path: Path, sshd_factory: Any, remote_python: Path
) -> None:
    shell = pwd.getpwuid(os.getuid()).pw_shell
    if Path(shell).name in ("sh", "dash", "ksh"):
        pytest.skip(f"the login shell {shell} reads no startup file for a command over ssh")
    server = sshd_factory()
    write_echoing_rc_files(server.remote_home, "Welcome to the lab cluster")
    result = doctor(one_kernel(tmp_path, server, remote_python), "lab")
    assert result.returncode == 1, result.stdout + result.stderr
    steps = step_lines(result.stdout)
    line = steps["login shell"]
    assert status_of(line) == "FAIL" and "Welcome to the lab cluster" in line and shell in line, line
    assert "quiet when not interactive" in lines_after(result.stdout, line)
    assert [status_of(steps[name]) for name in ("python", "ipykernel", "pyzmq")] == ["ok"] * 3
    assert figure_of(steps, "kernel round trip") == "skipped: login shell failed"


def test_a_setup_line_that_prints_on_stdout_is_named_as_the_culprit(
    tmp_path: Path, sshd: SSHServer, remote_python: Path
) -> None:
    result = doctor(one_kernel(tmp_path, sshd, remote_python, setup=["echo loading modules"]), "lab")
    assert result.returncode == 1, result.stdout + result.stderr
    line = step_lines(result.stdout)["login shell"]
    assert status_of(line) == "FAIL" and "the setup lines print" in line and "loading modules" in line, line
    assert "[kernels.lab] setup" in lines_after(result.stdout, line)


def test_a_silent_host_fails_its_handshake_after_the_connect_timeout_without_a_traceback(
    tmp_path: Path, sshd: SSHServer
) -> None:
    config = write_config(tmp_path / "remote-kernels.toml", hosts={}, kernels={})
    with silent_ssh_host() as port:
        result = doctor(config, f"{sshd.user}@127.0.0.1:{port}", "--timeout", str(SHORT_TIMEOUT), timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr
    steps = step_lines(result.stdout)
    assert list(steps) == list(HOST_STEPS)
    assert status_of(steps["tcp"]) == "ok"
    assert status_of(steps["ssh handshake"]) == "FAIL" and f"within {SHORT_TIMEOUT} s" in steps["ssh handshake"]
    later = HOST_STEPS[HOST_STEPS.index("host key"):]
    assert {figure_of(steps, name) for name in later} == {"skipped: ssh handshake failed"}
    assert_no_traceback(result)


# ----------------------------------------------------------------------------- every host at once


def test_without_arguments_every_host_gets_one_line_checked_at_once(
    tmp_path: Path, sshd: SSHServer, remote_python: Path
) -> None:
    with silent_ssh_host() as port:
        config = write_config(tmp_path / "remote-kernels.toml",
                              hosts={"live": host_table(sshd), "dead": host_table(sshd, port=port)},
                              kernels={"lab": kernel_table("live", remote_python),
                                       "lost": kernel_table("dead", remote_python)})
        result = doctor(config, "--timeout", str(SHORT_TIMEOUT), timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr
    rows = [line.split("\t") for line in result.stdout.splitlines() if line.startswith(sshd.user + "@")]
    assert [(row[0].split()[-1], row[1], row[2]) for row in rows] == [("(live)", "ok", "lab"),
                                                                       ("(dead)", "fail", "lost")], result.stdout
    assert rows[1][3].startswith("ssh handshake: ")
    assert_no_traceback(result)


def test_without_arguments_json_is_one_document_with_every_hosts_steps(
    tmp_path: Path, sshd: SSHServer, remote_python: Path
) -> None:
    config = write_config(tmp_path / "remote-kernels.toml", hosts={"live": host_table(sshd)},
                          kernels={"lab": kernel_table("live", remote_python)})
    result = doctor(config, "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    document = json.loads(result.stdout)
    assert (document["command"], document["ok"]) == ("doctor", True)
    [host] = document["hosts"]
    assert host["kernels"] == ["lab"] and host["status"] == "ok"
    assert [step["name"] for step in host["steps"]] == list(HOST_STEPS)


def test_doctor_host_json_has_every_host_step_with_its_figure(tmp_path: Path, sshd: SSHServer) -> None:
    config = write_config(tmp_path / "remote-kernels.toml", hosts={"live": host_table(sshd)}, kernels={})
    result = doctor(config, "live", "--json")
    document = json.loads(result.stdout)
    assert document["subject"] == "host live"
    steps = {step["name"]: step for step in document["steps"]}
    assert list(steps) == list(HOST_STEPS)
    assert steps["host key"]["status"] == "ok" and f"{sshd.known_hosts}:1" in steps["host key"]["figure"]
    assert steps["tcp"]["ms"] is not None
    # A host's own python3 may lack ipykernel: a warning, not a failure, so the exit code says ok.
    assert result.returncode == (0 if document["ok"] else 1), result.stderr


# ----------------------------------------------------------------------------- config and ssh_config


def test_a_config_that_does_not_load_is_exit_2_with_the_config_step_failed(tmp_path: Path) -> None:
    config = tmp_path / "remote-kernels.toml"
    config.write_text("[kernels.lab]\nhost = \n")
    result = doctor(config, "lab")
    assert result.returncode == 2, result.stdout + result.stderr
    line = step_lines(result.stdout)["config"]
    assert status_of(line) == "FAIL" and "problem" in line
    assert f"{config}:2" in result.stdout
    assert_no_traceback(result)


def test_ssh_config_origins_name_the_file_and_line_of_each_value_through_an_include(
    tmp_path: Path, isolated_env: Any
) -> None:
    included = isolated_env.ssh_dir / "conf.d" / "lab.conf"
    included.parent.mkdir()
    included.write_text("Host lab\n    HostName lab.example.org\n    ProxyJump bastion\n")
    config = isolated_env.ssh_dir / "config"
    config.write_text("Include conf.d/*.conf\nHost *\n    User alice\n    HostName never.example.org\n")
    origins = ssh.ssh_config_origins(HostEntry(name="lab"))
    assert origins.files == (str(config), str(included))
    assert origins.values["hostname"] == f"{included}:2"  # the first value obtained wins, as in OpenSSH
    assert origins.values["proxyjump"] == f"{included}:3"
    assert origins.values["user"] == f"{config}:3"
    assert "port" not in origins.values


def test_doctor_host_through_an_included_proxy_jump_shows_each_values_line_and_each_hop(
    tmp_path: Path, sshd: SSHServer, isolated_env: Any
) -> None:
    included = isolated_env.ssh_dir / "conf.d" / "lab.conf"
    included.parent.mkdir()
    included.write_text(sshd.ssh_config_block("viajump") + "    ProxyJump jumpbox\n")
    (isolated_env.ssh_dir / "config").write_text("Include conf.d/*.conf\n" + sshd.ssh_config_block("jumpbox"))
    config = write_config(tmp_path / "remote-kernels.toml", hosts={}, kernels={})
    result = doctor(config, "viajump")
    steps = step_lines(result.stdout)
    assert status_of(steps["ssh config"]) == "ok" and "via jumpbox" in steps["ssh config"], result.stdout
    details = lines_after(result.stdout, steps["ssh config"])
    assert f"Include: {included}" in details
    assert f"proxyjump from {included}:10" in details and f"port from {included}:3" in details, details
    assert f"jump chain: jumpbox ({sshd.user}@127.0.0.1:{sshd.port}) -> viajump" in details
    for name in ("ssh handshake", "host key", "auth"):
        assert status_of(steps[name]) == "ok" and "jumpbox: " in steps[name] and "viajump: " in steps[name]
    assert "jump host (jumpbox) must allow it for ProxyJump, and did" in steps["port forwarding"]
    assert_no_traceback(result)

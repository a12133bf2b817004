"""Two-factor login (issue 14): `remote-kernel login HOST` answers a real pam_oath TOTP prompt once;
kernels Jupyter starts without a terminal then share that connection. Without a login a launch
waits for one, says what to run, and never sends a guess.

The sshd (tests/totp_sshd.py) requires ``publickey,keyboard-interactive`` with pam_oath in a mount
namespace of its own; the codes are computed from the test's secret (RFC 6238).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest
from launch_helpers import (
    execute,
    host_table,
    kernel_table,
    run_cli,
    started_kernel,
    sync,
    wait_until,
    write_config,
)
from test_service import service_status, tcp_connections_to
from totp_sshd import TOTPServer, missing_requirement

pytestmark = pytest.mark.slow
NEEDS_CODE = "host lab needs a one-time code: run `remote-kernel login lab` in a terminal"


@pytest.fixture
def totp_sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TOTPServer]:
    problem = missing_requirement()
    if problem is not None:
        if os.environ.get("CI"):
            pytest.fail(problem + "; CI is set, so the TOTP tests must run", pytrace=False)
        pytest.skip(problem)
    server = TOTPServer(tmp_path_factory.mktemp("totp-sshd"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def lab_config(tmp_path: Path, totp_sshd: TOTPServer, remote_python: Path,
               monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("REMOTE_KERNEL_SERVICE", "on")
    config = write_config(tmp_path / "remote-kernels.toml", hosts={"lab": host_table(totp_sshd)},
                          kernels={f"k{i}": kernel_table("lab", remote_python, startup_timeout=6) for i in range(3)})
    monkeypatch.setenv("REMOTE_KERNEL_CONFIG", str(config))
    sync(config)
    return config


def login(config: Path, code: str) -> str:
    """`remote-kernel login lab` on a pseudo-terminal, answering the code; its whole output."""
    child = pexpect.spawn(sys.executable, ["-m", "remote_kernel", "--config", str(config), "login", "lab"],
                          env=dict(os.environ), timeout=30, encoding="utf-8")
    try:
        child.expect("One-time password")
        child.sendline(code)
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, child.before
    return str(child.before)


def test_login_answers_the_code_once_and_three_kernels_share_its_connection(
        lab_config: Path, totp_sshd: TOTPServer) -> None:
    output = login(lab_config, totp_sshd.code())
    assert "logged in to" in output
    assert totp_sshd.code() not in output  # the code was not echoed
    with started_kernel("k0") as (_a, kc0), started_kernel("k1") as (_b, kc1), started_kernel("k2") as (_c, kc2):
        for kc in (kc0, kc1, kc2):
            assert execute(kc, "1+1").result == "2"
        assert tcp_connections_to(totp_sshd.port) == 1
        [connection] = service_status()["connections"]
        assert connection["kernels"] == 3
        assert connection["auth"] == "publickey+keyboard-interactive"
        assert connection["login"] is True
        # ps and gc ask the host over the service's connection: no code asked, no new connection
        connections = totp_sshd.log_path.read_text().count("Connection from ")
        listed = run_cli(["ps", "--host", "lab", "--json"])
        assert listed.returncode == 0, listed.stderr
        # (the "remote" host is this machine: other tests' kernels of this uid are listed too)
        assert {"k0", "k1", "k2"} <= {row["name"] for row in json.loads(listed.stdout)["kernels"]}
        assert run_cli(["gc", "--host", "lab", "--dry-run"]).returncode == 0
        assert totp_sshd.log_path.read_text().count("Connection from ") == connections
    assert totp_sshd.keyboard_interactive_attempts() == 1
    assert run_cli(["logout", "lab"]).returncode == 0
    assert service_status()["connections"] == []


def test_without_login_a_launch_says_what_to_run_and_sends_no_guess(lab_config: Path, totp_sshd: TOTPServer) -> None:
    results: list = [None, None]

    def start(index: int) -> None:
        results[index] = run_cli(["start", f"k{index}"], timeout=60)

    threads = [threading.Thread(target=start, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    for result in results:
        assert result.returncode == 1
        assert NEEDS_CODE in result.stderr
        assert result.stderr.count(NEEDS_CODE) <= 2  # said while waiting, and in the error
    # One conversation was started for both launches and left unanswered: no code was guessed.
    assert totp_sshd.keyboard_interactive_attempts() <= 1
    assert "Accepted keyboard-interactive" not in totp_sshd.log_path.read_text()
    assert "Failed keyboard-interactive" not in totp_sshd.log_path.read_text()


def test_a_dropped_connection_waits_for_one_new_login_for_all_its_kernels(
        lab_config: Path, totp_sshd: TOTPServer) -> None:
    login(lab_config, totp_sshd.code())
    with started_kernel("k0") as (_a, kc0), started_kernel("k1") as (_b, kc1), started_kernel("k2") as (_c, kc2):
        [session] = totp_sshd.session_pids()
        os.kill(session, signal.SIGKILL)  # the network drops; a new connection needs a new code
        assert wait_until(lambda: totp_sshd.keyboard_interactive_attempts() == 2, timeout=30)
        # pam_oath refuses a code of an already used 30 s step: the next step's is in its window
        login(lab_config, totp_sshd.code(step=1))
        for kc in (kc0, kc1, kc2):
            assert execute(kc, "6*7", timeout=60).result == "42"
        assert tcp_connections_to(totp_sshd.port) == 1
    # login, one unattended attempt for the three kernels (left unanswered), the second login
    assert totp_sshd.keyboard_interactive_attempts() == 3


def test_with_ssh_askpass_a_launch_asks_through_that_program(
        lab_config: Path, totp_sshd: TOTPServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    answer = tmp_path / "answer"
    answer.touch(mode=0o600)
    answer.write_text(totp_sshd.code() + "\n")
    program = tmp_path / "askpass"
    program.write_text(f'#!/bin/sh\nprintf "%s\\n" "$1" >> {tmp_path}/asked\nexec cat {answer}\n')
    program.chmod(0o700)
    monkeypatch.setenv("SSH_ASKPASS", str(program))
    monkeypatch.setenv("SSH_ASKPASS_REQUIRE", "force")
    with started_kernel("k0") as (_km, kc):
        assert execute(kc, "1+1").result == "2"
        [connection] = service_status()["connections"]
        assert connection["auth"] == "publickey+keyboard-interactive"
    assert "One-time password" in (tmp_path / "asked").read_text()

"""`ps` and `gc` across several hosts (issue 12, item 5): real sshd, real kernels.

- A host that accepts TCP but never speaks SSH (a listener thread in the test that accepts and
  holds the connection) costs one connect timeout for the whole command, not one per host: hosts
  are asked at once. It gives one line on stderr naming the host and the reason, and no paramiko
  traceback; ``--json`` lists it under ``failures``.
- Two configured hosts that reach the same account (two aliases of one sshd) show each kernel once,
  with both aliases.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from launch_helpers import (
    host_table,
    kernel_facts,
    kernel_table,
    run_cli,
    started_kernel,
    write_config,
    write_spec,
)
from sshd import SSHServer

from remote_kernel.entry import KernelEntry
from remote_kernel.inventory import CONNECT_TIMEOUT, QUERY_DEADLINE

pytestmark = pytest.mark.timeout(180)


@contextlib.contextmanager
def silent_ssh_host() -> Iterator[int]:
    """A port on 127.0.0.1 that accepts every connection and never sends a byte (a wedged sshd,
    a firewall that completes the handshake); yields the port."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    server.settimeout(0.2)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept_and_hold() -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                held.append(server.accept()[0])

    thread = threading.Thread(target=accept_and_hold, daemon=True, name="silent-ssh-host")
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join(timeout=5)
        for sock in [*held, server]:
            sock.close()


def config_with_hosts(path: Path, sshd: SSHServer, python: Path, **hosts: dict[str, Any]) -> Path:
    """A config with the given [hosts] and one kernel `inv` on the first of them."""
    first = next(iter(hosts))
    return write_config(path, hosts=hosts, kernels={"inv": kernel_table(first, python)})


def timed_cli(args: list[str]) -> tuple[float, Any]:
    began = time.monotonic()
    result = run_cli(args, timeout=QUERY_DEADLINE * 3)
    return time.monotonic() - began, result


@pytest.mark.slow
@pytest.mark.parametrize("command", [["ps"], ["gc", "--dry-run"]])
def test_ps_and_gc_ask_every_host_at_once_and_give_a_dead_host_one_line_without_a_traceback(
    command: list[str], tmp_path: Path, sshd: SSHServer, remote_python: Path
) -> None:
    with silent_ssh_host() as dead_a, silent_ssh_host() as dead_b:
        config = config_with_hosts(
            tmp_path / "remote-kernels.toml", sshd, remote_python,
            live=host_table(sshd), **{"dead-a": host_table(sshd, port=dead_a), "dead-b": host_table(sshd, port=dead_b)},
        )
        elapsed, result = timed_cli(["--config", str(config), *command])
    # One after the other, two silent hosts took two connect timeouts (30 s); at once, one.
    assert elapsed < 1.5 * CONNECT_TIMEOUT, f"{command[0]} took {elapsed:.1f} s"
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr and "paramiko" not in result.stderr, result.stderr
    assert len(lines) == 2, result.stderr
    for port, line in zip((dead_a, dead_b), lines, strict=True):
        assert f"127.0.0.1:{port}" in line and "handshake" in line and f"{CONNECT_TIMEOUT:g} s" in line, line
    assert "live" not in result.stderr


@pytest.mark.slow
def test_ps_json_lists_the_dead_hosts_failure_beside_the_live_hosts_kernels(
    tmp_path: Path, sshd: SSHServer, remote_python: Path
) -> None:
    with silent_ssh_host() as dead:
        config = config_with_hosts(tmp_path / "remote-kernels.toml", sshd, remote_python,
                                   live=host_table(sshd), dead=host_table(sshd, port=dead))
        _, result = timed_cli(["--config", str(config), "ps", "--json"])
    document = json.loads(result.stdout)
    assert (result.returncode, document["ok"]) == (1, False), result.stderr
    assert [failure["host"] for failure in document["failures"]] == [f"{sshd.user}@127.0.0.1:{dead} (dead)"]
    assert "handshake" in document["failures"][0]["error"]
    assert isinstance(document["kernels"], list)
    assert "Traceback" not in result.stderr


def two_alias_entry(sshd: SSHServer, python: Path) -> KernelEntry:
    return KernelEntry(name="inv", host=sshd.host_entry(name="alias-a"), display_name="inv", python=str(python),
                       reconnect_grace=60.0)


def test_a_kernel_reached_through_two_configured_hosts_is_shown_once_with_both(
    tmp_path: Path, sshd: SSHServer, remote_python: Path
) -> None:
    config = config_with_hosts(tmp_path / "remote-kernels.toml", sshd, remote_python,
                               **{"alias-a": host_table(sshd), "alias-b": host_table(sshd)})
    write_spec(two_alias_entry(sshd, remote_python))
    with started_kernel("inv") as (_, kc):
        facts = kernel_facts(kc)
        result = run_cli(["--config", str(config), "ps", "--json"])
        table = run_cli(["--config", str(config), "ps"])
    assert result.returncode == 0, result.stderr
    rows = [row for row in json.loads(result.stdout)["kernels"] if row["agent_pid"] == facts.agent_pid]
    assert len(rows) == 1, rows
    assert [host.split(" ")[-1] for host in rows[0]["hosts"]] == ["(alias-a)", "(alias-b)"]
    ours = [line for line in table.stdout.splitlines() if f"\t{facts.agent_pid}\t" in line]
    assert len(ours) == 1 and "(alias-a)" in ours[0] and "(alias-b)" in ours[0], table.stdout


def test_ps_finds_a_kernel_whose_entry_sets_runtime_dir(
    tmp_path: Path, sshd: SSHServer, remote_python: Path
) -> None:
    base = Path(tempfile.mkdtemp(prefix="rk-rt-", dir="/tmp"))  # short: IPC socket paths are limited
    try:
        config = write_config(tmp_path / "remote-kernels.toml", hosts={"fixture": host_table(sshd)},
                              kernels={"inv-rt": kernel_table("fixture", remote_python, runtime_dir=str(base))})
        result = run_cli(["--config", str(config), "sync"])
        assert result.returncode == 0, result.stderr
        with started_kernel("inv-rt") as (_, kc):
            facts = kernel_facts(kc)
            assert str(facts.remote_dir).startswith(str(base)), facts
            listed = run_cli(["--config", str(config), "ps", "--json"])
        assert listed.returncode == 0, listed.stderr
        rows = json.loads(listed.stdout)["kernels"]
        assert [row for row in rows if row["agent_pid"] == facts.agent_pid], listed.stdout
    finally:
        shutil.rmtree(base, ignore_errors=True)

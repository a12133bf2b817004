"""A host key refused on reconnect is permanent (issue 16 item 7): the launcher stops at once with
the reason instead of retrying for the whole reconnect_grace, and leaves the remote kernel alone.
Real sshd, real kernel: the server comes back on the same port with a new host key (or the
client's known_hosts loses its line) while the kernel runs."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from launch_helpers import (
    connect_client,
    kernel_entry,
    kernel_facts,
    launched_cli,
    pid_alive,
    wait_remote_gone,
    wait_until,
    write_spec,
)
from sshd import generate_key

pytestmark = pytest.mark.timeout(180)

GRACE = 120.0  # far longer than the launcher may take to give up
GIVE_UP_WITHIN = 20.0  # the reconnect back-off is 0.5, 1, 2 s...: the first attempt against the new key ends it


def _fingerprint(public_key: Path) -> str:
    output = subprocess.run(
        ["ssh-keygen", "-l", "-E", "sha256", "-f", str(public_key)],
        capture_output=True, text=True, check=True, timeout=10,
    ).stdout
    return output.split()[1]


@pytest.mark.slow
@pytest.mark.parametrize("change", ["new host key", "forgotten known_hosts line"])
def test_a_host_key_refused_on_reconnect_stops_the_launcher_at_once_and_keeps_the_remote_kernel(
    sshd_factory: Any, remote_python: Path, tmp_path: Path, change: str
) -> None:
    server = sshd_factory()
    entry = kernel_entry(server, remote_python, "hostkey", reconnect_grace=GRACE,
                         host=server.host_entry(name="fixture", keepalive=1.0))
    spec_dir = write_spec(entry)
    connection_file = tmp_path / "hostkey.json"
    args = ["from-spec", str(spec_dir), "-f", str(connection_file)]
    with launched_cli(args, stderr_path=tmp_path / "launcher.stderr") as launcher:
        assert wait_until(connection_file.exists, timeout=30), launcher.stderr
        kc = connect_client(connection_file, launcher=launcher)
        facts = kernel_facts(kc)
        kc.stop_channels()
        try:
            server.stop()  # its sessions go too: the launcher's connection drops
            if change == "new host key":
                generate_key(server.host_key)
            else:
                server.known_hosts.write_text("")
            server.start()  # same port; a new key is read from the file
            back = time.monotonic()
            code = launcher.wait(timeout=GIVE_UP_WITHIN)
            print(f"\nthe launcher gave up {time.monotonic() - back:.1f} s after the server came back ({change})")
            stderr = launcher.stderr
            assert code == 1, stderr
            assert "Traceback" not in stderr
            assert _fingerprint(server.host_key.with_suffix(".pub")) in stderr
            if change == "new host key":
                assert "HOST KEY CHANGED" in stderr
                assert f"{server.known_hosts}:1" in stderr
            else:
                assert "is unknown" in stderr
                assert str(server.known_hosts) in stderr
            assert "the launcher stops instead of retrying" in stderr
            assert f"keeps it for reconnect_grace={GRACE:g} s" in stderr
            # nothing was stopped on the remote side: the user may still fix known_hosts
            assert pid_alive(facts.agent_pid) and pid_alive(facts.pid)
            assert facts.remote_dir.is_dir()
        finally:
            if pid_alive(facts.agent_pid):
                os.kill(facts.agent_pid, signal.SIGTERM)  # the agent stops its kernel and cleans up
    assert wait_remote_gone(facts) == []

"""The launcher's phases as a state machine (starting, running, reconnecting, stopping), and the
rules its transition table encodes: stopping is final, and a stop asked for while the link is
down is delivered by reconnecting at once, not left to the remote lease."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from launch_helpers import (
    connect_client,
    kernel_entry,
    kernel_facts,
    launched_cli,
    remote_leftovers,
    wait_until,
    write_spec,
)
from sshd import SSHServer

from remote_kernel.entry import HostEntry, KernelEntry
from remote_kernel.launcher import TRANSITIONS, Launcher, Phase
from remote_kernel.tunnel import Attached


def _launcher_in(phase: Phase) -> Launcher:
    entry = KernelEntry(name="k", host=HostEntry(name="h"), display_name="k")
    launcher = Launcher(entry, None)
    launcher.state.phase = phase
    return launcher


def test_stopping_is_final_and_every_phase_can_stop() -> None:
    assert TRANSITIONS[Phase.STOPPING] == frozenset()
    assert all(Phase.STOPPING in TRANSITIONS[phase] for phase in Phase if phase is not Phase.STOPPING)
    assert Phase.STARTING not in set().union(*TRANSITIONS.values())  # nothing goes back to starting


def test_a_reattach_while_stopping_does_not_make_the_kernel_running_again() -> None:
    launcher = _launcher_in(Phase.STOPPING)
    launcher.state.link_down = True
    launcher._on_attached(Attached({"state": "ready"}))
    assert launcher.state.phase is Phase.STOPPING
    assert not launcher.state.link_down


def test_a_reattach_while_reconnecting_makes_it_running() -> None:
    launcher = _launcher_in(Phase.RECONNECTING)
    launcher.state.link_down = True
    launcher._on_attached(Attached({"state": "ready"}))
    assert launcher.state.phase is Phase.RUNNING


@pytest.mark.slow
def test_a_stop_requested_while_the_link_is_down_stops_the_kernel_once_the_host_is_back(
    sshd_factory: object, remote_python: Path, tmp_path: Path
) -> None:
    server: SSHServer = sshd_factory()  # type: ignore[operator]
    entry = kernel_entry(server, remote_python, "stop-while-down", reconnect_grace=120,
                         host=server.host_entry(name="fixture", keepalive=1.0))
    spec = write_spec(entry)
    connection_file = tmp_path / "k.json"
    with launched_cli(["from-spec", str(spec), "-f", str(connection_file)],
                      stderr_path=tmp_path / "stderr.txt") as launcher:
        assert wait_until(connection_file.exists, timeout=30), launcher.stderr
        kc = connect_client(connection_file, launcher=launcher)
        facts = kernel_facts(kc)
        kc.stop_channels()
        sessions = server.session_pids()
        os.kill(server.pid, signal.SIGKILL)  # the host goes away: listener first, then the sessions
        for pid in sessions:
            os.kill(pid, signal.SIGKILL)
        assert wait_until(lambda: "lost the connection" in launcher.stderr, timeout=20), launcher.stderr
        launcher.signal(signal.SIGTERM)  # Jupyter shuts the kernel down while the link is down
        time.sleep(1.0)
        server.start()  # the host is back, well inside reconnect_grace (120 s)
        code = launcher.wait(timeout=40)
    assert code == 0, launcher.stderr
    assert "to deliver the shutdown" in launcher.stderr or "reconnect attempt" in launcher.stderr, launcher.stderr
    assert wait_until(lambda: not remote_leftovers(facts), timeout=10), (remote_leftovers(facts), launcher.stderr)


@pytest.mark.slow
def test_a_login_that_prints_on_stdout_is_named_as_the_cause_of_a_failed_start(
    sshd_factory: object, remote_python: Path, tmp_path: Path
) -> None:
    server: SSHServer = sshd_factory()  # type: ignore[operator]
    assert server.remote_home is not None
    (server.remote_home / ".bashrc").write_text("echo 'Welcome to the lab cluster, have a nice day'\n")
    entry = kernel_entry(server, remote_python, "noisy-login")
    write_spec(entry)
    result = subprocess.run([sys.executable, "-m", "remote_kernel", "from-spec", entry.name, "-f",
                             str(tmp_path / "k.json")], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1
    assert "printed on the remote login's stdout" in result.stderr and "doctor noisy-login" in result.stderr
    assert "internal error" not in result.stderr and "Traceback" not in result.stderr

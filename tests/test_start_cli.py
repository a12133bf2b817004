"""What `remote-kernel start` tells the user, end to end: the --json document, the interrupt hint,
the v1.1 form's hints. Real launches over the sshd fixture with a real ipykernel (issue 12, items
10 and 12)."""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import pytest
from conftest import IsolatedEnv
from launch_helpers import (
    EXISTING_LINE,
    collect,
    connect_client,
    execute,
    kernel_facts,
    launched_cli,
    run_cli,
    single_kernel_config,
    wait_for_stream,
    wait_remote_gone,
)
from sshd import SSHServer

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]

SLEEPING_CELL = "import time; print('sleeping', flush=True); time.sleep(60)"
INTERRUPT_LINE = re.compile(r"`kill -INT (\d+)`")


def test_start_json_prints_one_document_once_ready_and_keeps_serving(
    sshd: SSHServer, remote_python: Path, tmp_path: Path, isolated_env: IsolatedEnv
) -> None:
    config = single_kernel_config(tmp_path / "remote-kernels.toml", sshd, "e2e", remote_python)
    with launched_cli(["--config", str(config), "start", "e2e", "--json"],
                      stderr_path=tmp_path / "start.err") as launched:
        document = json.loads(launched.wait_for_line(re.compile(r"^\{.*\}$"))[0])
        assert document["remote_kernel_json"] == 1
        assert (document["command"], document["ok"], document["kernel"]) == ("start", True, "e2e")
        assert document["launcher_pid"] == launched.proc.pid
        path = Path(document["connection_file"])
        assert path.parent == isolated_env.jupyter_runtime
        assert document["existing"] == f"jupyter console --existing {path}"
        kc = connect_client(path, launcher=launched)
        try:
            assert execute(kc, "1+1").result == "2"
            facts = kernel_facts(kc)
        finally:
            kc.stop_channels()
        launched.signal(signal.SIGTERM)
        assert launched.wait() == 0, launched.stderr
    assert wait_remote_gone(facts) == []
    assert "".join(launched.stdout).count("\n") == 1, launched.stdout  # one document and nothing else


def test_the_start_hint_gives_the_launcher_pid_and_kill_int_on_it_interrupts_the_cell(
    sshd: SSHServer, remote_python: Path, tmp_path: Path
) -> None:
    config = single_kernel_config(tmp_path / "remote-kernels.toml", sshd, "e2e", remote_python)
    with launched_cli(["--config", str(config), "start", "e2e"], stderr_path=tmp_path / "start.err") as launched:
        path = Path(launched.wait_for_line(EXISTING_LINE)[1])
        pid = int(launched.wait_for_line(INTERRUPT_LINE)[1])
        assert pid == launched.proc.pid
        assert "cannot interrupt" in "".join(launched.stdout)
        kc = connect_client(path, launcher=launched)
        try:
            before = kernel_facts(kc)
            msg_id = kc.execute(SLEEPING_CELL)
            wait_for_stream(kc, msg_id)
            os.kill(pid, signal.SIGINT)  # exactly what the hint says: the launcher alone, not its group
            assert collect(kc, msg_id, timeout=10).ename == "KeyboardInterrupt"
            # The README's other way: a client's interrupt_request on the control channel.
            msg_id = kc.execute(SLEEPING_CELL)
            wait_for_stream(kc, msg_id)
            kc.control_channel.send(kc.session.msg("interrupt_request", {}))
            assert collect(kc, msg_id, timeout=10).ename == "KeyboardInterrupt"
            assert kernel_facts(kc).pid == before.pid
        finally:
            kc.stop_channels()
        launched.signal(signal.SIGTERM)
        assert launched.wait() == 0, launched.stderr


def test_the_v1_1_form_whose_python_lacks_ipykernel_says_pass_python(
    sshd: SSHServer, remote_python: Path, tmp_path: Path, isolated_env: IsolatedEnv
) -> None:
    (isolated_env.ssh_dir / "known_hosts").write_text(sshd.known_hosts_line())
    # -S hides site-packages: the same python, now without ipykernel (any machine, no second venv)
    done = run_cli(["-t", f"{sshd.user}@127.0.0.1:{sshd.port}", "-i", str(sshd.client_key),
                    "--python", str(remote_python), "-c", "python -S -m ipykernel_launcher",
                    "-f", str(tmp_path / "kernel.json")], timeout=90)
    assert done.returncode == 1, done.stderr
    assert "No module named ipykernel" in done.stderr
    assert "pass `--python` with one that has it" in done.stderr
    assert "set `python`" not in done.stderr
    assert "Traceback" not in done.stderr

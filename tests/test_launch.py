"""End to end: Jupyter (jupyter_client) -> our launcher -> the sshd fixture -> a real ipykernel.

Issue 4, "Done when" a-m. The remote host is this machine, reached through a private sshd on
127.0.0.1, so what the kernel leaves behind (processes, its k-XXXX directory) is checked directly.
Each test is bounded (pytest-timeout, bounded waits) and shuts down what it starts.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paramiko
import pytest
from conftest import IsolatedEnv, SSHDFactory
from launch_helpers import (
    EXISTING_LINE,
    collect,
    connect_client,
    execute,
    host_table,
    jupyter_connection_file,
    kernel_entry,
    kernel_facts,
    kernel_table,
    launched_cli,
    remote_leftovers,
    restarted,
    run_cli,
    single_kernel_config,
    started_kernel,
    sync,
    user_kernels_dir,
    wait_for_iopub_text,
    wait_for_stream,
    wait_remote_gone,
    wait_until,
    write_config,
    write_spec,
)
from sshd import SSHServer

from remote_kernel.config import load_config
from remote_kernel.entry import KernelEntry

pytestmark = pytest.mark.timeout(120)

Install = Callable[..., KernelEntry]


@pytest.fixture
def install(sshd: SSHServer, remote_python: Path) -> Install:
    """``install(name, **entry_fields)``: a kernelspec for an entry on the session sshd."""

    def make(name: str = "e2e", **fields: Any) -> KernelEntry:
        entry = kernel_entry(sshd, remote_python, name, **fields)
        write_spec(entry)
        return entry

    return make


def _run_in_kernel(kc: Any, code: str) -> Any:
    """Run ``code`` whose last printed line is JSON; return it decoded."""
    result = execute(kc, code)
    assert result.status == "ok", result
    return json.loads(result.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------- a. sync + start


def test_a_synced_kernelspec_starts_under_kernel_manager_and_computes_one_plus_one(
    sshd: SSHServer, remote_python: Path, tmp_path: Path
) -> None:
    config = single_kernel_config(tmp_path / "remote-kernels.toml", sshd, "e2e", remote_python)
    spec = sync(config) / "e2e" / "kernel.json"
    assert json.loads(spec.read_text())["argv"][1:4] == ["-m", "remote_kernel", "from-spec"]
    with started_kernel("e2e") as (_, kc):
        result = execute(kc, "1+1")
    assert (result.status, result.result) == ("ok", "2")


# --------------------------------------------------------------------------------- b. interrupt


@pytest.mark.parametrize("mode", ["message", "signal"])
def test_interrupt_raises_keyboard_interrupt_within_two_seconds_and_the_same_kernel_lives_on(
    install: Install, mode: str
) -> None:
    install("e2e", interrupt_mode=mode)
    with started_kernel("e2e") as (km, kc):
        assert km.kernel_spec is not None and km.kernel_spec.interrupt_mode == mode
        before = kernel_facts(kc)
        msg_id = kc.execute("import time; print('sleeping', flush=True); time.sleep(60)")
        wait_for_stream(kc, msg_id)
        began = time.monotonic()
        km.interrupt_kernel()
        interrupted = collect(kc, msg_id, timeout=10)
        elapsed = time.monotonic() - began
        assert interrupted.ename == "KeyboardInterrupt", interrupted
        assert elapsed < 2.0, f"the interrupt took {elapsed:.2f} s"
        assert km.is_alive(), "the launcher died of the interrupt"
        after = kernel_facts(kc)
        assert (after.pid, after.agent_pid) == (before.pid, before.agent_pid)
        assert execute(kc, "1+1").result == "2"


# --------------------------------------------------------------------------------- c. restart


@pytest.mark.parametrize("now", [False, True], ids=["graceful", "now"])
def test_restart_gives_a_new_kernel_and_leaves_nothing_of_the_old_one_on_the_remote(
    install: Install, now: bool
) -> None:
    install("e2e")
    with started_kernel("e2e") as (km, kc):
        before, after = restarted(km, kc, now=now)
        assert after.pid != before.pid
        assert after.remote_dir != before.remote_dir
        assert execute(kc, "'state' in globals()").result == "False"
        # "at once" even when the old launcher was SIGKILLed (now=True): the new agent stops it
        assert wait_remote_gone(before, timeout=10) == []
        assert remote_leftovers(after) != [], "the new kernel must still be running"


# --------------------------------------------------------------------------------- d. shutdown


def test_shutdown_leaves_no_remote_process_and_no_remote_file(
    install: Install, isolated_env: IsolatedEnv
) -> None:
    install("e2e")
    with started_kernel("e2e") as (km, kc):
        facts = kernel_facts(kc)
        assert facts.remote_dir.parent.name == f"remote-kernel-{os.getuid()}"
        assert {p.name for p in facts.remote_dir.iterdir()} >= {"agent.json", "kernel.json", "agent.sock"}
        launcher = km.provisioner.process  # type: ignore[union-attr]
        kc.stop_channels()
        began = time.monotonic()
        km.shutdown_kernel(now=False)
        took = time.monotonic() - began
        # the launcher exited by itself (0), after the remote kernel confirmed its exit: it was
        # not killed by jupyter_client after shutdown_wait_time
        assert launcher.returncode == 0, f"launcher exit {launcher.returncode} after {took:.1f} s"
        # nothing left the moment shutdown_kernel returns: the launcher waits for the agent
        assert remote_leftovers(facts) == []
    state_dir = isolated_env.jupyter_runtime / "remote-kernel"
    assert not state_dir.exists() or list(state_dir.iterdir()) == []


# --------------------------------------------------------------------------------- e. start NAME


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGHUP], ids=["sigterm", "sighup"])
def test_start_prints_a_connection_file_a_client_can_use_and_sigterm_or_sighup_stops_everything(
    sshd: SSHServer, remote_python: Path, tmp_path: Path, isolated_env: IsolatedEnv, stop: signal.Signals
) -> None:
    config = single_kernel_config(tmp_path / "remote-kernels.toml", sshd, "e2e", remote_python)
    with launched_cli(["--config", str(config), "start", "e2e"], stderr_path=tmp_path / "start.err") as launched:
        path = Path(launched.wait_for_line(EXISTING_LINE)[1])
        assert path.parent == isolated_env.jupyter_runtime
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        kc = connect_client(path, launcher=launched)
        try:
            assert execute(kc, "1+1").result == "2"
            facts = kernel_facts(kc)
        finally:
            kc.stop_channels()
        launched.signal(stop)
        assert launched.wait() == 0, launched.stderr
    assert wait_remote_gone(facts) == []
    assert not path.exists()


def test_ctrl_c_in_the_terminal_running_start_interrupts_the_cell_and_the_kernel_lives_on(
    sshd: SSHServer, remote_python: Path, tmp_path: Path
) -> None:
    config = single_kernel_config(tmp_path / "remote-kernels.toml", sshd, "e2e", remote_python)
    with launched_cli(["--config", str(config), "start", "e2e"], stderr_path=tmp_path / "start.err") as launched:
        kc = connect_client(Path(launched.wait_for_line(EXISTING_LINE)[1]), launcher=launched)
        try:
            before = kernel_facts(kc)
            msg_id = kc.execute("import time; print('sleeping', flush=True); time.sleep(60)")
            wait_for_stream(kc, msg_id)
            os.killpg(launched.proc.pid, signal.SIGINT)  # what Ctrl-C does: the foreground group
            assert collect(kc, msg_id, timeout=10).ename == "KeyboardInterrupt"
            assert launched.proc.poll() is None, launched.stderr
            assert kernel_facts(kc).pid == before.pid
        finally:
            kc.stop_channels()
        launched.signal(signal.SIGTERM)
        assert launched.wait() == 0, launched.stderr


def test_when_the_remote_kernel_dies_the_launcher_exits_non_zero_with_the_reason(
    sshd: SSHServer, remote_python: Path, tmp_path: Path
) -> None:
    config = single_kernel_config(tmp_path / "remote-kernels.toml", sshd, "e2e", remote_python)
    connection_file = jupyter_connection_file(tmp_path / "kernel-dies.json")
    with launched_cli(["--config", str(config), "start", "e2e", "-f", str(connection_file)],
                      stderr_path=tmp_path / "start.err") as launched:
        kc = connect_client(connection_file, launcher=launched)
        try:
            facts = kernel_facts(kc)
            kc.execute("import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
            assert launched.wait() == 1, launched.stderr
        finally:
            kc.stop_channels()
    assert "SIGKILL" in launched.stderr
    assert "Traceback" not in launched.stderr
    assert wait_remote_gone(facts) == []


# --------------------------------------------------------------------------------- f. v1.1 -t


@pytest.mark.parametrize("command", [None, "python -m ipykernel_launcher --HistoryManager.enabled=False"],
                         ids=["default", "dash-c"])
def test_the_v1_1_target_form_runs_a_kernel_with_and_without_dash_c(
    sshd: SSHServer, remote_python: Path, tmp_path: Path, isolated_env: IsolatedEnv, command: str | None
) -> None:
    # the -t form has no known_hosts option: ~/.ssh/known_hosts of the (isolated) HOME is used
    (isolated_env.ssh_dir / "known_hosts").write_text(sshd.known_hosts_line())
    connection_file = jupyter_connection_file(tmp_path / "kernel-v11.json")
    args = ["-t", f"{sshd.user}@127.0.0.1:{sshd.port}", "-i", str(sshd.client_key),
            "--python", str(remote_python), "-f", str(connection_file)]
    if command:
        args += ["-c", command]
    with launched_cli(args, stderr_path=tmp_path / "v11.err") as launched:
        kc = connect_client(connection_file, launcher=launched)
        try:
            argv = _run_in_kernel(kc, "import sys, json; print(json.dumps(sys.argv))")
            facts = kernel_facts(kc)
        finally:
            kc.stop_channels()
        assert ("--HistoryManager.enabled=False" in argv) == bool(command), argv
        launched.signal(signal.SIGTERM)
        assert launched.wait() == 0, launched.stderr
    assert wait_remote_gone(facts) == []
    assert connection_file.exists(), "a connection file given with -f belongs to the caller"


def test_the_v1_1_jump_option_chains_through_a_jump_host(
    sshd_factory: SSHDFactory, remote_python: Path, tmp_path: Path, isolated_env: IsolatedEnv
) -> None:
    jump, target = sshd_factory(), sshd_factory()
    # -J takes no key of its own: the jump host is reached with the default ~/.ssh/id_ed25519
    default_key = isolated_env.ssh_dir / "id_ed25519"
    default_key.write_bytes(jump.client_key.read_bytes())
    default_key.chmod(0o600)
    (isolated_env.ssh_dir / "known_hosts").write_text(jump.known_hosts_line() + target.known_hosts_line())
    connection_file = jupyter_connection_file(tmp_path / "kernel-jump.json")
    args = ["-t", f"{target.user}@127.0.0.1:{target.port}", "-J", f"{jump.user}@127.0.0.1:{jump.port}",
            "-i", str(target.client_key), "--python", str(remote_python), "-f", str(connection_file)]
    with launched_cli(args, stderr_path=tmp_path / "jump.err") as launched:
        kc = connect_client(connection_file, launcher=launched)
        try:
            assert execute(kc, "1+1").result == "2"
            assert jump.session_pids() != []
        finally:
            kc.stop_channels()
        launched.signal(signal.SIGTERM)
        assert launched.wait() == 0, launched.stderr


# --------------------------------------------------------------------------------- g. from-spec


@pytest.mark.parametrize("how", ["name", "directory"])
def test_from_spec_launches_by_kernelspec_name_and_by_directory(
    install: Install, tmp_path: Path, how: str
) -> None:
    install("e2e")
    spec_dir = user_kernels_dir() / "e2e"
    connection_file = jupyter_connection_file(tmp_path / "kernel-spec.json")
    kernel = "e2e" if how == "name" else str(spec_dir)
    with launched_cli(["from-spec", kernel, "-f", str(connection_file)],
                      stderr_path=tmp_path / "from-spec.err") as launched:
        kc = connect_client(connection_file, launcher=launched)
        try:
            assert execute(kc, "6*7").result == "42"
            facts = kernel_facts(kc)
        finally:
            kc.stop_channels()
        launched.signal(signal.SIGTERM)
        assert launched.wait() == 0, launched.stderr
    assert wait_remote_gone(facts) == []


def test_a_synced_kernelspec_still_launches_after_the_toml_is_deleted(
    sshd: SSHServer, remote_python: Path, tmp_path: Path
) -> None:
    config = single_kernel_config(tmp_path / "remote-kernels.toml", sshd, "e2e", remote_python)
    sync(config)
    config.unlink()
    with started_kernel("e2e") as (_, kc):
        assert execute(kc, "1+1").result == "2"


# --------------------------------------------------------------------------------- h. env, cwd, setup

_ENV_CODE = """
import os, json
print(json.dumps({"cwd": os.getcwd(), "FROM_SETUP": os.environ.get("FROM_SETUP"),
                  "RK_ENV": os.environ.get("RK_ENV"), "SETUP_SAW_CWD": os.environ.get("SETUP_SAW_CWD")}))
"""


@pytest.mark.parametrize("where", ["plain", "with space", "home"])
def test_env_cwd_and_setup_lines_take_effect_inside_the_kernel(
    sshd: SSHServer, remote_python: Path, tmp_path: Path, where: str
) -> None:
    if where == "home":
        assert sshd.remote_home is not None
        workdir = sshd.remote_home / f"proj-{tmp_path.name}"
        cwd = f"~/{workdir.name}"
    else:
        workdir = tmp_path / ("work dir" if where == "with space" else "work")
        cwd = str(workdir)
    workdir.mkdir()
    entry = kernel_entry(sshd, remote_python, "e2e", cwd=cwd,
                         env={"RK_ENV": "a value with spaces, $HOME and 'quotes'"},
                         setup=["export FROM_SETUP=1", 'export SETUP_SAW_CWD="$(pwd)"'])
    write_spec(entry)
    with started_kernel("e2e") as (_, kc):
        seen = _run_in_kernel(kc, _ENV_CODE)
    assert seen == {"cwd": str(workdir), "FROM_SETUP": "1", "SETUP_SAW_CWD": str(workdir),
                    "RK_ENV": "a value with spaces, $HOME and 'quotes'"}


# --------------------------------------------------------------------------------- i. no ipykernel


def test_a_remote_python_without_ipykernel_fails_within_seconds_naming_the_module(
    sshd: SSHServer, python_without_ipykernel: Path, tmp_path: Path
) -> None:
    config = single_kernel_config(tmp_path / "remote-kernels.toml", sshd, "bare", python_without_ipykernel)
    connection_file = jupyter_connection_file(tmp_path / "kernel-bare.json")
    began = time.monotonic()
    result = run_cli(["--config", str(config), "start", "bare", "-f", str(connection_file)], timeout=60)
    took = time.monotonic() - began
    assert result.returncode == 1, result
    assert "No module named ipykernel" in result.stderr
    assert "Traceback" not in result.stderr.split("remote stderr")[0]
    assert took < 15, f"took {took:.1f} s"


def test_kernel_manager_on_a_remote_python_without_ipykernel_fails_fast_instead_of_hanging(
    sshd: SSHServer, python_without_ipykernel: Path
) -> None:
    write_spec(kernel_entry(sshd, python_without_ipykernel, "bare"))
    from jupyter_client.manager import KernelManager

    km = KernelManager(kernel_name="bare")
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    began = time.monotonic()
    try:
        with pytest.raises(RuntimeError, match="died"):
            kc.wait_for_ready(timeout=45)
        assert time.monotonic() - began < 15
        assert wait_until(lambda: not km.is_alive(), timeout=5)
    finally:
        kc.stop_channels()
        if km.has_kernel:
            km.shutdown_kernel(now=True)


# --------------------------------------------------------------------------------- j. host key


def test_an_unknown_host_key_is_refused_naming_the_known_hosts_file(
    sshd: SSHServer, remote_python: Path, tmp_path: Path
) -> None:
    known_hosts = tmp_path / "other_known_hosts"
    known_hosts.write_text("")
    config = write_config(
        tmp_path / "remote-kernels.toml",
        hosts={"fixture": host_table(sshd, known_hosts=str(known_hosts))},
        kernels={"e2e": kernel_table("fixture", remote_python)},
    )
    connection_file = jupyter_connection_file(tmp_path / "kernel-hk.json")
    result = run_cli(["--config", str(config), "start", "e2e", "-f", str(connection_file)], timeout=60)
    assert result.returncode == 1, result
    assert str(known_hosts) in result.stderr
    assert "Traceback" not in result.stderr


# --------------------------------------------------------------------------------- k, l. sshd setups


def test_a_kernel_runs_through_a_proxy_jump_host(
    sshd_factory: SSHDFactory, remote_python: Path, tmp_path: Path
) -> None:
    jump, target = sshd_factory(), sshd_factory()
    config = write_config(
        tmp_path / "remote-kernels.toml",
        hosts={"bastion": host_table(jump), "inner": host_table(target, proxy_jump=["bastion"])},
        kernels={"jumped": kernel_table("inner", remote_python)},
    )
    write_spec(load_config(config).entry("jumped"))
    assert jump.session_pids() == []
    with started_kernel("jumped") as (_, kc):
        assert execute(kc, "1+1").result == "2"
        # the one SSH connection goes through the bastion (a live session there), and logs into
        # the inner sshd
        assert jump.session_pids() != []
        assert "Accepted publickey" in jump.log_tail(50)
        assert "Accepted publickey" in target.log_tail(50)


def test_a_kernel_runs_through_an_sshd_with_tcp_forwarding_disabled(
    sshd_factory: SSHDFactory, remote_python: Path
) -> None:
    server = sshd_factory(extra_config="AllowTcpForwarding no")
    _assert_forwarding_is_refused(server)
    write_spec(kernel_entry(server, remote_python, "noforward"))
    with started_kernel("noforward") as (_, kc):
        assert execute(kc, "1+1").result == "2"
        assert execute(kc, "print('x' * 100_000)").stdout == "x" * 100_000 + "\n"


def _patched_launcher(spec_dir: Path, patch: str) -> None:
    """Make the kernelspec run the real launcher after ``patch`` (Python lines) has run in it."""
    spec = json.loads((spec_dir / "kernel.json").read_text())
    assert spec["argv"][1:3] == ["-m", "remote_kernel"]
    code = f"{patch}\nimport runpy\nrunpy.run_module('remote_kernel', run_name='__main__', alter_sys=True)\n"
    spec["argv"][1:3] = ["-c", code]
    (spec_dir / "kernel.json").write_text(json.dumps(spec))


@pytest.mark.timeout(180)
def test_output_and_input_flow_while_both_ends_re_key_many_times(
    sshd_factory: SSHDFactory, remote_python: Path
) -> None:
    """The agent's output is parsed on paramiko's transport thread. Were that thread to send (a
    window grant) while a key exchange it started is under way, it would wait for the exchange
    that only it can finish: "Key-exchange timed out" after 30 s (ANCHORS.md). Here the launcher's
    paramiko starts a re-key every 256 KiB (not 512 MiB) and sshd every ~1 MiB, while output
    keeps arriving."""
    server = sshd_factory(extra_config="RekeyLimit 1M\nLogLevel DEBUG1")
    spec_dir = write_spec(kernel_entry(server, remote_python, "rekey"))
    _patched_launcher(spec_dir, "import paramiko.packet\nparamiko.packet.Packetizer.REKEY_BYTES = 256 * 1024")
    with started_kernel("rekey") as (_, kc):
        big = execute(kc, "print('x' * (8 * 2**20))", timeout=120)
        assert big.stdout == "x" * (8 * 2**20) + "\n"
        upload = "u" * (2 * 2**20)
        assert execute(kc, f"len({upload!r})", timeout=60).result == str(len(upload))
        assert execute(kc, "1+1").result == "2"
    assert server.log_tail(100_000).count("SSH2_MSG_NEWKEYS received") >= 20


def test_where_paramiko_lacks_what_the_fast_path_needs_the_kernel_still_works_through_recv(
    sshd: SSHServer, remote_python: Path
) -> None:
    """ssh._StdoutTap relies on private paramiko names; without them the tunnel reads the channel."""
    spec_dir = write_spec(kernel_entry(sshd, remote_python, "norecv"))
    _patched_launcher(spec_dir, "from remote_kernel import ssh\nssh._StdoutTap.install = lambda channel: None")
    with started_kernel("norecv") as (_, kc):
        assert execute(kc, "1+1").result == "2"
        big = execute(kc, "print('x' * (20 * 2**20))", timeout=120)  # more than one window
        assert big.stdout == "x" * (20 * 2**20) + "\n"


def _assert_forwarding_is_refused(server: SSHServer) -> None:
    """The fixture really forbids forwarding: a direct-tcpip channel is refused."""
    client = paramiko.SSHClient()
    client.load_host_keys(str(server.known_hosts))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(server.host, server.port, server.user, key_filename=str(server.client_key),
                   look_for_keys=False, allow_agent=False, timeout=10)
    try:
        transport = client.get_transport()
        assert transport is not None
        with pytest.raises(paramiko.ChannelException):
            transport.open_channel("direct-tcpip", ("127.0.0.1", server.port), ("127.0.0.1", 0), timeout=10)
    finally:
        client.close()


# --------------------------------------------------------------------------------- m. two clients


def test_two_clients_on_one_kernel_both_execute_and_both_see_iopub_output(install: Install) -> None:
    install("e2e")
    with started_kernel("e2e") as (km, first):
        second = connect_client(Path(km.connection_file))
        try:
            for sender, watcher, word in ((first, second, "from-first"), (second, first, "from-second")):
                result = execute(sender, f"print({word!r})")
                assert result.stdout == word + "\n"
                seen = wait_for_iopub_text(watcher, word, timeout=10)
                assert seen["parent_header"]["msg_id"] == result.messages[0]["parent_header"]["msg_id"]
        finally:
            second.stop_channels()


# --------------------------------------------------------------------------------- errors


def test_a_local_port_in_use_is_a_clear_error_naming_the_port(
    sshd: SSHServer, remote_python: Path, tmp_path: Path
) -> None:
    config = single_kernel_config(tmp_path / "remote-kernels.toml", sshd, "e2e", remote_python)
    connection_file = jupyter_connection_file(tmp_path / "kernel-busy.json")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        data = json.loads(connection_file.read_text())
        data["shell_port"] = port
        connection_file.write_text(json.dumps(data))
        result = run_cli(["--config", str(config), "start", "e2e", "-f", str(connection_file)], timeout=30)
    assert result.returncode == 1, result
    assert f"127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


_MISSING = {
    "python": ("/no/such/python", "the remote shell could not run '/no/such/python' (python)"),
    "cwd": ("/no/such dir", "the working directory '/no/such dir' does not exist on the remote host"),
}


@pytest.mark.parametrize("field", sorted(_MISSING))
def test_a_missing_remote_python_or_cwd_fails_at_once_naming_it(
    sshd: SSHServer, remote_python: Path, tmp_path: Path, field: str
) -> None:
    value, message = _MISSING[field]
    fields = {"python": str(remote_python), field: value}
    config = write_config(tmp_path / "remote-kernels.toml", hosts={"fixture": host_table(sshd)},
                          kernels={"e2e": kernel_table("fixture", **fields)})
    connection_file = jupyter_connection_file(tmp_path / "kernel-missing.json")
    began = time.monotonic()
    result = run_cli(["--config", str(config), "start", "e2e", "-f", str(connection_file)], timeout=30)
    assert result.returncode == 1, result
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert time.monotonic() - began < 15


def test_two_starts_of_one_entry_get_two_connection_files(
    sshd: SSHServer, remote_python: Path, tmp_path: Path
) -> None:
    config = single_kernel_config(tmp_path / "remote-kernels.toml", sshd, "e2e", remote_python)
    args = ["--config", str(config), "start", "e2e"]
    with launched_cli(args, stderr_path=tmp_path / "one.err") as one:
        first = Path(one.wait_for_line(EXISTING_LINE)[1])
        with launched_cli(args, stderr_path=tmp_path / "two.err") as two:
            second = Path(two.wait_for_line(EXISTING_LINE)[1])
            assert second != first
            assert first.name == f"kernel-{sshd.user}@fixture.json"  # the SSH user, the host's name in the config
            for path in (first, second):
                kc = connect_client(path)
                try:
                    assert execute(kc, "1+1").result == "2"
                finally:
                    kc.stop_channels()


def test_start_of_an_unknown_entry_exits_2_listing_the_known_names(
    sshd: SSHServer, remote_python: Path, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path / "remote-kernels.toml",
        hosts={"fixture": host_table(sshd)},
        kernels={"alpha": kernel_table("fixture", remote_python), "beta": kernel_table("fixture", remote_python)},
    )
    result = run_cli(["--config", str(config), "start", "gamma"], timeout=30)
    assert result.returncode == 2, result
    assert "gamma" in result.stderr
    assert "alpha" in result.stderr and "beta" in result.stderr


# --------------------------------------------------------------------------------- figures


def _measure(kernel_name: str) -> dict[str, float]:
    from jupyter_client.manager import KernelManager

    km = KernelManager(kernel_name=kernel_name)
    began = time.monotonic()
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=45)
        startup = time.monotonic() - began
        execute(kc, "1+1")  # warm up
        trips = []
        for _ in range(100):
            began = time.perf_counter()
            assert execute(kc, "1+1").result == "2"
            trips.append(time.perf_counter() - began)
        began = time.monotonic()
        big = execute(kc, "print('x' * (50 * 2**20))", timeout=120)
        print_time = time.monotonic() - began
        assert len(big.stdout) == 50 * 2**20 + 1
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=False)
    return {"startup_s": startup, "rtt_median_ms": statistics.median(trips) * 1000,
            "rtt_p95_ms": sorted(trips)[94] * 1000, "print_50mb_s": print_time}


@pytest.mark.timeout(300)
def test_figures_startup_round_trip_and_a_50_mb_print_next_to_a_local_kernel(
    install: Install, capsys: pytest.CaptureFixture[str]
) -> None:
    install("e2e")
    remote = _measure("e2e")
    local = _measure("python3")
    with capsys.disabled():
        print()
        for label, figures in (("remote-kernel", remote), ("local ipykernel", local)):
            print(f"  {label:16} " + "  ".join(f"{key}={value:.3f}" for key, value in figures.items()))
    assert remote["rtt_median_ms"] < 50

"""Never lose a kernel, never leave one behind (issue 5): real sshd, real kernels, real faults.

The "remote" host is this machine, so remote processes and files are checked directly.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sshd import SSHServer

from remote_kernel.entry import HostEntry, KernelEntry

pytestmark = pytest.mark.timeout(180)

GRACE = 3.0


# ----------------------------------------------------------------------------------- helpers


def write_spec(entry: KernelEntry, interrupt_mode: str = "signal") -> Path:
    """A kernelspec like `sync` writes, in the isolated JUPYTER_DATA_DIR."""
    spec_dir = Path(os.environ["JUPYTER_DATA_DIR"]) / "kernels" / entry.name
    spec_dir.mkdir(parents=True, exist_ok=True)
    spec = {
        "argv": [sys.executable, "-m", "remote_kernel", "-v", "from-spec", str(spec_dir), "-f", "{connection_file}"],
        "display_name": entry.display_name, "language": "python", "interrupt_mode": interrupt_mode,
        "metadata": {"remote_kernel": {"schema": 1, "entry": entry.to_dict()}},
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    return spec_dir


def make_entry(host: HostEntry, python: str, name: str = "resilient", **fields: Any) -> KernelEntry:
    host = HostEntry(**{**host.to_dict(), "proxy_jump": (), "keepalive": 1.0})
    return KernelEntry(name=name, host=host, display_name=name, python=str(python),
                       reconnect_grace=fields.pop("reconnect_grace", GRACE), **fields)


def start_manager(entry: KernelEntry) -> tuple[Any, Any]:
    from jupyter_client import KernelManager

    write_spec(entry)
    km = KernelManager(kernel_name=entry.name)
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=60)
    return km, kc


def run_code(kc: Any, code: str, timeout: float = 30) -> str:
    """Execute code; return its stdout (raises on error or timeout)."""
    chunks: list[str] = []

    def collect(msg: dict[str, Any]) -> None:
        if msg["msg_type"] == "stream":
            chunks.append(msg["content"]["text"])
        elif msg["msg_type"] == "error":
            chunks.append("ERROR " + msg["content"]["ename"])

    reply = kc.execute_interactive(code, output_hook=collect, timeout=timeout)
    assert reply["content"]["status"] == "ok", chunks
    return "".join(chunks)


def kernel_facts(kc: Any) -> dict[str, Any]:
    """The remote kernel's pid, its agent's pid and its private directory."""
    out = run_code(kc, "import os, json, ipykernel\n"
                       "print(json.dumps({'kernel': os.getpid(), 'agent': int(os.environ['JPY_PARENT_PID']),"
                       " 'dir': os.path.dirname(ipykernel.get_connection_file())}))")
    facts: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return facts


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def wait_until(predicate: Any, timeout: float, interval: float = 0.1) -> float:
    """Seconds until predicate() held; fails the test after ``timeout``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(interval)
    pytest.fail(f"condition not met within {timeout} s")


def drop_network(server: SSHServer) -> None:
    """Kill the sshd processes serving established sessions: the launcher's TCP connection dies
    (like a network drop) while the listener stays up for the reconnect."""
    sessions = server.session_pids()
    assert sessions, "no SSH session to drop"
    for pid in sessions:
        os.kill(pid, signal.SIGKILL)


def stop_sshd_leaving_sessions_children(server: SSHServer) -> None:
    """Take the whole server down (listener and sessions) without touching our agent."""
    for pid in server.session_pids():
        os.kill(pid, signal.SIGKILL)
    os.kill(server.pid, signal.SIGKILL)


def launcher_pid(km: Any) -> int:
    pid: int = km.provisioner.process.pid
    return pid


@pytest.fixture
def private_sshd(sshd_factory: Any) -> SSHServer:
    server: SSHServer = sshd_factory()
    return server


@pytest.fixture
def manager(private_sshd: SSHServer, remote_python: str) -> Iterator[tuple[Any, Any, SSHServer]]:
    km, kc = start_manager(make_entry(private_sshd.host_entry(), remote_python))
    try:
        yield km, kc, private_sshd
    finally:
        kc.stop_channels()
        if km.is_alive():
            km.shutdown_kernel(now=True)


# ----------------------------------------------------------------------------------- tests


def test_a_dropped_connection_is_reattached_and_the_kernel_keeps_its_state(manager: Any) -> None:
    km, kc, server = manager
    run_code(kc, "kept = 6 * 7")
    before = kernel_facts(kc)
    drop_network(server)
    started = time.monotonic()
    assert run_code(kc, "print(kept)", timeout=60).strip() == "42"
    reattach_seconds = time.monotonic() - started
    assert kernel_facts(kc)["kernel"] == before["kernel"]
    print(f"\nexecute after a drop answered in {reattach_seconds:.2f} s")


def test_output_printed_during_a_drop_arrives_exactly_once_and_in_order(manager: Any) -> None:
    km, kc, server = manager
    msg_id = kc.execute("import time\nfor i in range(50):\n    print(i, flush=True)\n    time.sleep(0.1)\n")
    time.sleep(1.0)
    drop_network(server)
    text, reply = _collect_until_reply(kc, msg_id, timeout=60)
    assert reply["content"]["status"] == "ok"
    assert [int(line) for line in text.split()] == list(range(50))


def _collect_until_reply(kc: Any, msg_id: str, timeout: float) -> tuple[str, dict[str, Any]]:
    chunks: list[str] = []
    idle = False
    deadline = time.monotonic() + timeout
    while not idle and time.monotonic() < deadline:
        msg = kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "stream":
            chunks.append(msg["content"]["text"])
        idle = msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle"
    reply = kc.get_shell_msg(timeout=max(1.0, deadline - time.monotonic()))
    assert reply["parent_header"]["msg_id"] == msg_id
    return "".join(chunks), reply


def test_a_sigkilled_launcher_leaves_no_kernel_after_the_grace(manager: Any) -> None:
    km, kc, server = manager
    facts = kernel_facts(kc)
    os.kill(launcher_pid(km), signal.SIGKILL)
    reap_seconds = wait_until(
        lambda: not pid_alive(facts["kernel"]) and not pid_alive(facts["agent"]) and not os.path.exists(facts["dir"]),
        timeout=GRACE + 15,
    )
    print(f"\nremote kernel reaped {reap_seconds:.2f} s after the launcher's SIGKILL (grace {GRACE} s)")


def test_an_outage_longer_than_the_grace_reaps_the_kernel_and_the_launcher_says_why(
    private_sshd: SSHServer, remote_python: str, tmp_path: Path
) -> None:
    from jupyter_client import BlockingKernelClient

    spec_dir = write_spec(make_entry(private_sshd.host_entry(), remote_python, name="outage"))
    connection_file = tmp_path / "outage.json"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "remote_kernel", "from-spec", str(spec_dir), "-f", str(connection_file)],
        stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_until(connection_file.exists, timeout=30)
        kc = BlockingKernelClient(connection_file=str(connection_file))
        kc.load_connection_file()
        kc.start_channels()
        kc.wait_for_ready(timeout=60)
        facts = kernel_facts(kc)
        kc.stop_channels()
        stop_sshd_leaving_sessions_children(private_sshd)
        _, stderr = launcher.communicate(timeout=GRACE + 60)
        assert launcher.returncode == 1
        assert "could not reconnect" in stderr and "reconnect_grace" in stderr
        wait_until(lambda: not pid_alive(facts["kernel"]) and not os.path.exists(facts["dir"]), timeout=GRACE + 10)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()


def test_a_killed_remote_kernel_ends_the_launcher_with_the_reason_and_restart_works(manager: Any) -> None:
    km, kc, server = manager
    facts = kernel_facts(kc)
    launcher = km.provisioner.process
    os.kill(facts["kernel"], signal.SIGKILL)
    wait_until(lambda: launcher.poll() is not None, timeout=20)
    assert launcher.returncode == 1
    km.restart_kernel(now=True)
    kc.wait_for_ready(timeout=60)
    assert run_code(kc, "print(1 + 1)").strip() == "2"
    assert kernel_facts(kc)["kernel"] != facts["kernel"]


def test_a_killed_remote_kernel_is_reported_with_its_signal(
    private_sshd: SSHServer, remote_python: str, tmp_path: Path
) -> None:
    from jupyter_client import BlockingKernelClient

    spec_dir = write_spec(make_entry(private_sshd.host_entry(), remote_python, name="victim"))
    connection_file = tmp_path / "victim.json"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "remote_kernel", "from-spec", str(spec_dir), "-f", str(connection_file)],
        stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_until(connection_file.exists, timeout=30)
        kc = BlockingKernelClient(connection_file=str(connection_file))
        kc.load_connection_file()
        kc.start_channels()
        kc.wait_for_ready(timeout=60)
        facts = kernel_facts(kc)
        kc.stop_channels()
        os.kill(facts["kernel"], signal.SIGKILL)
        _, stderr = launcher.communicate(timeout=30)
        assert launcher.returncode == 1
        assert "killed by SIGKILL" in stderr
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()


def test_twenty_start_stop_cycles_leave_nothing_behind(sshd: SSHServer, remote_python: str) -> None:
    runtime = Path(os.environ["JUPYTER_RUNTIME_DIR"])
    entry = make_entry(sshd.host_entry(), remote_python, name="cycles", reconnect_grace=2.0)
    seen: list[dict[str, Any]] = []
    ports: list[int] = []
    for cycle in range(20):
        km, kc = start_manager(entry)
        seen.append(kernel_facts(kc))
        ports += [kc.shell_port, kc.iopub_port, kc.stdin_port, kc.control_port, kc.hb_port]
        kc.stop_channels()
        if cycle % 2:
            os.kill(launcher_pid(km), signal.SIGKILL)
            km.provisioner.process.wait(timeout=10)
            km.cleanup_resources()
        else:
            km.shutdown_kernel()

    def leftovers() -> list[str]:
        alive = [f"pid {pid}" for facts in seen for pid in (facts["kernel"], facts["agent"]) if pid_alive(pid)]
        return alive + [facts["dir"] for facts in seen if os.path.exists(facts["dir"])]

    wait_until(lambda: not leftovers(), timeout=30)
    assert not list(runtime.glob("kernel-*.json"))
    listening = _listening_ports()
    assert not [port for port in ports if port in listening]


def _listening_ports() -> set[int]:
    ports: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A":  # LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_ps_shows_attached_and_orphaned_kernels_and_gc_removes_stale_dirs(
    private_sshd: SSHServer, tmp_path: Path, remote_python: str
) -> None:
    server = private_sshd
    # A lease long enough to outlive the checks below: an orphan inside its lease is left alone.
    km, kc = start_manager(make_entry(server.host_entry(), remote_python, reconnect_grace=120.0))
    try:
        _ps_and_gc(km, kc, server, tmp_path, remote_python)
    finally:
        kc.stop_channels()
        if km.is_alive():
            km.shutdown_kernel(now=True)
        else:
            km.cleanup_resources()


def _ps_and_gc(km: Any, kc: Any, server: SSHServer, tmp_path: Path, remote_python: str) -> None:
    facts = kernel_facts(kc)
    config = tmp_path / "remote-kernels.toml"
    config.write_text(
        f'[hosts.local]\nhostname = "{server.host}"\nport = {server.port}\nuser = "{server.user}"\n'
        f'identity_file = "{server.client_key}"\nknown_hosts = "{server.known_hosts}"\n\n'
        f'[kernels.resilient]\nhost = "local"\npython = "{remote_python}"\nreconnect_grace = 30\n'
    )

    def ps() -> list[dict[str, Any]]:
        out = subprocess.run([sys.executable, "-m", "remote_kernel", "ps", "--json", "--config", str(config)],
                             capture_output=True, text=True, timeout=60, check=True).stdout
        return [row for row in json.loads(out)["kernels"] if row["agent_pid"] == facts["agent"]]

    rows = ps()
    assert rows and rows[0]["state"] == "attached" and rows[0]["kernel_pid"] == facts["kernel"]
    os.kill(launcher_pid(km), signal.SIGKILL)
    wait_until(lambda: ps()[0]["state"] == "orphaned", timeout=15, interval=0.5)
    assert ps()[0]["lease_left"] is not None

    base = Path(facts["dir"]).parent
    stale = base / "k-stale-for-test"
    stale.mkdir(mode=0o700)
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    dry = subprocess.run([sys.executable, "-m", "remote_kernel", "gc", "--dry-run", "--json", "--config", str(config)],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert any(a["dir"] == str(stale) for a in json.loads(dry)["actions"] if a.get("dir"))
    assert stale.exists()
    subprocess.run([sys.executable, "-m", "remote_kernel", "gc", "--config", str(config)],
                   capture_output=True, text=True, timeout=60, check=True)
    assert not stale.exists()
    assert pid_alive(facts["kernel"])  # an orphan inside its lease is left alone
    os.kill(facts["agent"], signal.SIGTERM)  # the agent stops its kernel and cleans up
    wait_until(lambda: not pid_alive(facts["kernel"]) and not os.path.exists(facts["dir"]), timeout=15)

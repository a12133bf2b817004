"""Secrets and private traffic (issue 7, items 2-4): real sshd, real kernels, a real second OS user.

The "remote" host is this machine, so every process (the local launcher, the remote agent and
kernel) is visible to one ``/proc`` scan, and the remote files can be stat'ed directly.

What we prove:
- the HMAC key and the reattach token are on no command line, in no log line (paramiko's debug
  included), in no file that is not 0600 inside a 0700 directory, in no error message;
- the remote kernel has no TCP/UDP socket at all: its five channels are IPC sockets inside a 0700
  directory, so another user on the host can neither list, connect to nor subscribe to them
  (and the same probe run by the owner does read the kernel's output: the probe works);
- every exit path removes the remote files; a squatted or loose base directory is refused;
- a connection file Jupyter wrote 0644 is served as found (with a warning), ours are always 0600.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import secrets
import select
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zmq
from conftest import IsolatedEnv
from jupyter_client.blocking.client import BlockingKernelClient
from launch_helpers import (
    KernelFacts,
    LauncherProcess,
    execute,
    kernel_entry,
    kernel_facts,
    launch_cli,
    pid_alive,
    remote_base_dir,
    remote_leftovers,
    single_kernel_config,
    wait_until,
)
from os_users import OSUser, os_user_fixture, os_users_fixture, run_python_as  # noqa: F401 - fixtures
from sshd import SSHServer, descendants_of

from remote_kernel.connection import owner_of_connection, parse_tcp_table
from remote_kernel.errors import LaunchError

pytestmark = pytest.mark.timeout(180)

HEX64 = re.compile(r"(?<![0-9a-fA-F])[0-9a-fA-F]{64}(?![0-9a-fA-F])")
PRIVATE_DIR, PRIVATE_FILE = 0o700, 0o600
PROBE_SECONDS = 3.0
NAME = "sec"


# ------------------------------------------------------------------------------------ helpers


@dataclass
class RunningKernel:
    launcher: LauncherProcess
    client: BlockingKernelClient
    connection_file: Path
    key: str
    token: str
    state_file: Path
    facts: KernelFacts


def state_dir() -> Path:
    return Path(os.environ["JUPYTER_RUNTIME_DIR"]) / "remote-kernel"


def jupyter_connection_file(path: Path) -> Path:
    """A connection file as a Jupyter client writes one before starting a kernel: free ports and
    a key (launch_helpers' version leaves the key empty, i.e. unsigned messages)."""
    from jupyter_client.connect import write_connection_file

    write_connection_file(str(path), ip="127.0.0.1", transport="tcp", key=secrets.token_hex(32).encode())
    return path


def ready_client(path: Path, launcher: LauncherProcess, timeout: float = 45.0) -> BlockingKernelClient:
    """A client on ``path`` once the kernel answers kernel_info (launcher log in the error if not)."""
    client = BlockingKernelClient(connection_file=str(path))
    client.load_connection_file()
    # A bare client's wait_for_ready calls the kernel dead once one heartbeat goes unanswered for
    # 1 s, and a remote kernel under load takes about that long to start (Jupyter's KernelManager
    # watches the launcher process instead): be patient like it.
    client.hb_channel.time_to_dead = 10.0
    client.start_channels()
    try:
        client.wait_for_ready(timeout=timeout)
    except (RuntimeError, TimeoutError) as exc:
        client.stop_channels()
        raise AssertionError(f"no kernel behind {path} ({exc}); launcher exit {launcher.proc.poll()}:\n"
                             f"{launcher.stderr[-6000:]}") from exc
    return client


def wait_for_file(path: Path, launcher: LauncherProcess, timeout: float = 30.0) -> None:
    if not wait_until(lambda: path.exists() or launcher.proc.poll() is not None, timeout=timeout) \
            or not path.exists():
        raise AssertionError(f"{path} never appeared (launcher exit {launcher.proc.poll()}):\n{launcher.stderr}")


def start_launcher(tmp_path: Path, sshd: SSHServer, python: Path | str, connection_file: Path,
                   **kernel_fields: Any) -> LauncherProcess:
    """`remote-kernel --config C -vvv start sec -f FILE` (-vvv: paramiko's debug log included)."""
    config = single_kernel_config(tmp_path / "remote-kernels.toml", sshd, NAME, python, **kernel_fields)
    return launch_cli(["--config", str(config), "-vvv", "start", NAME, "-f", str(connection_file)],
                      stderr_path=tmp_path / f"launcher-{secrets.token_hex(2)}.log")


@contextlib.contextmanager
def running_kernel(tmp_path: Path, sshd: SSHServer, python: Path | str, *,
                   connection_file: Path | None = None, **kernel_fields: Any) -> Iterator[RunningKernel]:
    """A kernel launched through the CLI with a connection file the launcher creates (unless given)."""
    path = connection_file or tmp_path / "kernel-sec.json"
    launcher = start_launcher(tmp_path, sshd, python, path, **kernel_fields)
    client: BlockingKernelClient | None = None
    try:
        wait_for_file(path, launcher)
        key = json.loads(path.read_text())["key"]
        client = ready_client(path, launcher)
        facts = kernel_facts(client)
        assert wait_until(lambda: any(state_dir().glob("*.json")), timeout=10), launcher.stderr
        state_file = next(state_dir().glob("*.json"))
        token = json.loads(state_file.read_text())["token"]
        yield RunningKernel(launcher, client, path, key, token, state_file, facts)
    finally:
        if client is not None:
            client.stop_channels()
        launcher.stop()


def command_lines() -> dict[int, str]:
    """Every process's argv, exactly as any user can read it (what `ps -eo args` shows)."""
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                    "utf-8", "replace")
    return found


def ps_args() -> str:
    if shutil.which("ps") is None:
        return ""
    return subprocess.run(["ps", "-eww", "-o", "args="], capture_output=True, text=True, timeout=30,
                          check=False).stdout


def our_processes(launcher: LauncherProcess, sshd: SSHServer) -> list[int]:
    """The launcher and everything under it, and the remote side: sshd sessions, agent, kernel."""
    return [launcher.proc.pid, *descendants_of(launcher.proc.pid), sshd.pid, *descendants_of(sshd.pid)]


def files_holding(secret: str, roots: list[Path]) -> set[Path]:
    holders: set[Path] = set()
    needle = secret.encode()
    for root in roots:
        for path in [root, *root.rglob("*")] if root.is_dir() else [root]:
            with contextlib.suppress(OSError):
                if path.is_file() and not path.is_symlink() and needle in path.read_bytes():
                    holders.add(path)
    return holders


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def loose_entries(directory: Path) -> list[str]:
    """Anything in ``directory`` (recursively) that is not a 0700 dir / 0600 file / socket of ours."""
    problems = []
    for path in [directory, *directory.rglob("*")]:
        info = path.lstat()
        expected = PRIVATE_DIR if stat.S_ISDIR(info.st_mode) else PRIVATE_FILE
        if info.st_uid != os.getuid():
            problems.append(f"{path} is owned by uid {info.st_uid}")
        if stat.S_ISSOCK(info.st_mode):
            continue  # a socket's own mode does not matter inside a 0700 directory (checked above it)
        if stat.S_IMODE(info.st_mode) != expected:
            problems.append(f"{path} has mode {stat.S_IMODE(info.st_mode):o}, expected {expected:o}")
    return problems


@pytest.fixture
def private_tmpdir() -> Iterator[Path]:
    """A short TMPDIR for the remote side (socket paths are limited to ~107 bytes), so the agent's
    base directory belongs to this test alone; the kernel sees it through a setup line."""
    path = Path(tempfile.mkdtemp(prefix="rk-sec-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def with_tmpdir(path: Path, *setup: str) -> list[str]:
    return [f"export TMPDIR={shlex.quote(str(path))}", *setup]


# ------------------------------------------------------------------------------------ secret hygiene


def test_no_command_line_holds_the_key_or_the_token_while_a_kernel_runs(
    tmp_path: Path, sshd: SSHServer, remote_python: Path
) -> None:
    with running_kernel(tmp_path, sshd, remote_python) as kernel:
        assert execute(kernel.client, "x = 1").status == "ok"
        ours = our_processes(kernel.launcher, sshd)
        assert {kernel.facts.pid, kernel.facts.agent_pid} <= set(ours), "the remote side was not found"
        everyone = command_lines()
        listing = ps_args()
        environments = {pid: Path(f"/proc/{pid}/environ").read_bytes() for pid in ours if pid_alive(pid)}

    for secret in (kernel.key, kernel.token):
        assert [pid for pid, args in everyone.items() if secret in args] == []
        assert secret not in listing
        assert [pid for pid, env in environments.items() if secret.encode() in env] == []
    # No 64-hex-digit value at all (key- or token-shaped) on any command line of ours.
    assert {pid: HEX64.findall(everyone.get(pid, "")) for pid in ours if HEX64.search(everyone.get(pid, ""))} == {}


def test_the_launcher_log_at_vvv_never_holds_the_key_or_the_token(
    tmp_path: Path, sshd: SSHServer, remote_python: Path
) -> None:
    with running_kernel(tmp_path, sshd, remote_python) as kernel:
        assert execute(kernel.client, "print('hello'); import sys; print('oops', file=sys.stderr)").status == "ok"
        kernel.client.shutdown()
        assert kernel.launcher.wait() == 0
    log = kernel.launcher.stderr
    # -vvv really captured the third-party debug logs (paramiko's key exchange) and ours.
    assert "Kex" in log or "Key exchange" in log, log[-2000:]
    assert "ready in" in log  # the launch got as far as the kernel
    for secret in (kernel.key, kernel.token):
        assert secret not in log
        assert secret not in sshd.log_tail(10_000)


def test_the_key_lives_only_in_0600_files_inside_0700_directories(
    tmp_path: Path, sshd: SSHServer, remote_python: Path, isolated_env: IsolatedEnv
) -> None:
    with running_kernel(tmp_path, sshd, remote_python) as kernel:
        remote_dir = kernel.facts.remote_dir
        base = remote_dir.parent
        assert base == remote_base_dir()
        remote_files = sorted(p.name for p in remote_dir.iterdir())
        problems = loose_entries(remote_dir)
        base_mode, base_uid = mode_of(base), base.lstat().st_uid
        local = {path: mode_of(path) for path in (kernel.connection_file, kernel.state_file)}
        state_dir_mode = mode_of(kernel.state_file.parent)
        roots = [isolated_env.root, remote_dir, *([sshd.remote_home] if sshd.remote_home else [])]
        key_holders = files_holding(kernel.key, roots)
        token_holders = files_holding(kernel.token, roots)

    assert {"kernel.json", "agent.json", "agent.sock", "k-1", "k-2", "k-3", "k-4", "k-5"} <= set(remote_files)
    assert (base_mode, base_uid) == (PRIVATE_DIR, os.getuid())
    assert problems == []
    assert local == {kernel.connection_file: PRIVATE_FILE, kernel.state_file: PRIVATE_FILE}
    assert state_dir_mode == PRIVATE_DIR
    assert key_holders == {kernel.connection_file, remote_dir / "kernel.json"}
    assert token_holders == {kernel.state_file}


def test_a_permissive_umask_loosens_no_file_we_create(
    tmp_path: Path, sshd: SSHServer, remote_python: Path, private_tmpdir: Path
) -> None:
    """umask 000 locally (the launcher) and remotely (a setup line): every mode is explicit."""
    shutil.rmtree(Path(os.environ["JUPYTER_RUNTIME_DIR"]))  # so the launcher creates it, too
    previous = os.umask(0)
    try:
        kernel_cm = running_kernel(tmp_path, sshd, remote_python,
                                   connection_file=tmp_path / "new-dir" / "kernel.json",
                                   setup=with_tmpdir(private_tmpdir, "umask 000"))
        with kernel_cm as kernel:
            remote = loose_entries(kernel.facts.remote_dir.parent)
            local = {p: mode_of(p) for p in (kernel.connection_file, kernel.connection_file.parent,
                                             kernel.state_file, kernel.state_file.parent)}
            kernel_umask = execute(kernel.client, "import os; print(oct(os.umask(0)))").stdout.strip()
    finally:
        os.umask(previous)
    assert kernel_umask == "0o0", "the setup line did not reach the remote shell"
    assert remote == []
    assert local == {kernel.connection_file: PRIVATE_FILE, kernel.connection_file.parent: PRIVATE_DIR,
                     kernel.state_file: PRIVATE_FILE, kernel.state_file.parent: PRIVATE_DIR}


# --- every exit path removes the remote files and shows the key nowhere


def _shutdown_request(kernel: BlockingKernelClient, launcher: LauncherProcess) -> None:
    kernel.shutdown()


def _sigterm_launcher(kernel: BlockingKernelClient, launcher: LauncherProcess) -> None:
    launcher.signal(signal.SIGTERM)


def _kernel_exits(kernel: BlockingKernelClient, launcher: LauncherProcess) -> None:
    kernel.execute("import os; os._exit(3)")


def _sigkill_launcher(kernel: BlockingKernelClient, launcher: LauncherProcess) -> None:
    launcher.signal(signal.SIGKILL)  # the agent's lease (reconnect_grace=1) runs out


ExitPath = Callable[[BlockingKernelClient, LauncherProcess], None]
RUNNING_EXITS: dict[str, tuple[ExitPath, int | None]] = {
    "shutdown_request": (_shutdown_request, 0),
    "SIGTERM to the launcher": (_sigterm_launcher, 0),
    "the kernel exits by itself": (_kernel_exits, 1),
    "the launcher is SIGKILLed": (_sigkill_launcher, -signal.SIGKILL),
}


@pytest.mark.parametrize("how", list(RUNNING_EXITS))
def test_every_exit_of_a_running_kernel_removes_its_remote_files_and_never_shows_the_key(
    how: str, tmp_path: Path, sshd: SSHServer, remote_python: Path, private_tmpdir: Path
) -> None:
    stop, expected_code = RUNNING_EXITS[how]
    connection_file = jupyter_connection_file(tmp_path / "jupyter-kernel.json")
    key = json.loads(connection_file.read_text())["key"]
    launcher = start_launcher(tmp_path, sshd, remote_python, connection_file, reconnect_grace=1,
                              setup=with_tmpdir(private_tmpdir))
    base = private_tmpdir / f"remote-kernel-{os.getuid()}"
    try:
        client = ready_client(connection_file, launcher)
        try:
            facts = kernel_facts(client)
            assert facts.remote_dir.parent == base
            stop(client, launcher)
            code = launcher.wait(timeout=20)
        finally:
            client.stop_channels()
    finally:
        launcher.stop()
    assert code == expected_code, launcher.stderr
    assert wait_until(lambda: not remote_leftovers(facts), timeout=20), remote_leftovers(facts)
    assert list(base.iterdir()) == []
    assert key not in launcher.stderr
    assert connection_file.exists(), "Jupyter's connection file is Jupyter's to remove"


def test_every_failed_start_removes_its_remote_files_and_never_shows_the_key(
    tmp_path: Path, sshd: SSHServer, python_without_ipykernel: Path, remote_python: Path, private_tmpdir: Path
) -> None:
    failures: dict[str, dict[str, Any]] = {
        "no ipykernel": {"python": python_without_ipykernel},
        "startup_timeout": {"python": remote_python, "startup_timeout": 1.5,
                            "command": ["{python}", "-c", "import time; time.sleep(60)"]},
        "a kernel that crashes at once": {"python": remote_python,
                                          "command": ["{python}", "-c", "import sys; sys.exit('boom')"]},
        "a missing cwd": {"python": remote_python, "cwd": str(private_tmpdir / "missing")},
    }
    base = private_tmpdir / f"remote-kernel-{os.getuid()}"
    for index, (what, fields) in enumerate(failures.items()):
        connection_file = jupyter_connection_file(tmp_path / f"kernel-{index}.json")
        key = json.loads(connection_file.read_text())["key"]
        python = fields.pop("python")
        launcher = start_launcher(tmp_path, sshd, python, connection_file, setup=with_tmpdir(private_tmpdir),
                                  **fields)
        try:
            code = launcher.wait(timeout=30)
        finally:
            launcher.stop()
        assert code == 1, f"{what}: {launcher.stderr}"
        assert key not in launcher.stderr, what
        assert not base.exists() or list(base.iterdir()) == [], f"{what}: left {list(base.iterdir())}"


def test_a_launch_error_raised_in_process_holds_no_key_in_message_traceback_or_log(
    tmp_path: Path, sshd: SSHServer, python_without_ipykernel: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from remote_kernel.launcher import Launcher

    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="paramiko")  # its transport debug log, whatever ran before
    connection_file = jupyter_connection_file(tmp_path / "kernel.json")
    key = json.loads(connection_file.read_text())["key"]
    entry = kernel_entry(sshd, python_without_ipykernel, "sec-fail")
    with pytest.raises(LaunchError) as raised:
        Launcher(entry, connection_file).run()
    error = raised.value
    assert "ipykernel" in str(error)
    shown = [str(error), repr(error), error.stderr_tail, error.hint or "",
             "".join(traceback.format_exception(error))]
    shown += [record.getMessage() for record in caplog.records]
    assert any("paramiko" in record.name for record in caplog.records)
    assert [text for text in shown if key in text] == []


# ------------------------------------------------------------------------------------ private traffic


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            match = re.fullmatch(r"socket:\[(\d+)\]", os.readlink(fd))
            if match:
                inodes.add(int(match[1]))
    return inodes


def _inet_sockets(pid: int) -> dict[int, str]:
    """inode -> "tcp6 state 0A" for every TCP/UDP socket in ``pid``'s network namespace."""
    found = {}
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(f"/proc/{pid}/net/{proto}").read_text().splitlines()[1:]:
                fields = line.split()
                found[int(fields[9])] = f"{proto} {fields[1]} state {fields[3]}"
    return found


def _unix_socket_paths() -> dict[int, str]:
    found = {}
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8:
            found[int(fields[6])] = fields[7]
    return found


# ipykernel's own inbound pipe for output from forked subprocesses (iostream.IOPubThread): a ZMQ
# PULL socket it always binds on tcp://127.0.0.1:<random>. It only receives, and drops any message
# that does not start with a random 16-byte token, so nothing the kernel prints can be read from
# it; no kernel channel (shell, iopub, stdin, control, hb) is ever on TCP.
PIPE_PORT_CODE = "import sys; print(getattr(getattr(sys.stdout, 'pub_thread', None), '_pipe_port', None))"


def listening_tcp_ports(pid: int) -> set[int]:
    sockets = _inet_sockets(pid)
    described = [sockets[inode] for inode in _socket_inodes(pid) if inode in sockets]
    return {int(text.split()[1].split(":")[1], 16) for text in described if text.endswith("state 0A")}


def test_no_kernel_channel_is_on_tcp_and_the_agent_has_no_inet_socket(
    tmp_path: Path, sshd: SSHServer, remote_python: Path
) -> None:
    with running_kernel(tmp_path, sshd, remote_python) as kernel:
        facts = kernel.facts
        pipe_port = int(execute(kernel.client, PIPE_PORT_CODE).stdout.strip())
        inet = {}
        for pid in (facts.pid, facts.agent_pid, *descendants_of(facts.pid)):
            sockets = _inet_sockets(pid)
            inet[pid] = sorted(sockets[inode] for inode in _socket_inodes(pid) if inode in sockets)
        unix = _unix_socket_paths()
        kernel_unix = sorted(unix[inode] for inode in _socket_inodes(facts.pid) if inode in unix)
        ss = (subprocess.run(["ss", "-ltnup"], capture_output=True, text=True, timeout=30, check=False).stdout
              if shutil.which("ss") else "")

    # The kernel's five channels are IPC sockets bound in the private directory.
    assert {str(facts.remote_dir / f"k-{n}") for n in range(1, 6)} <= set(kernel_unix)
    # The agent (and anything the kernel started) has no inet socket at all; the kernel has exactly
    # one: ipykernel's subprocess-output pipe, listening on loopback only.
    assert inet.pop(facts.pid) == [f"tcp 0100007F:{pipe_port:04X} state 0A"]
    assert inet == {pid: [] for pid in inet}
    assert f"pid={facts.agent_pid}," not in ss


# --- a second OS user on the same host


OtherUser = OSUser


@pytest.fixture
def intruder(os_users: Callable[..., OSUser]) -> OSUser:
    """A throw-away second OS user who cannot log in (tests/os_users.py; deleted at session end)."""
    return os_users("/usr/sbin/nologin")


def _attempt(results: dict[str, Any], what: str, action: Callable[..., object], *args: Any) -> None:
    try:
        action(*args)
    except OSError as exc:
        results[what] = errno.errorcode.get(exc.errno or 0, str(exc))
    else:
        results[what] = "ALLOWED"


def _unix_connect(path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2.0)
        sock.connect(str(path))


def _read_for(sock: socket.socket, seconds: float) -> bytes:
    received = b""
    deadline = time.monotonic() + seconds
    with contextlib.suppress(OSError):
        while time.monotonic() < deadline:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
    return received


def _subscribe(endpoint: str, seconds: float) -> list[bytes]:
    """Frames a ZMQ SUB receives from ``endpoint`` (nothing is an error: connect is asynchronous)."""
    context = zmq.Context()
    frames: list[bytes] = []
    try:
        sub = context.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(endpoint)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if sub.poll(100):
                frames.extend(sub.recv_multipart())
        sub.close()
    finally:
        context.destroy(linger=0)
    return frames


def _probe(remote_dir: Path, kernel_pid: int, agent_pid: int, tcp_ports: list[int], marker: str,
           ) -> dict[str, Any]:
    """What a local user can do to a running kernel (runs in a child that may have dropped root)."""
    results: dict[str, Any] = {"uid": os.getuid(), "euid": os.geteuid()}
    _attempt(results, "list the base dir", os.listdir, remote_dir.parent)
    _attempt(results, "list the kernel dir", os.listdir, remote_dir)
    _attempt(results, "read kernel.json", (remote_dir / "kernel.json").read_bytes)
    _attempt(results, "read agent.json", (remote_dir / "agent.json").read_bytes)
    for name in ("k-1", "k-2", "k-3", "k-4", "k-5", "agent.sock"):
        _attempt(results, f"connect to {name}", _unix_connect, remote_dir / name)
    _attempt(results, "read the kernel's environ", lambda: Path(f"/proc/{kernel_pid}/environ").read_bytes())
    _attempt(results, "list the kernel's fds", os.listdir, f"/proc/{kernel_pid}/fd")
    _attempt(results, "open the agent's stdin", lambda: Path(f"/proc/{agent_pid}/fd/0").open("rb").close())
    results["kernel cmdline"] = Path(f"/proc/{kernel_pid}/cmdline").read_bytes().decode("utf-8", "replace")
    frames = _subscribe(f"ipc://{remote_dir}/k-2", PROBE_SECONDS)
    for port in tcp_ports:  # ipykernel's subprocess pipe: connectable, but it only receives
        with socket.create_connection(("127.0.0.1", port), timeout=2.0) as sock:
            greeting = _read_for(sock, 1.0)
        results[f"tcp {port}: marker in raw bytes"] = marker.encode() in greeting
        results[f"tcp {port}: SUB frames"] = len(_subscribe(f"tcp://127.0.0.1:{port}", 1.0))
    results["iopub frames received"] = len(frames)
    results["marker seen"] = any(marker.encode() in frame for frame in frames)
    return results


def run_probe_as(user: OtherUser | None, probe: Callable[[], dict[str, Any]], timeout: float = 30.0) -> dict[str, Any]:
    """Run ``probe`` in a forked child, as ``user`` (None: as ourselves, the kernel's owner).

    A fork that drops to the user's uid/gid (no supplementary groups, no inherited descriptors,
    hence no capabilities and nothing of ours) rather than an exec: the interpreter with pyzmq
    may live where another user cannot execute it (a pyenv under /root), and the loaded pyzmq
    is what we want to try with."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(read_end)
            os.closerange(3, write_end)
            os.closerange(write_end + 1, 4096)
            if user is not None:
                os.setgroups([])
                os.setgid(user.gid)
                os.setuid(user.uid)
            payload = json.dumps(probe())
        except BaseException as exc:  # reported to the parent
            payload = json.dumps({"crash": repr(exc)})
        with contextlib.suppress(OSError):
            os.write(write_end, payload.encode())
        os._exit(0)
    os.close(write_end)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([read_end], [], [], 0.2)
            if ready:
                chunk = os.read(read_end, 65536)
                if not chunk:
                    break
                chunks.append(chunk)
        else:
            os.kill(pid, signal.SIGKILL)
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    assert chunks, "the probe produced nothing (timed out?)"
    result: dict[str, Any] = json.loads(b"".join(chunks))
    assert "crash" not in result, result
    return result


def print_forever(marker: str, seconds: float = 30.0) -> str:
    return (f"import time\n_end = time.time() + {seconds}\nwhile time.time() < _end:\n"
            f"    print({marker!r}, flush=True)\n    time.sleep(0.05)\n")


def test_another_user_on_the_host_cannot_reach_or_read_the_kernel(
    tmp_path: Path, sshd: SSHServer, remote_python: Path, intruder: OtherUser
) -> None:
    marker = f"SECRET-{secrets.token_hex(8)}"
    with running_kernel(tmp_path, sshd, remote_python) as kernel:
        facts = kernel.facts
        kernel.client.execute(print_forever(marker))

        tcp_ports = sorted(listening_tcp_ports(facts.pid))

        def probe() -> dict[str, Any]:
            return _probe(facts.remote_dir, facts.pid, facts.agent_pid, tcp_ports, marker)

        owner = run_probe_as(None, probe)
        other = run_probe_as(intruder, probe)
        assert pid_alive(facts.pid)

    # The probe works: the kernel's owner reads the marker straight from the iopub socket.
    assert owner["marker seen"] and owner["iopub frames received"] > 0, owner
    assert owner["connect to k-2"] == "ALLOWED", owner
    # The other user: no entry, no socket, no output, no secrets.
    assert (other["uid"], other["euid"]) == (intruder.uid, intruder.uid)
    attempts = {what: result for what, result in other.items() if isinstance(result, str) and what != "kernel cmdline"}
    assert attempts == dict.fromkeys(attempts, "EACCES"), attempts
    assert (other["iopub frames received"], other["marker seen"]) == (0, False)
    tcp = {what: result for what, result in other.items() if what.startswith("tcp ")}
    assert tcp == {what: (0 if what.endswith("frames") else False) for what in tcp}, tcp
    # What it can see: the kernel's command line (world-readable) names a path, never a secret.
    assert kernel.key not in other["kernel cmdline"] and kernel.token not in other["kernel cmdline"]
    assert not HEX64.search(other["kernel cmdline"])


def test_another_local_user_cannot_subscribe_through_the_launchers_local_ports(
    tmp_path: Path, sshd: SSHServer, remote_python: Path, intruder: OtherUser
) -> None:
    marker = f"SECRET-{secrets.token_hex(8)}"
    with running_kernel(tmp_path, sshd, remote_python) as kernel:
        kernel.client.execute(print_forever(marker))
        port = json.loads(kernel.connection_file.read_text())["iopub_port"]

        def probe() -> dict[str, Any]:
            frames = _subscribe(f"tcp://127.0.0.1:{port}", PROBE_SECONDS)
            return {"marker seen": any(marker.encode() in frame for frame in frames)}

        seen = run_probe_as(intruder, probe)
    assert seen == {"marker seen": False}


# --- a squatted or loose base directory


def _make_loose(base: Path) -> None:
    base.mkdir(mode=0o755)
    base.chmod(0o755)


def _make_world_writable(base: Path) -> None:
    base.mkdir()
    base.chmod(0o1777)


def _make_symlink(base: Path) -> None:
    target = base.with_name("elsewhere")
    target.mkdir(mode=0o700)
    base.symlink_to(target)


def _make_foreign(base: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to create a directory owned by another uid")
    base.mkdir(mode=0o700)
    os.chown(base, 65534, 65534)  # nobody


SQUATS: dict[str, Callable[[Path], None]] = {
    "mode 0755": _make_loose,
    "mode 1777": _make_world_writable,
    "a symlink to a private dir": _make_symlink,
    "owned by another user": _make_foreign,
}


@pytest.mark.parametrize("squat", list(SQUATS))
def test_a_squatted_or_loose_base_directory_is_refused_naming_it(
    squat: str, tmp_path: Path, sshd: SSHServer, remote_python: Path, private_tmpdir: Path
) -> None:
    base = private_tmpdir / f"remote-kernel-{os.getuid()}"
    SQUATS[squat](base)
    connection_file = jupyter_connection_file(tmp_path / "kernel.json")
    launcher = start_launcher(tmp_path, sshd, remote_python, connection_file, setup=with_tmpdir(private_tmpdir))
    try:
        code = launcher.wait(timeout=30)
    finally:
        launcher.stop()
    assert code == 1, launcher.stderr
    assert str(base) in launcher.stderr and "refusing to use it" in launcher.stderr, launcher.stderr
    inside = [] if base.is_symlink() or not base.is_dir() else list(base.iterdir())
    assert inside == [], "nothing may be written into a directory we refused"
    if base.is_symlink():
        assert list(base.resolve().iterdir()) == []


# ------------------------------------------------------------------------------------ connection files


def test_a_world_readable_connection_file_from_jupyter_is_served_as_found_with_a_warning(
    tmp_path: Path, sshd: SSHServer, remote_python: Path
) -> None:
    """Jupyter wrote it (with JUPYTER_ALLOW_INSECURE_WRITES, or a client that does not care): we
    serve it, because refusing would only break the user's kernel; we do not chmod or delete a
    file that is not ours; we warn, since anyone who can read the key can run code in the kernel."""
    connection_file = jupyter_connection_file(tmp_path / "kernel-0644.json")
    connection_file.chmod(0o644)
    before = connection_file.read_bytes()
    with running_kernel(tmp_path, sshd, remote_python, connection_file=connection_file) as kernel:
        assert execute(kernel.client, "print(6 * 7)").stdout.strip() == "42"
        remote_mode = mode_of(kernel.facts.remote_dir / "kernel.json")
        state_mode = mode_of(kernel.state_file)
        kernel.client.shutdown()
        assert kernel.launcher.wait() == 0
    assert (mode_of(connection_file), connection_file.read_bytes()) == (0o644, before)
    assert (remote_mode, state_mode) == (PRIVATE_FILE, PRIVATE_FILE)
    assert re.search(rf"WARNING.*{re.escape(str(connection_file))}.*other users", kernel.launcher.stderr), \
        kernel.launcher.stderr
    assert kernel.key not in kernel.launcher.stderr


# --- the local ports' owner check (issue 16, item 1)

# Captured on x86-64 Linux (little-endian words), with the header line the kernel prints.
TCP_HEADER = ("  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout "
              "inode\n")
TCP6_HEADER = ("  sl  local_address                         remote_address                        st tx_queue "
               "rx_queue tr tm->when retrnsmt   uid  timeout inode\n")


def tcp_row(local: str, remote: str, uid: int, state: str = "01") -> str:
    return f"   0: {local} {remote} {state} 00000000:00000000 00:00000000 00000000 {uid:5d}        0 4242 1 0\n"


OWNER_ROW = tcp_row("0100007F:9C40", "0100007F:1F90", uid=1000)  # 127.0.0.1:40000 -> 127.0.0.1:8080
OTHER_ROW = tcp_row("0200007F:9C40", "0100007F:1F91", uid=1001)  # 127.0.0.2:40000 -> 127.0.0.1:8081
MAPPED_ROW = tcp_row("0000000000000000FFFF00000300007F:9C40", "0000000000000000FFFF00000100007F:1F91", uid=1002)
V6_ROW = tcp_row("00000000000000000000000001000000:9C40", "00000000000000000000000001000000:1F91", uid=1003)


@pytest.mark.parametrize(("tables", "client", "server", "owner"), [
    pytest.param([TCP_HEADER + OWNER_ROW + OTHER_ROW], ("127.0.0.2", 40000), ("127.0.0.1", 8081), 1001,
                 id="the same client port on another address is another user's socket"),
    pytest.param([TCP_HEADER + OTHER_ROW + OWNER_ROW], ("127.0.0.1", 40000), ("127.0.0.1", 8080), 1000,
                 id="row order does not matter"),
    pytest.param([TCP_HEADER + OWNER_ROW, TCP6_HEADER + MAPPED_ROW], ("127.0.0.3", 40000), ("127.0.0.1", 8081),
                 1002, id="a dual-stack client's v4-mapped row in tcp6"),
    pytest.param([TCP_HEADER, TCP6_HEADER + V6_ROW], ("::1", 40000), ("::1", 8081), 1003, id="IPv6 loopback"),
    pytest.param([TCP_HEADER + OWNER_ROW], ("127.0.0.2", 40000), ("127.0.0.1", 8080), None,
                 id="no row with both pairs is unknown"),
    pytest.param([TCP_HEADER + OWNER_ROW + tcp_row("0100007F:9C40", "0100007F:1F90", uid=1001)], ("127.0.0.1", 40000),
                 ("127.0.0.1", 8080), None, id="two matching rows are ambiguous"),
    pytest.param([TCP_HEADER + tcp_row("0100007F:9C40", "0100007F:1F90", uid=0, state="06")],
                 ("127.0.0.1", 40000), ("127.0.0.1", 8080), None, id="a TIME_WAIT leftover owns nothing"),
    pytest.param([TCP_HEADER + "garbage\n   1: XYZ:1 0100007F:1F90 01 0 0 0 7\n" + OWNER_ROW],
                 ("127.0.0.1", 40000), ("127.0.0.1", 8080), 1000, id="unreadable rows are skipped"),
])
def test_the_peer_owner_is_the_one_row_matching_both_address_port_pairs(
    tables: list[str], client: tuple[str, int], server: tuple[str, int], owner: int | None
) -> None:
    assert owner_of_connection(tables, client=client, server=server) == owner


def test_the_tcp_table_parser_decodes_ipv4_ipv6_and_mapped_addresses() -> None:
    rows = parse_tcp_table(TCP6_HEADER + MAPPED_ROW + V6_ROW, byteorder="little")
    assert [(row.local, row.remote, row.uid) for row in rows] == [
        (("127.0.0.3", 40000), ("127.0.0.1", 8081), 1002), (("::1", 40000), ("::1", 8081), 1003)]
    big_endian = tcp_row("7F000001:9C40", "7F000001:1F90", uid=7)
    assert parse_tcp_table(TCP_HEADER + big_endian, byteorder="big")[0].local == ("127.0.0.1", 40000)


ATTACK_TRIES = 20

# Runs as the second user: bind 127.0.0.2..21 (every other try through a dual-stack IPv6 socket,
# whose row is in /proc/net/tcp6) with the owner's client port, connect to the iopub port, and see
# whether the launcher lets the connection through (any byte: the kernel's ZMTP greeting; or the
# connection stays open) or closes it at once.
ATTACK = """
import json, socket, sys
iopub, owner_port, tries = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
verdicts = []
for attempt in range(tries):
    host, v6 = f"127.0.0.{2 + attempt}", attempt % 2 == 1
    sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((f"::ffff:{host}" if v6 else host, owner_port))
    sock.connect(("::ffff:127.0.0.1" if v6 else "127.0.0.1", iopub))
    sock.settimeout(2.0)
    try:
        verdict = f"accepted: read {len(data)} bytes" if (data := sock.recv(64)) else "closed"
    except TimeoutError:
        verdict = "accepted: still connected after 2 s"
    except ConnectionResetError:
        verdict = "closed"
    verdicts.append([host, "tcp6" if v6 else "tcp", verdict])
    sock.close()
print(json.dumps(verdicts))
"""


def _attack_as(user: OSUser, iopub: int, owner_port: int) -> list[list[str]]:
    code = ATTACK.replace("sys.argv[1]", str(iopub)).replace("sys.argv[2]", str(owner_port))
    result = run_python_as(user, code.replace("sys.argv[3]", str(ATTACK_TRIES)), timeout=90)
    assert result.returncode == 0, result.stderr
    verdicts: list[list[str]] = json.loads(result.stdout)
    return verdicts


def _still_open(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


@pytest.mark.slow
def test_another_user_binding_the_owners_client_port_on_another_loopback_address_is_refused(
    tmp_path: Path, sshd: SSHServer, remote_python: Path, os_user: OSUser
) -> None:
    """The attack of issue 16 item 1: the owner reads iopub from 127.0.0.1:Q; another user binds
    127.0.0.X:Q (X = 2..21) and connects to the iopub port. A port-only match found the owner's
    row and let it read every output (7 of 20 tries in the report; every tcp6 try here)."""
    with running_kernel(tmp_path, sshd, remote_python) as kernel:
        kernel.client.execute(print_forever(f"SECRET-{secrets.token_hex(8)}"))
        iopub = json.loads(kernel.connection_file.read_text())["iopub_port"]
        with socket.create_connection(("127.0.0.1", iopub), timeout=5) as owner:
            owner_port = owner.getsockname()[1]
            assert _read_for(owner, 2.0), "the owner's own connection must be served (the probe works)"
            verdicts = _attack_as(os_user, iopub, owner_port)
            assert _still_open(owner), "the owner stays connected"
        assert pid_alive(kernel.facts.pid)
    accepted = [verdict for verdict in verdicts if verdict[2] != "closed"]
    assert (len(verdicts), accepted) == (ATTACK_TRIES, []), f"{len(accepted)} of {len(verdicts)} tries got in"
    # Refusals are logged at most once per 10 s, with a running count (a flood must not flood the log).
    refusals = re.findall(rf"refused a connection to the kernel from uid {os_user.uid}\b", kernel.launcher.stderr)
    assert 1 <= len(refusals) <= 3, kernel.launcher.stderr[-3000:]

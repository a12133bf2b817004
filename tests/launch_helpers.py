"""Helpers for the end-to-end launch tests (test_launch.py, and the resilience/security suites).

Everything here drives the real thing: a config or kernelspec pointing at the sshd fixture, the
real launcher (always a subprocess, as Jupyter runs it), real ipykernel, real jupyter_client. The
"remote" host is this machine, so remote processes and files are checked directly with
os.kill / /proc / the filesystem.

Typical use::

    entry = kernel_entry(sshd, remote_python, "e2e")
    write_spec(entry)
    with started_kernel("e2e") as (km, kc):
        assert execute(kc, "1+1").result == "2"
        facts = kernel_facts(kc)
    assert wait_remote_gone(facts) == []
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w
from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.manager import KernelManager
from sshd import SSHServer

from remote_kernel.entry import HostEntry, KernelEntry

READY_TIMEOUT = 45.0  # start_kernel -> kernel_info reply (a cold ipykernel import takes ~1-2 s)
EXEC_TIMEOUT = 30.0
GONE_TIMEOUT = 15.0  # the agent gives the kernel 3 s between SIGTERM and SIGKILL
TEST_GRACE = 20.0  # reconnect_grace for test kernels: a leaked kernel is reaped soon
CLI = (sys.executable, "-m", "remote_kernel")
EXISTING_LINE = re.compile(r"--existing\s+(\S+)")

# Code run inside the kernel to learn where it lives on the "remote" host.
_FACTS_CODE = """
import json as _j, os as _o, ipykernel as _ik
print(_j.dumps({"pid": _o.getpid(), "agent_pid": int(_o.environ.get("JPY_PARENT_PID") or 0),
                "connection_file": _ik.get_connection_file(), "cwd": _o.getcwd()}))
"""


# ------------------------------------------------------------------------------------ config


def host_table(server: SSHServer, **overrides: Any) -> dict[str, Any]:
    """A ``[hosts.X]`` table reaching ``server`` (explicit key and known_hosts: no ~/.ssh needed)."""
    table: dict[str, Any] = {
        "hostname": server.host,
        "port": server.port,
        "user": server.user,
        "identity_file": str(server.client_key),
        "known_hosts": str(server.known_hosts),
    }
    table.update(overrides)
    return {key: value for key, value in table.items() if value is not None}


def kernel_table(host: str, python: Path | str, **fields: Any) -> dict[str, Any]:
    """A ``[kernels.X]`` table; a short reconnect_grace so a leaked test kernel is reaped soon."""
    table: dict[str, Any] = {"host": host, "python": str(python), "reconnect_grace": TEST_GRACE}
    table.update(fields)
    return {key: value for key, value in table.items() if value is not None}


def write_config(
    path: Path,
    *,
    hosts: Mapping[str, Mapping[str, Any]],
    kernels: Mapping[str, Mapping[str, Any]],
    defaults: Mapping[str, Any] | None = None,
) -> Path:
    document: dict[str, Any] = {}
    if defaults:
        document["defaults"] = dict(defaults)
    document["hosts"] = {name: dict(table) for name, table in hosts.items()}
    document["kernels"] = {name: dict(table) for name, table in kernels.items()}
    path.write_text(tomli_w.dumps(document), encoding="utf-8")
    return path


def single_kernel_config(
    path: Path, server: SSHServer, name: str, python: Path | str, **kernel_fields: Any
) -> Path:
    """A config with one host ``fixture`` (= ``server``) and one kernel ``name`` on it."""
    return write_config(
        path,
        hosts={"fixture": host_table(server)},
        kernels={name: kernel_table("fixture", python, **kernel_fields)},
    )


def kernel_entry(
    server: SSHServer, python: Path | str, name: str, *, host: HostEntry | None = None, **fields: Any
) -> KernelEntry:
    """A resolved entry for ``server``, built without a TOML (what config.py would produce)."""
    fields.setdefault("reconnect_grace", TEST_GRACE)
    if "setup" in fields:
        fields["setup"] = tuple(fields["setup"])
    return KernelEntry(
        name=name,
        host=host or server.host_entry(name="fixture"),
        display_name=fields.pop("display_name", name),
        python=str(python),
        **fields,
    )


# ------------------------------------------------------------------------------------ kernelspecs


def user_kernels_dir() -> Path:
    from jupyter_core.paths import jupyter_data_dir

    return Path(jupyter_data_dir()) / "kernels"


def write_spec(entry: KernelEntry, *, kernels_dir: Path | None = None, config_path: Path | None = None) -> Path:
    """Install ``entry`` as a kernelspec in the format sync writes (without running sync)."""
    spec_dir = (kernels_dir or user_kernels_dir()) / entry.name
    spec_dir.mkdir(parents=True, exist_ok=True)
    # The format of PRODUCT.md "Kernelspecs written by sync", written by hand so these tests do
    # not depend on sync (test_launch checks sync's own output end to end separately).
    document = {
        "argv": [sys.executable, "-m", "remote_kernel", "from-spec", str(spec_dir), "-f", "{connection_file}"],
        "display_name": entry.display_name,
        "language": entry.language,
        "interrupt_mode": entry.interrupt_mode,
        "env": {},
        "metadata": {"remote_kernel": {
            "schema": 1,
            "config": str(config_path or spec_dir / "hand-written.toml"),
            "fingerprint": entry.fingerprint(),
            "entry": entry.to_dict(),
        }},
    }
    (spec_dir / "kernel.json").write_text(json.dumps(document, indent=1), encoding="utf-8")
    return spec_dir


def run_cli(args: Sequence[str], *, timeout: float = 60.0, env: Mapping[str, str] | None = None,
            ) -> subprocess.CompletedProcess[str]:
    """``remote-kernel ARGS`` as a subprocess (the isolated environment is inherited)."""
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=timeout, check=False,
        env=None if env is None else {**os.environ, **env},
    )


def sync(config: Path) -> Path:
    """``remote-kernel --config CONFIG sync``; returns the user kernels dir it wrote into."""
    result = run_cli(["--config", str(config), "sync"])
    assert result.returncode == 0, f"sync failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return user_kernels_dir()


# ------------------------------------------------------------------------------------ kernels


@contextlib.contextmanager
def started_kernel(kernel_name: str, *, ready_timeout: float = READY_TIMEOUT,
                   ) -> Iterator[tuple[KernelManager, BlockingKernelClient]]:
    """A started KernelManager and its ready client; always shut down (and waited for) at the end."""
    km = KernelManager(kernel_name=kernel_name)
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=ready_timeout)
        yield km, kc
    finally:
        kc.stop_channels()
        stop_kernel_manager(km)


def stop_kernel_manager(km: KernelManager) -> None:
    """Shut ``km`` down if a kernel is still running (bounded: jupyter_client kills after 5 s)."""
    with contextlib.suppress(Exception):
        if km.has_kernel:
            km.shutdown_kernel(now=False)


def connect_client(connection_file: Path, *, ready_timeout: float = READY_TIMEOUT,
                   launcher: LauncherProcess | None = None) -> BlockingKernelClient:
    """A BlockingKernelClient on a connection file, ready (kernel_info answered).

    A client without a KernelManager decides "the kernel died" when the first heartbeat is not
    answered within 1 s of connecting (jupyter_client), so a kernel that is still starting (two
    SSH hops, a loaded machine) is retried until ``ready_timeout``; if ``launcher`` exits
    meanwhile, that is the error, with its stderr.
    """
    deadline = time.monotonic() + ready_timeout
    while True:
        kc = BlockingKernelClient(connection_file=str(connection_file))
        kc.load_connection_file()
        kc.start_channels()
        try:
            kc.wait_for_ready(timeout=max(1.0, deadline - time.monotonic()))
        except RuntimeError:
            kc.stop_channels()
            if launcher is not None and launcher.proc.poll() is not None:
                raise AssertionError(f"the launcher exited ({launcher.proc.returncode}):\n{launcher.stderr}") from None
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.2)
            continue
        except BaseException:
            kc.stop_channels()
            raise
        return kc


def jupyter_connection_file(path: Path) -> Path:
    """A connection file as Jupyter writes one before launching a kernel (free ports, a key)."""
    from jupyter_client.connect import write_connection_file

    write_connection_file(str(path), ip="127.0.0.1", transport="tcp")
    return path


@dataclass
class Execution:
    """What one execute_request produced, as seen on the client that sent it."""

    status: str
    stdout: str = ""
    stderr: str = ""
    result: str | None = None  # text/plain of execute_result
    ename: str | None = None
    evalue: str | None = None
    messages: list[dict[str, Any]] = field(default_factory=list)


def execute(kc: BlockingKernelClient, code: str, *, timeout: float = EXEC_TIMEOUT) -> Execution:
    """Run ``code`` and collect its output and reply (bounded by ``timeout``)."""
    msg_id = kc.execute(code)
    return collect(kc, msg_id, timeout=timeout)


def collect(kc: BlockingKernelClient, msg_id: str, *, timeout: float = EXEC_TIMEOUT) -> Execution:
    """Read iopub until the request's ``idle`` and the shell reply for ``msg_id``."""
    deadline = time.monotonic() + timeout
    execution = Execution(status="")
    out: list[str] = []
    err: list[str] = []
    idle = False
    while not idle:
        msg = _next(kc.get_iopub_msg, deadline, f"iopub of {msg_id}", execution)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        execution.messages.append(msg)
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream":
            (out if content["name"] == "stdout" else err).append(content["text"])
        elif kind == "execute_result":
            execution.result = content["data"].get("text/plain")
        elif kind == "error":
            execution.ename, execution.evalue = content["ename"], content["evalue"]
        elif kind == "status" and content["execution_state"] == "idle":
            idle = True
    while True:
        reply = _next(kc.get_shell_msg, deadline, f"execute_reply of {msg_id}", execution)
        if reply["parent_header"].get("msg_id") == msg_id:
            break
    execution.status = reply["content"]["status"]
    execution.stdout, execution.stderr = "".join(out), "".join(err)
    return execution


def _next(get: Any, deadline: float, what: str, so_far: Execution) -> dict[str, Any]:
    """One message from ``get`` before ``deadline``; a timeout says what had arrived."""
    try:
        msg: dict[str, Any] = get(timeout=_left(deadline, what))
    except queue.Empty:
        seen = [(m["msg_type"], m["content"].get("execution_state") or m["content"].get("name"))
                for m in so_far.messages]
        raise TimeoutError(f"timed out waiting for {what}; seen so far: {seen}") from None
    return msg


def _left(deadline: float, what: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError(f"timed out waiting for {what}")
    return left


def interrupted_cell(km: Any, kc: BlockingKernelClient, *, timeout: float = 10.0) -> Execution:
    """A cell that prints, then sleeps 60 s, interrupted through ``km`` once it runs: its
    Execution (``ename`` is "KeyboardInterrupt" when the interrupt reached the kernel)."""
    msg_id = kc.execute("import time; print('sleeping', flush=True); time.sleep(60)")
    wait_for_stream(kc, msg_id, timeout=timeout)
    km.interrupt_kernel()
    return collect(kc, msg_id, timeout=timeout)


def wait_for_stream(kc: BlockingKernelClient, msg_id: str, *, timeout: float = EXEC_TIMEOUT) -> str:
    """The first stdout text the request ``msg_id`` prints (e.g. "started" before a sleep)."""
    deadline = time.monotonic() + timeout
    while True:
        msg = kc.get_iopub_msg(timeout=_left(deadline, f"output of {msg_id}"))
        if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "stream":
            return str(msg["content"]["text"])


def wait_for_iopub_text(kc: BlockingKernelClient, text: str, *, timeout: float = EXEC_TIMEOUT) -> dict[str, Any]:
    """The first iopub ``stream`` message containing ``text``, whoever's request printed it."""
    deadline = time.monotonic() + timeout
    while True:
        msg = kc.get_iopub_msg(timeout=_left(deadline, f"iopub output {text!r}"))
        if msg["msg_type"] == "stream" and text in msg["content"]["text"]:
            return msg


# ------------------------------------------------------------------------------------ the remote side


@dataclass(frozen=True)
class KernelFacts:
    """Where a remote kernel lives, told by the kernel itself."""

    pid: int
    agent_pid: int
    connection_file: Path
    cwd: str

    @property
    def remote_dir(self) -> Path:
        """The agent's private k-XXXX directory under /tmp/remote-kernel-<uid>/."""
        return self.connection_file.parent


def kernel_facts(kc: BlockingKernelClient) -> KernelFacts:
    execution = execute(kc, _FACTS_CODE)
    assert execution.status == "ok", execution
    data = json.loads(execution.stdout.strip().splitlines()[-1])
    return KernelFacts(pid=data["pid"], agent_pid=data["agent_pid"],
                       connection_file=Path(data["connection_file"]), cwd=data["cwd"])


def pid_alive(pid: int) -> bool:
    """Is ``pid`` a live process (zombies count as gone)?"""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def remote_leftovers(facts: KernelFacts) -> list[str]:
    """What of this kernel still exists on the "remote" host: processes and files."""
    left = [f"{what} pid {pid}" for what, pid in (("kernel", facts.pid), ("agent", facts.agent_pid))
            if pid_alive(pid)]
    if facts.remote_dir.exists():
        left.append(f"directory {facts.remote_dir} ({sorted(p.name for p in facts.remote_dir.iterdir())})")
    return left


def wait_until(predicate: Any, *, timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` passes; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return bool(predicate())
        time.sleep(interval)


def restarted(km: Any, kc: BlockingKernelClient, *, now: bool) -> tuple[KernelFacts, KernelFacts]:
    """Set a variable, restart through ``km`` (``now``: SIGKILL the launcher, as Jupyter's
    "restart now" does), wait until ready: the kernel's facts (before, after)."""
    execute(kc, "state = 42")
    before = kernel_facts(kc)
    km.restart_kernel(now=now)
    kc.wait_for_ready(timeout=45)
    return before, kernel_facts(kc)


def wait_remote_gone(facts: KernelFacts, *, timeout: float = GONE_TIMEOUT) -> list[str]:
    """Wait until nothing of the kernel is left remotely; returns what is still there."""
    wait_until(lambda: not remote_leftovers(facts), timeout=timeout)
    return remote_leftovers(facts)


def remote_base_dir() -> Path:
    """Where the agent makes its k-XXXX directories (the sshd login has no TMPDIR: /tmp)."""
    return Path("/tmp") / f"remote-kernel-{os.getuid()}"


def remote_agents() -> list[dict[str, Any]]:
    """Every k-XXXX directory of this uid with its agent.json (``{}`` if unreadable) and whether
    its agent and kernel are alive. Other tests (and other people's runs) share the base dir:
    select by ``dir`` or pid rather than asserting on the whole list."""
    base = remote_base_dir()
    found: list[dict[str, Any]] = []
    for path in sorted(base.glob("k-*")) if base.is_dir() else []:
        record: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            record = json.loads((path / "agent.json").read_text())
        record["dir"] = path
        record["agent_alive"] = pid_alive(int(record.get("agent_pid") or 0))
        record["kernel_alive"] = pid_alive(int(record.get("kernel_pid") or 0))
        found.append(record)
    return found


# ------------------------------------------------------------------------------------ CLI launchers


@dataclass
class LauncherProcess:
    """A `remote-kernel start|from-spec|-t` subprocess; stdout is read by a thread, stderr goes to a file."""

    proc: subprocess.Popen[str]
    stderr_path: Path
    lines: queue.Queue[str]
    stdout: list[str] = field(default_factory=list)

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait_for_line(self, pattern: re.Pattern[str], *, timeout: float = READY_TIMEOUT) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or (self.proc.poll() is not None and self.lines.empty()):
                raise AssertionError(f"no line matching {pattern.pattern!r} on stdout (exit {self.proc.poll()}):\n"
                                     f"stdout: {''.join(self.stdout)}\nstderr: {self.stderr}")
            try:
                line = self.lines.get(timeout=min(left, 0.2))
            except queue.Empty:
                continue
            match = pattern.search(line)
            if match:
                return match

    def signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)

    def wait(self, timeout: float = GONE_TIMEOUT) -> int:
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not exit (cleanup in a finally)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=GONE_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


def launch_cli(args: Sequence[str], *, stderr_path: Path) -> LauncherProcess:
    """Start ``remote-kernel ARGS`` in the background (in its own session, as Jupyter does)."""
    stderr_file = stderr_path.open("w")
    try:
        proc = subprocess.Popen(
            [*CLI, *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr_file,
            text=True, start_new_session=True,
        )
    finally:
        stderr_file.close()
    lines: queue.Queue[str] = queue.Queue()
    launched = LauncherProcess(proc=proc, stderr_path=stderr_path, lines=lines)

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            launched.stdout.append(line)
            lines.put(line)

    threading.Thread(target=pump, daemon=True, name="launcher-stdout").start()
    return launched


@contextlib.contextmanager
def launched_cli(args: Sequence[str], *, stderr_path: Path) -> Iterator[LauncherProcess]:
    launched = launch_cli(args, stderr_path=stderr_path)
    try:
        yield launched
    finally:
        launched.stop()


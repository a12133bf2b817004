"""`ps` and `gc`: what our agents are doing on each host, and cleaning up after the dead.

Each host is asked once, over one SSH exec that runs the same agent code in ``list`` or ``gc``
mode (nothing installed remotely). The agent checks a PID is still one of ours (the bootstrap
marker in its argv) before it signals it. Locally, ``gc`` removes connection files we wrote
whose ports nobody serves any more, and restart records of dead launchers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from remote_kernel import bootstrap
from remote_kernel.entry import DEFAULT_PYTHON, HostEntry, KernelEntry
from remote_kernel.errors import RemoteKernelError

log = logging.getLogger(__name__)
READ_TIMEOUT = 30.0


@dataclass(frozen=True)
class HostTarget:
    """A host to inspect and the python to run the agent code with there."""

    host: HostEntry
    python: str


def targets_from_entries(entries: list[KernelEntry], hosts: list[HostEntry], only: str | None) -> list[HostTarget]:
    """One target per distinct host (by label), the python of its first kernel entry."""
    found: dict[str, HostTarget] = {}
    for entry in entries:
        found.setdefault(entry.host.label, HostTarget(entry.host, entry.python))
    for host in hosts:
        found.setdefault(host.label, HostTarget(host, DEFAULT_PYTHON))
    selected = [t for t in found.values() if only is None or only in (t.host.name, t.host.label, t.host.hostname)]
    if only is not None and not selected:
        from remote_kernel.errors import UsageError
        from remote_kernel.suggest import did_you_mean

        names = {name for t in found.values() for name in (t.host.name, t.host.hostname) if name}
        guess = did_you_mean(only, names)
        raise UsageError(f"no host {only!r} in the config{'; ' + guess if guess else ''} "
                         f"(known: {', '.join(sorted(names)) or 'none'})",
                         hint="use a [hosts] name or a kernel's host")
    return selected


def ask_host(target: HostTarget, request: dict[str, Any]) -> dict[str, Any]:
    """Run the agent in ``request["mode"]`` on the host and return its JSON answer."""
    from remote_kernel import ssh

    entry = KernelEntry(name="inventory", host=target.host, display_name="", python=target.python)
    with ssh.connect(target.host) as conn:
        command = bootstrap.remote_command(entry, payload_size=len(bootstrap.agent_payload()), with_cwd=False)
        channel = conn.open_exec(command.exec)
        channel.sendall(command.script + bootstrap.agent_input(request))
        stdout, stderr = _read_all(channel)
    try:
        answer: dict[str, Any] = json.loads(stdout.decode())
    except ValueError as exc:
        raise RemoteKernelError(f"{target.host.label}: unexpected answer from the remote side: "
                                f"{(stderr or stdout).decode(errors='replace').strip()[-500:]}") from exc
    return answer


def _read_all(channel: Any) -> tuple[bytes, bytes]:
    out, err = bytearray(), bytearray()
    deadline = time.monotonic() + READ_TIMEOUT
    while time.monotonic() < deadline:
        while channel.recv_stderr_ready():
            err += channel.recv_stderr(65536)
        chunk = channel.recv(65536)
        if not chunk:
            break
        out += chunk
    while channel.recv_stderr_ready():
        err += channel.recv_stderr(65536)
    return bytes(out), bytes(err)


def describe_agents(target: HostTarget, answer: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows for `ps`: entry, pids, age, attached/orphaned/stale, lease left."""
    now = float(answer.get("now", time.time()))
    rows = []
    for agent in answer.get("agents", []):
        state, lease_left = _agent_state(agent, now)
        rows.append({
            "host": target.host.label, "name": agent.get("name"), "agent_pid": agent.get("agent_pid"),
            "kernel_pid": agent.get("kernel_pid"), "age": _age(agent, now), "state": state,
            "lease_left": lease_left, "dir": agent.get("dir"),
        })
    return rows


def _agent_state(agent: dict[str, Any], now: float) -> tuple[str, float | None]:
    if not agent.get("alive"):
        return "stale", None
    if agent.get("attached"):
        return "attached", None
    detached = agent.get("detached_at")
    if detached is None:
        return "orphaned", None
    return "orphaned", max(0.0, float(agent.get("grace", 0)) - (now - float(detached)))


def _age(agent: dict[str, Any], now: float) -> float | None:
    started = agent.get("started")
    return None if started is None else max(0.0, now - float(started))


def local_garbage(runtime_dir: Path, dry_run: bool) -> list[dict[str, str]]:
    """Our connection files nobody serves any more, and restart records of dead launchers."""
    from remote_kernel.connection import is_live

    actions = []
    for path in sorted(runtime_dir.glob("kernel-*@*.json")):
        if not is_live(path):
            actions.append({"action": "remove-connection-file", "path": str(path)})
            if not dry_run:
                with contextlib.suppress(OSError):
                    path.unlink()
    for path in sorted((runtime_dir / "remote-kernel").glob("*.json")):
        if not _record_is_live(path):
            actions.append({"action": "remove-restart-record", "path": str(path)})
            if not dry_run:
                with contextlib.suppress(OSError):
                    path.unlink()
    return actions


def _record_is_live(path: Path) -> bool:
    """A restart record (launcher.py) whose launcher still runs."""
    from remote_kernel.launcher import pid_alive

    try:
        return pid_alive(int(json.loads(path.read_text(encoding="utf-8"))["pid"]))
    except (OSError, ValueError, KeyError, TypeError):
        return False

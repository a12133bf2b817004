"""`ps` and `gc`: what our agents are doing on each host, and cleaning up after the dead.

Each host is asked once, over one SSH exec that runs the same agent code in ``list`` or ``gc``
mode (nothing installed remotely). The agent checks a PID is still one of ours (the bootstrap
marker in its argv) before it signals it. For a host with Slurm kernels the same exec asks
squeue for our jobs (named rk-*): ``ps`` shows their id, state, node and time left, ``gc`` cancels
those nothing will use again (remote/agent.py job_actions). Locally, ``gc`` removes connection
files we wrote whose ports nobody serves any more, and restart records of dead launchers, and
tells each host which of its queued jobs lost their launcher (backends/slurm.py save_queued_job).

When the per-user service runs and holds a connection to a host, the query rides it (no new
login: a host that asks for a one-time code is asked nothing); otherwise the command connects.

All hosts are asked at once, each on a thread of its own: a host that accepts TCP and never
speaks SSH costs the whole command one connect timeout, not one per host (issue 12, item 5).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from remote_kernel.backends import backend_for
from remote_kernel.entry import DEFAULT_PYTHON, HostEntry, KernelEntry
from remote_kernel.errors import RemoteKernelError

log = logging.getLogger(__name__)
CONNECT_TIMEOUT = 15.0  # ssh.connect's per-step bound: a silent host fails after this
READ_TIMEOUT = 10.0  # the agent answers list/gc in well under a second once it runs
# The whole query, all hosts together: a host that connected but hangs (a login shell stuck in
# its rc files, a hung NFS home) is reported as not answering rather than holding the command.
QUERY_DEADLINE = CONNECT_TIMEOUT + READ_TIMEOUT


@dataclass(frozen=True)
class HostTarget:
    """A host to inspect and the python to run the agent code with there."""

    host: HostEntry
    python: str
    runtime_dirs: tuple[str, ...] = ()  # every runtime_dir its entries name (the agent looks there too)
    slurm: bool = False  # an entry of this host runs in Slurm jobs: ask squeue too
    abandoned_jobs: tuple[str, ...] = ()  # gc: queued jobs whose launcher died (cancelled if still PENDING)

    def to_dict(self) -> dict[str, Any]:
        return {"host": self.host.to_dict(), "python": self.python, "runtime_dirs": list(self.runtime_dirs),
                "slurm": self.slurm, "abandoned_jobs": list(self.abandoned_jobs)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HostTarget:
        return cls(HostEntry.from_dict(data["host"]), str(data["python"]), tuple(data.get("runtime_dirs") or ()),
                   bool(data.get("slurm")), tuple(str(job) for job in data.get("abandoned_jobs") or ()))

    def request(self, request: dict[str, Any]) -> dict[str, Any]:
        """What the agent is asked on this host."""
        extra = {"slurm": True, "abandoned_jobs": list(self.abandoned_jobs)} if self.slurm else {}
        return {**request, "runtime_dir": list(self.runtime_dirs), **extra}


def targets_from_entries(entries: list[KernelEntry], hosts: list[HostEntry], only: str | None) -> list[HostTarget]:
    """One target per distinct host (by label), the python of its first kernel entry."""
    found: dict[str, HostTarget] = {}
    for entry in entries:
        target = found.setdefault(entry.host.label, HostTarget(entry.host, entry.python))
        if entry.runtime_dir and entry.runtime_dir not in target.runtime_dirs:
            target = dataclasses.replace(target, runtime_dirs=(*target.runtime_dirs, entry.runtime_dir))
        found[entry.host.label] = dataclasses.replace(target, slurm=target.slurm or entry.slurm is not None)
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


@dataclass(eq=False)  # identity hash: a key of the threads that fill it in
class HostAnswer:
    """One host's answer to a query, or why there is none (a one-line reason, no traceback)."""

    target: HostTarget
    answer: dict[str, Any] | None = None
    error: str | None = None


def ask_hosts(targets: list[HostTarget], request: dict[str, Any]) -> list[HostAnswer]:
    """Ask every host at once; answers in the order of ``targets``, within QUERY_DEADLINE."""
    answers = [HostAnswer(target) for target in targets]
    silence_paramiko()
    threads = {answer: threading.Thread(target=_ask_into, args=(answer, request, resolved), daemon=True,
                                        name=f"rk-ask-{answer.target.host.name}")
               for answer, resolved in zip(answers, _resolve_all(answers), strict=True) if resolved is not None}
    for thread in threads.values():
        thread.start()
    deadline = time.monotonic() + QUERY_DEADLINE
    for thread in threads.values():  # daemon threads: one that never returns cannot hold the exit
        thread.join(max(0.0, deadline - time.monotonic()))
    for answer, thread in threads.items():
        if thread.is_alive():
            answer.error = f"no answer within {QUERY_DEADLINE:g} s (connected, but the remote side did not reply)"
    return answers


def _ask_into(slot: HostAnswer, request: dict[str, Any], resolved: Any) -> None:
    try:
        slot.answer = ask_host(slot.target, request, resolved=resolved)
    except RemoteKernelError as exc:
        slot.error = _one_line(exc)
    except Exception as exc:  # a bug: said in one line here, the traceback with -vv
        log.debug("asking %s failed", slot.target.host.label, exc_info=True)
        slot.error = f"unexpected {type(exc).__name__}: {exc} (a bug in remote-kernel; -vv shows where)"


def _one_line(exc: RemoteKernelError) -> str:
    return f"{exc.message} (hint: {exc.hint})" if exc.hint else exc.message


def _resolve_all(answers: list[HostAnswer]) -> list[Any]:
    """Resolve every host here, before the threads: paramiko is imported on first use, and two
    threads importing it at once see a half-initialised module. A host that cannot be resolved
    (a bad ~/.ssh/config) is a failure of that host only."""
    from remote_kernel import ssh

    resolved: list[Any] = []
    for answer in answers:
        try:
            resolved.append(ssh.resolve_host(answer.target.host))
        except RemoteKernelError as exc:
            answer.error = _one_line(exc)
            resolved.append(None)
    return resolved


def silence_paramiko() -> None:
    """paramiko's transport thread logs a failed handshake as ~20 ERROR lines of traceback; our
    SSHError already says what happened in one line. For the rest of the command, not just the
    query: a failed connection's transport thread may log after we gave up on it (its socket was
    closed under it). Still shown with -vvv (paramiko at DEBUG)."""
    logger = logging.getLogger("paramiko")
    if logger.getEffectiveLevel() > logging.DEBUG:
        logger.setLevel(logging.CRITICAL + 1)


def ask_host(target: HostTarget, request: dict[str, Any], *, resolved: Any = None) -> dict[str, Any]:
    """Run the agent in ``request["mode"]`` on the host (``resolved``: the host as
    ssh.resolve_host gave it, if done already) and return its JSON answer: over the per-user
    service's connection to the host if it holds one, else over a connection of our own."""
    answer = ask_through_service(target, request)
    if answer is not None:
        return answer
    from remote_kernel import ssh

    with ssh.connect(resolved or target.host, timeout=CONNECT_TIMEOUT) as conn:
        return query_connection(conn, target, request)


def ask_through_service(target: HostTarget, request: dict[str, Any]) -> dict[str, Any] | None:
    """The service's answer, or None when it does not run or holds no connection to the host
    (ps/gc never start it: there would be no connection in it to use)."""
    from remote_kernel.service import client

    try:
        reply = client.request("query", target=target.to_dict(), request=request)
    except client.ServiceUnavailable:
        return None
    if reply.get("event") == "error" and not str(reply.get("message")).startswith("unknown request"):
        client.raise_error(reply)  # (an older service, started before an upgrade, knows no "query")
    answer = reply.get("answer") if reply.get("event") == "answer" else None
    if answer is not None:
        log.debug("asked %s over the service's connection", target.host.label)
    return answer if isinstance(answer, dict) else None


def query_connection(connection: Any, target: HostTarget, request: dict[str, Any]) -> dict[str, Any]:
    """Run the agent's query on an authenticated connection (ours, or the service's)."""
    entry = KernelEntry(name="inventory", host=target.host, display_name="", python=target.python)
    channel = backend_for(entry).query(connection, entry, target.request(request))
    try:
        stdout, stderr = _read_all(channel)
    finally:
        channel.close()
    try:
        answer: dict[str, Any] = json.loads(stdout.decode())
    except ValueError as exc:
        raise RemoteKernelError(f"unexpected answer from the remote side: "
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


def describe_agents(answers: list[HostAnswer]) -> list[dict[str, Any]]:
    """Rows for `ps`: entry, pids, age, attached/orphaned/stale, lease left, and for a kernel in
    a Slurm job the job (id, state, node, time left); one row per kernel with every configured
    host that reaches it (two aliases of one account list it twice). A job of ours whose kernel
    is not visible from the login node (queued, or on the compute node's own disk) is a row too."""
    rows: dict[tuple[Any, ...], dict[str, Any]] = {}
    for answer in answers:
        for key, row in _host_rows(answer.answer or {}):
            rows.setdefault(key, row)["hosts"].append(answer.target.host.label)
    for row in rows.values():
        row["host"] = ", ".join(row["hosts"])
    return list(rows.values())


def _host_rows(answer: dict[str, Any]) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
    now = float(answer.get("now", time.time()))
    jobs = {str(job.get("id")): job for job in (answer.get("slurm") or {}).get("jobs", [])}
    agents = [agent for agent in answer.get("agents", []) if agent.get("kind") != JOB_KIND]
    rows = [(kernel_identity(agent), _agent_row(agent, now, jobs.get(str(agent.get("job_id") or ""))))
            for agent in agents]
    shown = {str(agent.get("job_id")) for agent in agents if agent.get("job_id")}
    rows += [(("job", job_id, job.get("name")), _job_row(job)) for job_id, job in jobs.items() if job_id not in shown]
    return rows


JOB_KIND = "job"  # remote/agent.py JOB_KIND: a job's own directory, not a kernel


def slurm_failures(answers: list[HostAnswer]) -> list[dict[str, str]]:
    """Hosts whose squeue could not be asked (the kernels' rows are there, their jobs are not)."""
    return [{"host": a.target.host.label, "error": f"cannot ask Slurm: {(a.answer or {})['slurm']['error']}"}
            for a in answers if ((a.answer or {}).get("slurm") or {}).get("error")]


def kernel_identity(agent: dict[str, Any]) -> tuple[Any, ...]:
    """One kernel on one machine, whichever alias reached it: its directory's name is random
    (k-<32 random bits> under /tmp/remote-kernel-<uid>), and with the agent's PID and start time
    it names a single kernel without asking the host for an identity of its own."""
    return agent.get("dir"), agent.get("agent_pid"), agent.get("started")


def _agent_row(agent: dict[str, Any], now: float, job: dict[str, Any] | None = None) -> dict[str, Any]:
    state, lease_left = _agent_state(agent, now)
    return {
        "host": "", "hosts": [], "name": agent.get("name"), "agent_pid": agent.get("agent_pid"),
        "kernel_pid": agent.get("kernel_pid"), "age": _age(agent, now), "state": state,
        "lease_left": lease_left, "dir": agent.get("dir"), "job": _job_fields(job, agent.get("job_id")),
    }


def _job_row(job: dict[str, Any]) -> dict[str, Any]:
    """A job of ours with no kernel visible here: queued, or its kernel on the node's own disk."""
    name = str(job.get("name") or "")
    entry = name[len("rk-"):].rsplit("-", 1)[0] if name.startswith("rk-") else name
    return {"host": "", "hosts": [], "name": entry, "agent_pid": None, "kernel_pid": None, "age": None,
            "state": "queued" if job.get("state") == "PENDING" else "in job", "lease_left": None, "dir": None,
            "job": _job_fields(job, job.get("id"))}


def _job_fields(job: dict[str, Any] | None, job_id: Any) -> dict[str, Any] | None:
    """The --json form of a row's job (None: not a Slurm kernel); a job squeue no longer lists
    (it ended) keeps its id with state "ENDED"."""
    if not job_id:
        return None
    job = job or {"id": job_id, "state": "ENDED"}
    return {"id": str(job.get("id")), "name": job.get("name"), "state": job.get("state"),
            "node": job.get("node") or None, "time_left": job.get("left") or None, "reason": job.get("reason") or None}


def gc_actions(answers: list[HostAnswer]) -> list[dict[str, Any]]:
    """The remote `gc` actions, each once (two aliases of one account run gc on the same files)."""
    actions: dict[tuple[Any, ...], dict[str, Any]] = {}
    for answer in answers:
        for action in (answer.answer or {}).get("actions", []):
            key = (action.get("action"), action.get("dir"), action.get("agent_pid"), action.get("job_id"))
            actions.setdefault(key, {"host": "", "hosts": [], **action})["hosts"].append(answer.target.host.label)
    for action in actions.values():
        action["host"] = ", ".join(action["hosts"])
    return list(actions.values())


def _agent_state(agent: dict[str, Any], now: float) -> tuple[str, float | None]:
    if agent.get("alive") is False:  # None: on another node (a Slurm job's, on a shared disk)
        return "stale", None
    if agent.get("state") == "spare":  # started ahead by the service for the entry's next start
        return "spare", None
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
    """Our connection files nobody serves any more, restart records of dead launchers, and the
    records of Slurm jobs that ended longer ago than they refuse a resubmit."""
    from remote_kernel.backends.slurm import expired_end_records
    from remote_kernel.connection import is_live

    actions = []
    for path in sorted(runtime_dir.glob("kernel-*@*.json")):
        if not is_live(path):
            actions.append({"action": "remove-connection-file", "path": str(path)})
            if not dry_run:
                with contextlib.suppress(OSError):
                    path.unlink()
    for path in sorted((runtime_dir / "remote-kernel").glob("*.json")):
        if path.name.startswith("slurm-"):  # Slurm's own records: their rules are in backends/slurm.py
            continue
        if not _record_is_live(path):
            actions.append({"action": "remove-restart-record", "path": str(path)})
            if not dry_run:
                with contextlib.suppress(OSError):
                    path.unlink()
    for path in expired_end_records(runtime_dir):
        actions.append({"action": "remove-ended-job-record", "path": str(path)})
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

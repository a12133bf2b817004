"""Kernels inside Slurm jobs: the second backend (issue 17).

The agent and the kernel live in an ``sbatch`` job; nothing needs SSH to the compute node, TCP
forwarding or a port on the node's network. Over the one SSH connection to the login node:

1. ``sbatch --parsable --no-requeue`` with the batch script on stdin. The script holds no secret
   (``scontrol write batch_script`` shows it): it makes the job's private directory (a name the
   launcher chose), sends its output there, runs cd/setup and starts the agent in ``await`` mode,
   which listens on <job dir>/agent.sock.
2. The queue wait: ``squeue`` polled, state/reason/expected start logged when they change.
3. ``srun --jobid J --overlap -u`` runs the agent code in ``attach`` mode inside the job; it splices
   the step's stdin/stdout to agent.sock, and the BOOT frame (key, token, argv, env) travels through
   it, so the key reaches the job only over the encrypted session. A reattach is another such step.

A job that ends (TIMEOUT, CANCELLED, NODE_FAIL, PREEMPTED) is final: ``check``/``attach`` raise
``AgentGoneError`` naming its state and reason, and an automatic restart of the same kernel shortly
after is refused (NO_RESUBMIT_WINDOW) instead of submitting job after job.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import math
import os
import secrets
import shlex
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from remote_kernel import bootstrap
from remote_kernel import protocol as P
from remote_kernel.backends.base import AgentGoneError, Locator
from remote_kernel.entry import KernelEntry, SlurmSettings
from remote_kernel.errors import EXIT_INTERRUPTED, LaunchError

log = logging.getLogger(__name__)
progress = logging.getLogger("remote_kernel.progress")

POLL_INTERVAL = 2.0  # seconds between squeue polls while the job waits
COMMAND_TIMEOUT = 30.0  # one sbatch/squeue/scancel over SSH
NO_RESUBMIT_WINDOW = 120.0  # after a job ended: a restart of that kernel within this is refused
ENDED_STATES = ("COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL",
                "DEADLINE", "OUT_OF_MEMORY", "SPECIAL_EXIT", "REVOKED")
JOB_DIR_ENV = "RK_JOB_DIR"  # remote/spawn.py reads it: the directory the batch script made
JOB_FAILED = "job.failed"  # remote/agent.py JOB_FAILED: the script failed before the agent listened
JOB_OUTPUT_TAIL = 4000  # bytes of job.out shown (remote/agent.py JOB_OUTPUT_TAIL)
# A script that fails before its agent listens (cd, a setup line, python not found) waits this long
# (at most) for the launcher's srun step to fetch the tail of its output (remote/agent.py
# report_failed_job): the job's directory is on the compute node, which the launcher cannot read.
FAILED_JOB_WAIT = 60

# The batch schedulers this backend knows how to drive; Slurm is the one built and tested.
SCHEDULERS: dict[str, dict[str, str]] = {
    "slurm": {"submit": "sbatch --parsable", "state": "squeue -h -t all -j {job} -o '%T|%N|%r|%S|%L'",
              "cancel": "scancel {job}", "step": "srun --jobid {job} --overlap -u -N1 -n1 --quiet"},
    "pbs": {"submit": "qsub", "state": "qstat -f -F json {job}", "cancel": "qdel {job}", "step": "pbs_attach"},
    "lsf": {"submit": "bsub", "state": "bjobs -o 'stat exec_host' -json {job}", "cancel": "bkill {job}",
            "step": "blaunch"},
}

# Run in the batch job by `python -S -c`: the agent program and its ``await`` request arrive
# base64-encoded on stdin (a heredoc of the script; neither is secret), the request is put back on
# fd 0 as the pipe spawn.py reads its BOOT frame from. The marker lets `gc` tell our agent.
BATCH_BOOTSTRAP = (
    f"# {bootstrap.AGENT_MARKER}\n"
    "import base64,os,sys,zlib\n"
    "d=base64.b64decode(sys.stdin.read());n=int(sys.argv[1])\n"
    "r,w=os.pipe();os.write(w,d[n:]);os.close(w);os.dup2(r,0);os.close(r)\n"
    "exec(zlib.decompress(d[:n]))\n"
)


@dataclass(frozen=True)
class JobState:
    state: str  # PENDING, RUNNING, TIMEOUT, ... ("" once the job is unknown to squeue)
    node: str = ""
    reason: str = ""
    start: str = ""
    left: str = ""

    @property
    def ended(self) -> bool:
        return not self.state or self.state.split()[0] in ENDED_STATES

    def describe(self, job_id: str) -> str:
        if not self.state:
            return f"job {job_id} is no longer known to Slurm (it ended)"
        reason = f" ({self.reason})" if self.reason and self.reason != "None" else ""
        return f"job {job_id} {self.state}{reason}"


class SlurmBackend:
    kind = "slurm"

    def __init__(self, settings: SlurmSettings) -> None:
        self.settings = settings
        self.job_id: str | None = None
        self.job_dir: str | None = None  # the k-XXXXXXXX name of the job's directory
        self.node: str = ""
        self.started_at: float | None = None  # when the job started: startup_timeout counts from here
        self.token = ""
        self.queued = False  # the job waits in the queue: there is no kernel to interrupt yet
        self._cancelled = threading.Event()
        self._cancel_reason = ""

    # ------------------------------------------------------------------------------ the seam

    def start(self, connection: Any, entry: KernelEntry, request: dict[str, Any], *,
              setup_budget: float | None = None) -> Any:
        self.token = str(request.get("token") or "")
        previous = request.get("replace") or {}
        if not self._reuse(connection, entry, previous):
            refuse_recent_end(previous)
            self._submit(connection, entry)
            self._wait_running(connection, entry)
        self.started_at = self.started_at or time.monotonic()
        attach = {"mode": "attach", "job_dir": self.job_dir, "runtime_dir": entry.runtime_dir,
                  "wait": entry.startup_timeout}
        channel = self._step(connection, entry)
        # The key and token go through the step's stdin only: never into the script or argv.
        with contextlib.suppress(Exception):
            channel.sendall(bootstrap.agent_input(attach) + _boot_frame(request))
        return channel

    def attach(self, connection: Any, entry: KernelEntry, locator: Locator) -> Any:
        self.job_id = locator.job_id or self.job_id
        self.check(connection)
        channel = self._step(connection, entry)
        channel.sendall(bootstrap.agent_input({"mode": "attach", "dir": locator.dir}))
        return channel

    def query(self, connection: Any, entry: KernelEntry, request: dict[str, Any]) -> Any:
        from remote_kernel.backends.direct import DirectBackend  # list/gc of the login node's agents

        return DirectBackend().query(connection, entry, request)

    def locator(self, entry: KernelEntry, ready: dict[str, Any]) -> Locator:
        return Locator(kind=self.kind, host=entry.host.label, dir=str(ready["dir"]), job_id=self.job_id,
                       node=self.node or None, job_dir=self.job_dir)

    def cancel(self, reason: str = "") -> None:
        """A stop while the job waits in the queue: scancel it at once (the wait loop does);
        ``reason`` (the first one given) ends the launcher's error message."""
        self._cancel_reason = self._cancel_reason or reason
        self._cancelled.set()

    def check(self, connection: Any) -> None:
        """Raise AgentGoneError if our job has ended (its state and reason in the message)."""
        if self.job_id is None or connection is None:
            return
        state = job_state(connection, self.job_id)
        if state is not None and state.ended:
            note_end(self.token, self.job_id, state)
            raise AgentGoneError(f"{state.describe(self.job_id)}: the kernel in it is gone",
                            hint=_end_hint(state))

    # ------------------------------------------------------------------------------ steps

    def _reuse(self, connection: Any, entry: KernelEntry, previous: dict[str, Any]) -> bool:
        """A restart: the job of the kernel it replaces still runs -> a new kernel in it."""
        job, job_dir = previous.get("job_id"), previous.get("job_dir")
        if not job or not job_dir:
            return False
        state = job_state(connection, str(job))
        if state is None or state.state != "RUNNING":
            return False
        self.job_id, self.job_dir, self.node = str(job), str(job_dir), state.node
        progress.info("restarting the kernel inside job %s on %s (no new queue wait)", job, state.node)
        return True

    def _submit(self, connection: Any, entry: KernelEntry) -> None:
        short = secrets.token_hex(4)
        self.job_dir = f"k-{short}"
        name = f"rk-{entry.name}-{short}"
        argv = ["sbatch", "--parsable", "--no-requeue", f"--job-name={name}", "--output=/dev/null",
                *sbatch_options(self.settings)]
        script = batch_script(entry, self.job_dir)
        progress.info("submitting job %s to Slurm on %s", name, entry.host.label)
        result = run(connection, shlex.join(argv), stdin=script.encode())
        job_id = result.stdout.decode(errors="replace").strip().split(";")[0]
        if result.exit_status != 0 or not job_id.isdigit():
            raise LaunchError(f"cannot submit kernel {entry.name!r} to Slurm on {entry.host.label}: "
                              f"sbatch exited {result.exit_status}",
                              stderr_tail=result.stderr.decode(errors="replace"),
                              hint="check the [kernels.NAME.slurm] keys (partition, account, time, ...) "
                                   "and that sbatch works in `ssh HOST`")
        self.job_id = job_id
        progress.info("job %s submitted", job_id)

    def _wait_running(self, connection: Any, entry: KernelEntry) -> None:
        """Wait for the job to run, with a local record of the wait: `gc` cancels a job whose
        launcher died while it was queued (nothing on the cluster knows)."""
        record = save_queued_job(entry.host.label, str(self.job_id), entry.name)
        self.queued = True
        try:
            self._poll_until_running(connection, entry)
        finally:
            self.queued = False
            with contextlib.suppress(OSError):
                record.unlink()

    def _poll_until_running(self, connection: Any, entry: KernelEntry) -> None:
        """Poll squeue until the job runs; log state/reason/start when they change."""
        job_id = str(self.job_id)
        began, seen = time.monotonic(), None
        limit = self.settings.queue_timeout
        while True:
            if self._cancelled.is_set():
                self._raise_cancelled(connection, entry, seen[0] if seen else "PENDING")
            state = job_state(connection, job_id) or JobState("UNKNOWN")
            if (state.state, state.reason, state.start) != seen:
                seen = (state.state, state.reason, state.start)
                progress.info("job %s %s%s%s", self.job_id, state.state,
                              f" ({state.reason})" if state.reason and state.reason != "None" else "",
                              f", expected start {state.start}" if state.start not in ("", "N/A") and
                              state.state == "PENDING" else "")
            if state.state == "RUNNING":
                self.node = state.node
                self.started_at = time.monotonic()
                return
            if state.ended:
                note_end(self.token, job_id, state)
                raise LaunchError(f"cannot start kernel {entry.name!r}: {state.describe(job_id)} before "
                                  "it ran", hint=_end_hint(state))
            if limit is not None and time.monotonic() - began > limit:
                self._scancel(connection, "queue_timeout")
                raise LaunchError(f"cannot start kernel {entry.name!r}: job {self.job_id} still {state.state} "
                                  f"after queue_timeout={limit:g} s; it was cancelled",
                                  hint="raise queue_timeout, or ask for fewer resources or another partition")
            self._cancelled.wait(POLL_INTERVAL)

    def _raise_cancelled(self, connection: Any, entry: KernelEntry, state: str) -> None:
        self._scancel(connection, self._cancel_reason or "the launcher was told to stop while the job waited")
        if self._cancel_reason == "Ctrl-C":
            error = LaunchError(f"kernel {entry.name!r}: job {self.job_id} cancelled while {state.lower()} (Ctrl-C)")
            error.exit_code = EXIT_INTERRUPTED
            raise error
        raise LaunchError(f"kernel {entry.name!r}: job {self.job_id} cancelled while it waited in the queue")

    def _scancel(self, connection: Any, why: str) -> None:
        log.info("cancelling job %s (%s)", self.job_id, why)
        with contextlib.suppress(Exception):
            run(connection, f"scancel {shlex.quote(str(self.job_id))}")

    def _step(self, connection: Any, entry: KernelEntry) -> Any:
        """An exec channel running the agent code in a new `srun --overlap` step of our job."""
        size = len(bootstrap.agent_payload())
        srun = ["srun", f"--jobid={self.job_id}", "--overlap", "-u", "-N1", "-n1", "--quiet"]
        line = (f"exec {shlex.join(srun)} -- /bin/sh -c {shlex.quote(step_script(entry, str(self.job_dir)))} sh "
                f"{bootstrap.shell_word(entry.python)} {shlex.quote(bootstrap.BOOTSTRAP)} {size}")
        script = (line + "\n").encode()
        channel = connection.open_exec(bootstrap._DISPATCH.format(n=len(script)))
        channel.sendall(script)
        return channel


# ---------------------------------------------------------------------------------- the job


def sbatch_options(settings: SlurmSettings) -> list[str]:
    """The [slurm] table as sbatch options (values are data: one argv word each)."""
    options = [f"--{flag}={value}" for flag, value in (
        ("partition", settings.partition), ("account", settings.account), ("time", settings.time),
        ("cpus-per-task", settings.cpus), ("mem", settings.mem), ("gpus", settings.gpus), ("qos", settings.qos),
        ("constraint", settings.constraint), ("reservation", settings.reservation)) if value is not None]
    return options + list(settings.extra_args)


def batch_script(entry: KernelEntry, job_dir: str) -> str:
    """The job's script: its private directory and output, cd, setup, the agent in ``await``
    mode. No secret: the key arrives later through an srun step (scontrol shows this script)."""
    payload = bootstrap.agent_payload()
    request = {"mode": "await", "name": entry.name, "runtime_dir": entry.runtime_dir,
               "startup_timeout": entry.startup_timeout}
    data = base64.encodebytes(payload + P.encode(P.BOOT, 0, 0, _marshal(request))).decode()
    lines = ["#!/bin/sh", f"# remote-kernel: kernel {entry.name!r} (no secret in this script)", "umask 077",
             *_job_dir_lines(entry, job_dir), *_failure_lines(entry)]
    if entry.cwd:
        lines.append(f"cd -- {bootstrap.shell_word(entry.cwd)} || exit {bootstrap.CWD_FAILED_EXIT}")
    if entry.setup:
        lines.extend(bootstrap._bounded_setup(entry.setup, entry.startup_timeout))
    lines += [f"export {JOB_DIR_ENV}",
              "shopt -s execfail 2>/dev/null  # bash as sh: a failed exec returns (and the trap runs)",
              f"exec {bootstrap.shell_word(entry.python)} -S -c {shlex.quote(BATCH_BOOTSTRAP)} {len(payload)} "
              "<<'RK_PAYLOAD' || exit $?", data.rstrip("\n"), "RK_PAYLOAD", ""]
    return "\n".join(lines)


def step_script(entry: KernelEntry, job_dir: str) -> str:
    """What /bin/sh runs in each srun step ($1 python, $2 the bootstrap, $3 the payload's size):
    the agent code, or where that python is not there, what the agent's report_failed_job would
    say (the job's script failed: python not found is the usual cause), in shell."""
    failed, sock = f'"$d/{JOB_FAILED}"', '"$d/agent.sock"'
    return "\n".join([
        'command -v "$1" >/dev/null 2>&1 && exec "$1" -S -c "$2" "$3"',
        *_job_root_lines(entry), f'd="$rk_base/{job_dir}"; rk_n=0',
        f"while [ ! -e {failed} ] && [ ! -S {sock} ] && [ $rk_n -lt {_failed_wait(entry)} ]; do",
        "  sleep 1; rk_n=$((rk_n + 1)); done",
        f"if [ -e {failed} ]; then",
        f"  echo \"remote-kernel: the job's script ended with status $(cat {failed}) before the agent started; "
        'the end of $d/job.out:" >&2',
        f'  tail -c {JOB_OUTPUT_TAIL} "$d/job.out" >&2; rm -f {failed}; exit {P.EXIT_JOB_FAILED}',
        "fi",
        f'echo "remote-kernel: $1 not found on $(uname -n)" >&2; exit {P.EXIT_NOT_FOUND}',
    ])


def _failed_wait(entry: KernelEntry) -> int:
    return max(10, min(FAILED_JOB_WAIT, math.ceil(entry.startup_timeout)))


def _failure_lines(entry: KernelEntry) -> list[str]:
    """The job directory's first agent.json (so `gc` knows it for a job's: its agent is not there
    yet while the setup lines run), and an EXIT trap (a successful exec of the agent drops it) that
    leaves the exit status in job.failed and waits until the launcher's step has read the output's
    tail (agent.py report_failed_job removes the file), at most FAILED_JOB_WAIT s."""
    wait = _failed_wait(entry)
    failed = f'"${JOB_DIR_ENV}/{JOB_FAILED}"'
    return [
        f"printf '{{\"kind\": \"job\", \"job_id\": \"%s\", \"host\": \"%s\"}}\\n' \"${{SLURM_JOB_ID:-}}\" "
        f'"$(uname -n)" >"${JOB_DIR_ENV}/agent.json"',
        f"rk_failed() {{ trap - EXIT; echo \"$1\" >{failed}; rk_n=0",
        f"  while [ -e {failed} ] && [ $rk_n -lt {wait} ]; do sleep 1; rk_n=$((rk_n + 1)); done; exit \"$1\"; }}",
        "trap 'rk_failed $?' EXIT",
    ]


def _job_root_lines(entry: KernelEntry) -> list[str]:
    """The shell twin of remote/spawn.py's base_path: $rk_base, where our k-* directories are."""
    if entry.runtime_dir:
        root = entry.runtime_dir.replace("\\", "\\\\").replace('"', '\\"').replace("`", "\\`")
        root = '"$HOME"' + root[1:] if root.startswith("~") else f'"{root}"'
        first = [f"rk_root={root}"]
    else:
        first = ['rk_root=${TMPDIR:-/tmp}',
                 'if [ ${#rk_root} -gt 40 ] || [ ! -d "$rk_root" ] || [ ! -w "$rk_root" ]; then rk_root=/tmp; fi']
    return [*first, 'rk_base="$rk_root/remote-kernel-$(id -u)"']


def _job_dir_lines(entry: KernelEntry, job_dir: str) -> list[str]:
    """The job's private directory (the root made first where runtime_dir names it), its output."""
    first = ['mkdir -p -m 700 "$rk_root" 2>/dev/null'] if entry.runtime_dir else []
    return [*_job_root_lines(entry), *first,
            'mkdir -m 700 "$rk_base" 2>/dev/null',
            f'{JOB_DIR_ENV}="$rk_base/{job_dir}"',
            f'mkdir -m 700 "${JOB_DIR_ENV}" || exit 96',
            f'exec >"${JOB_DIR_ENV}/job.out" 2>&1']


def job_state(connection: Any, job_id: str) -> JobState | None:
    """squeue's state of the job (all states: an ended job stays listed for MinJobAge), then
    sacct's; JobState("") when neither knows it; None when squeue could not be asked."""
    result = run(connection, f"squeue -h -t all -j {shlex.quote(job_id)} -o '%T|%N|%r|%S|%L'")
    if result.exit_status not in (0, 1):
        return None
    for line in result.stdout.decode(errors="replace").splitlines():
        parts = line.strip().split("|")
        if len(parts) == 5:
            return JobState(*parts)
    result = run(connection, f"sacct -n -P -X -j {shlex.quote(job_id)} -o State,NodeList,Reason")
    for line in result.stdout.decode(errors="replace").splitlines():
        parts = line.strip().split("|")
        if len(parts) >= 2 and parts[0]:
            return JobState(parts[0], parts[1], parts[2] if len(parts) > 2 else "")
    return JobState("")


def run(connection: Any, command: str, *, stdin: bytes = b"", timeout: float = COMMAND_TIMEOUT) -> Any:
    """One command on the login node (through the dispatcher: any login shell), bounded."""
    script = (command + "\n").encode()
    channel = connection.open_exec(bootstrap._DISPATCH.format(n=len(script)))
    try:
        channel.sendall(script + stdin)
        channel.shutdown_write()
        return bootstrap._collect(channel, time.monotonic() + timeout)
    finally:
        channel.close()


def _boot_frame(request: dict[str, Any]) -> bytes:
    return P.encode(P.BOOT, 0, 0, _marshal(request))


def _marshal(value: Any) -> bytes:
    import marshal

    return marshal.dumps(value, P.BOOT_MARSHAL_VERSION)


def _end_hint(state: JobState) -> str:
    if state.state.startswith("TIMEOUT"):
        return "the job reached its time limit: raise `time` in [kernels.NAME.slurm]"
    if state.state.startswith("CANCELLED"):
        return "the job was cancelled (scancel, or an administrator); start the kernel again"
    return "start the kernel again; see `scontrol show job` or `sacct -j` for the job's end"


# ------------------------------------------------------------------- jobs waiting in the queue


QUEUED_PREFIX = "slurm-queued-"


def save_queued_job(host: str, job_id: str, entry: str) -> Path:
    """A local record (Jupyter runtime dir, 0600) that this process waits for ``job_id``: if the
    process dies, `gc` finds its PID dead and cancels the job while it is still PENDING."""
    from remote_kernel import records
    from remote_kernel.launcher import _jupyter_runtime_dir

    path = _jupyter_runtime_dir() / "remote-kernel" / f"{QUEUED_PREFIX}{secrets.token_hex(8)}.json"
    with contextlib.suppress(OSError):
        records.write_private_json(path, {"pid": os.getpid(), "host": host, "job_id": job_id, "entry": entry})
    return path


def abandoned_jobs(runtime_dir: Path) -> dict[str, list[tuple[str, Path]]]:
    """The queued jobs whose launcher died, by host label: (job id, its record)."""
    from remote_kernel.launcher import pid_alive

    found: dict[str, list[tuple[str, Path]]] = {}
    for path in sorted((runtime_dir / "remote-kernel").glob(f"{QUEUED_PREFIX}*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            pid, host, job_id = int(record["pid"]), str(record["host"]), str(record["job_id"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if not pid_alive(pid):
            found.setdefault(host, []).append((job_id, path))
    return found


# ----------------------------------------------------------------- no resubmit loop after an end


def _ended_path(token: str) -> Path:
    from remote_kernel.launcher import _jupyter_runtime_dir

    digest = hashlib.sha256(token.encode()).hexdigest()[:24]
    return _jupyter_runtime_dir() / "remote-kernel" / f"{ENDED_PREFIX}{digest}.json"


def note_end(token: str, job_id: str, state: JobState) -> None:
    """Remember (keyed by the kernel's token, which its restart record carries) that its job
    ended by Slurm's hand, so that Jupyter's automatic restart does not submit job after job."""
    if not token or state.state.startswith("COMPLETED"):
        return
    from remote_kernel import records

    with contextlib.suppress(OSError):
        records.write_private_json(_ended_path(token), {"job_id": job_id, "state": state.describe(job_id),
                                                        "at": time.time()})


ENDED_PREFIX = "slurm-ended-"


def expired_end_records(runtime_dir: Path) -> list[Path]:
    """The records of note_end older than NO_RESUBMIT_WINDOW (unreadable ones too): they refuse
    nothing any more, and `gc` removes them."""
    expired = []
    for path in sorted((runtime_dir / "remote-kernel").glob(f"{ENDED_PREFIX}*.json")):
        try:
            at = float(json.loads(path.read_text(encoding="utf-8"))["at"])
        except (OSError, ValueError, KeyError, TypeError):
            at = 0.0
        if time.time() - at >= NO_RESUBMIT_WINDOW:
            expired.append(path)
    return expired


def refuse_recent_end(previous: dict[str, Any]) -> None:
    """A restart of a kernel whose job Slurm ended moments ago (TIMEOUT, CANCELLED, ...): that is
    Jupyter's auto-restart; a new job would meet the same end. Refused for NO_RESUBMIT_WINDOW."""
    token = str(previous.get("token") or "")
    if not token:
        return
    try:
        ended = json.loads(_ended_path(token).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    age = time.time() - float(ended.get("at") or 0)
    if 0 <= age < NO_RESUBMIT_WINDOW:
        raise LaunchError(f"{ended.get('state')} {age:.0f} s ago; not submitting a new job for the restart "
                          f"that followed (it would meet the same end)",
                          hint=f"start the kernel again after {NO_RESUBMIT_WINDOW:g} s, or fix the cause "
                               "(e.g. raise `time`)")

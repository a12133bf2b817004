"""A single-node Slurm cluster for the tests: munged, slurmctld and slurmd started by PID, their
configuration, state and sockets in a temporary directory, stopped at the end of the session.

The daemons run in the root network namespace (the test sshd's sessions must reach them) and bind
to loopback only: ``CommunicationParameters=NoInAddrAny,NoCtldInAddrAny`` and ``NodeAddr=127.0.0.1``
(../shared/tools/slurm_up.sh with ``SLURM_NETNS=none`` is the reference). munged talks over a Unix
socket of its own (``AuthInfo=socket=...``), so the machine's /run/munge is never touched; the
ports are free ones. Sessions of the test sshd find the cluster through ``SetEnv SLURM_CONF=...``
(``sshd_config_lines``). Root only (slurmd must be); under CI=1 a missing piece fails the test
instead of skipping it. The fixtures (`slurm_cluster`, one per session, and `slurm`) are in conftest.py.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

DAEMONS = ("/usr/sbin/munged", "/usr/sbin/mungekey", "/usr/sbin/slurmctld", "/usr/sbin/slurmd")
CLIENTS = ("sbatch", "squeue", "scancel", "srun", "sinfo", "scontrol")
UP_TIMEOUT = 60.0


def missing_component() -> str | None:
    """What this machine lacks to run the cluster, or None."""
    if os.geteuid() != 0:
        return "the Slurm tests need root (slurmd runs as root)"
    for path in DAEMONS:
        if not os.access(path, os.X_OK):
            return f"{path} not found (apt-get install -y --no-install-recommends slurm-wlm munge)"
    for name in CLIENTS:
        if shutil.which(name) is None:
            return f"{name} not found (apt-get install -y --no-install-recommends slurm-wlm)"
    return None


def require_slurm() -> None:
    problem = missing_component()
    if problem is None:
        return
    if os.environ.get("CI"):
        pytest.fail(problem + "; CI is set, so the Slurm tests must run", pytrace=False)
    pytest.skip(problem)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class SlurmCluster:
    dir: Path
    node: str = field(default_factory=lambda: socket.gethostname().split(".")[0])
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def conf(self) -> Path:
        return self.dir / "slurm.conf"

    @property
    def munge_socket(self) -> Path:
        return self.dir / "munge.sock"

    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def sshd_config_lines(self) -> str:
        """For sshd_factory(extra_config=...): sessions see this cluster."""
        return f"SetEnv SLURM_CONF={self.conf}"

    def run(self, *args: str, timeout: float = 30.0, check: bool = False) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(args), env=self.env(), capture_output=True, text=True, timeout=timeout,
                              check=check)

    # ---------------------------------------------------------------------------------- queries

    def job(self, job_id: str) -> dict[str, str]:
        """squeue's view of one job (all states; empty once it left squeue)."""
        result = self.run("squeue", "-h", "-t", "all", "-j", job_id, "-o", "%i|%j|%T|%N|%r")
        for line in result.stdout.splitlines():
            parts = line.strip().split("|")
            if len(parts) == 5 and parts[0] == job_id:
                return dict(zip(("id", "name", "state", "node", "reason"), parts, strict=True))
        return {}

    def jobs(self, *, prefix: str = "rk-") -> list[dict[str, str]]:
        """Our jobs (by name prefix) in squeue, all states."""
        result = self.run("squeue", "-h", "-t", "all", "-o", "%i|%j|%T|%N|%r")
        found = []
        for line in result.stdout.splitlines():
            parts = line.strip().split("|")
            if len(parts) == 5 and parts[1].startswith(prefix):
                found.append(dict(zip(("id", "name", "state", "node", "reason"), parts, strict=True)))
        return found

    def active_jobs(self, *, prefix: str = "rk-") -> list[dict[str, str]]:
        return [job for job in self.jobs(prefix=prefix) if job["state"] in ("PENDING", "RUNNING", "CONFIGURING",
                                                                              "COMPLETING", "SUSPENDED")]

    def wait_state(self, job_id: str, states: tuple[str, ...], timeout: float) -> str:
        """The job's state once it is one of ``states`` (bounded); the last seen state otherwise."""
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = self.job(job_id).get("state", "GONE")
            if state in states:
                return state
            time.sleep(0.25)
        return state

    def cancel_ours(self) -> None:
        """Between tests: no job of ours may hold the node for the next one."""
        for job in self.active_jobs():
            self.run("scancel", job["id"])
        deadline = time.monotonic() + 30
        while self.active_jobs() and time.monotonic() < deadline:
            time.sleep(0.2)

    # ---------------------------------------------------------------------------------- life

    def start(self) -> SlurmCluster:
        for sub in ("ctld", "spool"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        self._start_munge()
        self._write_conf()
        self._spawn("slurmctld", ["/usr/sbin/slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._spawn("slurmd", ["/usr/sbin/slurmd", "-D", "-f", str(self.conf)])
        self._wait_node_up()
        return self

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in reversed(self.processes):
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        self.processes.clear()

    def log_tail(self, lines: int = 15) -> str:
        parts = []
        for name in ("munged.log", "slurmctld.log", "slurmd.log"):
            path = self.dir / name
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {name}\n" + "\n".join(tail))
        return "\n".join(parts)

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = (self.dir / f"{name}.out").open("ab")
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                   env=self.env(), start_new_session=True)
        log.close()
        self.processes.append(process)

    def _start_munge(self) -> None:
        key = self.dir / "munge.key"
        subprocess.run(["/usr/sbin/mungekey", "--create", f"--keyfile={key}"], check=True, capture_output=True,
                       timeout=30)
        key.chmod(0o600)
        # -F: stays our child (its PID is ours to stop); --force: it runs as root, its files in /tmp
        self._spawn("munged", ["/usr/sbin/munged", "-F", "--force", f"--socket={self.munge_socket}",
                               f"--key-file={key}", f"--pid-file={self.dir / 'munged.pid'}",
                               f"--log-file={self.dir / 'munged.log'}", f"--seed-file={self.dir / 'munged.seed'}"])
        deadline = time.monotonic() + 15
        while not self.munge_socket.exists():
            if time.monotonic() > deadline or self.processes[-1].poll() is not None:
                raise RuntimeError("munged did not start:\n" + self.log_tail())
            time.sleep(0.05)

    def _write_conf(self) -> None:
        cpus = os.cpu_count() or 1
        self.conf.write_text("\n".join([
            "# generated by tests/slurm.py",
            "ClusterName=rktest",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            "CommunicationParameters=NoInAddrAny,NoCtldInAddrAny",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            f"StateSaveLocation={self.dir / 'ctld'}",
            f"SlurmdSpoolDir={self.dir / 'spool'}",
            f"SlurmctldPidFile={self.dir / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.dir / 'slurmd.pid'}",
            f"SlurmctldLogFile={self.dir / 'slurmctld.log'}",
            f"SlurmdLogFile={self.dir / 'slurmd.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",  # no cgroups needed (containers, no systemd)
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "SchedulerType=sched/backfill",
            # the main scheduler every 2 s (default 60 s): a held job starts when it may
            "SchedulerParameters=sched_interval=2,bf_interval=2",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "ReturnToService=2",
            "MpiDefault=none",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=30",
            "InactiveLimit=0",
            "KillWait=5",
            "MinJobAge=300",  # ended jobs stay in squeue (there is no accounting for sacct here)
            f"NodeName={self.node} NodeAddr=127.0.0.1 NodeHostname={self.node} CPUs={cpus} RealMemory=1000 "
            "State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO",
            "",
        ]))

    def _wait_node_up(self) -> None:
        deadline = time.monotonic() + UP_TIMEOUT
        state = ""
        while time.monotonic() < deadline:
            for process in self.processes:
                if process.poll() is not None:
                    raise RuntimeError(f"{process.args[0]} exited with {process.returncode}:\n" + self.log_tail())
            state = self.run("sinfo", "-h", "-N", "-o", "%T", timeout=10).stdout.strip()
            if state.startswith(("idle", "mixed", "allocated")):
                return
            if state.startswith(("down", "drain")):
                self.run("scontrol", "update", f"nodename={self.node}", "state=resume", timeout=10)
            time.sleep(0.3)
        raise RuntimeError(f"the Slurm node is {state or 'not reported'} after {UP_TIMEOUT:g} s:\n" + self.log_tail())


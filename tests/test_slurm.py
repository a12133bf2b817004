"""Kernels inside Slurm jobs (issue 17), against the real single-node cluster of tests/slurm.py and
the real sshd as the login node: the job, the kernel in it, interrupt, restart in the same job,
shutdown, a job that ends under the kernel, no key anywhere Slurm shows nor in any process's argv,
Ctrl-C while queued, a job whose script fails before its agent, and `ps`/`gc` of our jobs."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.manager import KernelManager

sys.path.insert(0, str(Path(__file__).parent))

from launch_helpers import (
    execute,
    host_table,
    interrupted_cell,
    kernel_entry,
    kernel_table,
    launch_cli,
    run_cli,
    started_kernel,
    sync,
    wait_until,
    write_config,
    write_spec,
)
from slurm import SlurmCluster
from sshd import SSHServer

from remote_kernel import records
from remote_kernel.entry import KernelEntry, SlurmSettings
from remote_kernel.errors import EXIT_INTERRUPTED
from remote_kernel.launcher import RemoteKernel

pytestmark = pytest.mark.slow

JOB_TIMEOUT = 60.0


def slurm_entry(login: SSHServer, python: Path, name: str, **settings: object) -> KernelEntry:
    return kernel_entry(login, python, name, slurm=SlurmSettings(**settings))  # type: ignore[arg-type]


def our_job(cluster: SlurmCluster, name: str) -> dict[str, str]:
    jobs = [job for job in cluster.jobs() if job["name"].startswith(f"rk-{name}-")]
    assert len(jobs) == 1, jobs
    return jobs[0]


@pytest.fixture
def login(slurm: SlurmCluster, sshd_factory: object) -> SSHServer:
    """The "login node": a test sshd whose sessions reach the cluster."""
    return sshd_factory(extra_config=slurm.sshd_config_lines())  # type: ignore[operator, no-any-return]


def slurm_config(path: Path, login: SSHServer, python: Path | str, name: str, *,
                 kernel: dict[str, Any] | None = None, **slurm: Any) -> Path:
    """A config with one Slurm kernel ``name`` on the login node (`ps`/`gc`/`start` read it):
    ``kernel`` its other keys, ``slurm`` its [slurm] table."""
    table = kernel_table("login", python, slurm=slurm, **(kernel or {}))
    return write_config(path, hosts={"login": host_table(login)}, kernels={name: table})


def cli_json(config: Path, *args: str) -> dict[str, Any]:
    result = run_cli(["--config", str(config), *args, "--json"])
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def secrets_in_any_argv(*secrets: str) -> list[str]:
    """Every process on this machine (the login node and the compute node here) whose command
    line holds one of ``secrets``: /proc/<pid>/cmdline, read while the kernel lives."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().decode(errors="replace")
        except OSError:
            continue  # the process ended meanwhile
        found += [f"{cmdline.parent.name}: {argv[:200]!r}" for secret in secrets if secret in argv]
    return found


def token_of(km: KernelManager) -> str:
    """The reattach token of the launcher of ``km`` (its restart record, 0600)."""
    from jupyter_core.paths import jupyter_runtime_dir

    path = records.restart_record_path(Path(jupyter_runtime_dir()), Path(km.connection_file))
    record = records.load_restart_record(path)
    assert record is not None and len(record.token) >= 32
    return record.token


def test_a_kernel_runs_in_a_job_interrupts_restarts_in_it_and_its_shutdown_ends_the_job(
        slurm: SlurmCluster, login: SSHServer, remote_python: Path) -> None:
    entry = slurm_entry(login, remote_python, "slurmy")
    write_spec(entry)
    with started_kernel("slurmy", ready_timeout=JOB_TIMEOUT) as (km, kc):
        job = our_job(slurm, "slurmy")
        assert job["state"] == "RUNNING"
        assert execute(kc, "import os; print(os.environ['SLURM_JOB_ID'])").stdout.strip() == job["id"]
        assert execute(kc, "1+1").result == "2"
        pid = execute(kc, "print(os.getpid())").stdout.strip()
        # signal mode (the spec's default): SIGINT to the launcher reaches the kernel in the job
        assert interrupted_cell(km, kc, timeout=30).ename == "KeyboardInterrupt"
        assert execute(kc, "print(os.getpid())").stdout.strip() == pid
        # message mode: interrupt_request over the control channel
        msg_id = kc.execute("time.sleep(60)")
        time.sleep(1.0)
        kc.control_channel.send(kc.session.msg("interrupt_request", {}))
        reply = kc.get_shell_msg(timeout=30)
        assert reply["parent_header"]["msg_id"] == msg_id
        assert reply["content"]["ename"] == "KeyboardInterrupt"
        assert execute(kc, "print(os.getpid())").stdout.strip() == pid
        # the batch script and the job's record hold no key; no process's argv holds key or token
        key = km.session.key.decode()
        script = slurm.run("scontrol", "write", "batch_script", job["id"], "-").stdout
        assert "remote-kernel" in script and key not in script
        assert key not in slurm.run("scontrol", "show", "job", job["id"]).stdout
        assert secrets_in_any_argv(key, token_of(km)) == []
        # restart: a new kernel in the same job, no new queue wait
        km.restart_kernel(now=False)
        kc.wait_for_ready(timeout=JOB_TIMEOUT)
        assert execute(kc, "import os; print(os.environ['SLURM_JOB_ID'])").stdout.strip() == job["id"]
        assert execute(kc, "print(os.getpid())").stdout.strip() != pid
        assert [j["id"] for j in slurm.active_jobs()] == [job["id"]]
    # shutdown: the job ends by itself once nothing of ours is left in it
    assert slurm.wait_state(job["id"], ("COMPLETED", "CANCELLED", "GONE"), timeout=30) in (
        "COMPLETED", "CANCELLED", "GONE")
    assert slurm.active_jobs() == []


def ready_kernel(entry: KernelEntry, connection_file: Path) -> RemoteKernel:
    kernel = RemoteKernel(entry, connection_file)
    kernel.start()
    kernel.wait_ready(timeout=JOB_TIMEOUT)
    return kernel


def client_of(kernel: RemoteKernel) -> BlockingKernelClient:
    kc = BlockingKernelClient(connection_file=str(kernel.connection_file))
    kc.load_connection_file()
    kc.start_channels()
    kc.wait_for_ready(timeout=JOB_TIMEOUT)
    return kc


def test_a_job_cancelled_from_outside_ends_the_launcher_naming_the_job_and_its_state(
        slurm: SlurmCluster, login: SSHServer, remote_python: Path, tmp_path: Path) -> None:
    kernel = ready_kernel(slurm_entry(login, remote_python, "cancelled"), tmp_path / "kernel.json")
    try:
        job = our_job(slurm, "cancelled")
        slurm.run("scancel", job["id"])
        assert kernel.wait(timeout=60) not in (None, 0)
        assert kernel.error is not None
        assert f"job {job['id']} CANCELLED" in kernel.error.message
    finally:
        kernel.close()
    assert slurm.active_jobs() == []


def test_a_pending_job_is_logged_with_its_reason_and_the_kernel_starts_when_the_job_does(
        slurm: SlurmCluster, login: SSHServer, remote_python: Path, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="remote_kernel.progress")
    entry = slurm_entry(login, remote_python, "held", extra_args=("--begin=now+20",))
    kernel = ready_kernel(entry, tmp_path / "kernel.json")
    try:
        job = our_job(slurm, "held")
        pending = [r.getMessage() for r in caplog.records if "PENDING" in r.getMessage()]
        assert pending and f"job {job['id']} PENDING (BeginTime)" in pending[0]
        assert any(f"job {job['id']} RUNNING" in r.getMessage() for r in caplog.records)
        kc = client_of(kernel)
        assert execute(kc, "1+1").result == "2"
        kc.stop_channels()
    finally:
        kernel.close()


def test_a_shutdown_while_the_job_is_pending_cancels_it_at_once(
        slurm: SlurmCluster, login: SSHServer, remote_python: Path, tmp_path: Path) -> None:
    entry = slurm_entry(login, remote_python, "never", extra_args=("--begin=now+600",))
    kernel = RemoteKernel(entry, tmp_path / "kernel.json")
    kernel.start()
    try:
        assert wait_until(lambda: [j for j in slurm.jobs() if j["name"].startswith("rk-never-")], timeout=30)
        job = our_job(slurm, "never")
        assert job["state"] == "PENDING"
        kernel.terminate()
        assert kernel.wait(timeout=15) is not None
        assert slurm.wait_state(job["id"], ("CANCELLED",), timeout=10) == "CANCELLED"
    finally:
        kernel.close()


def test_an_ssh_drop_is_reattached_through_a_new_srun_step_and_the_kernel_keeps_its_state(
        slurm: SlurmCluster, login: SSHServer, remote_python: Path, tmp_path: Path) -> None:
    kernel = ready_kernel(slurm_entry(login, remote_python, "dropped"), tmp_path / "kernel.json")
    try:
        kc = client_of(kernel)
        execute(kc, "x = 41")
        for pid in login.session_pids():
            os.kill(pid, signal.SIGKILL)  # the launcher's TCP connection dies, the job lives on
        assert execute(kc, "print(x + 1)", timeout=60).stdout.strip() == "42"
        assert len(slurm.active_jobs()) == 1
        kc.stop_channels()
    finally:
        kernel.close()


def test_a_killed_launcher_leaves_a_job_that_ends_after_the_lease(
        slurm: SlurmCluster, login: SSHServer, remote_python: Path, tmp_path: Path) -> None:
    entry = slurm_entry(login, remote_python, "orphan")
    write_spec(dataclasses.replace(entry, reconnect_grace=5.0))
    km = KernelManager(kernel_name="orphan")
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=JOB_TIMEOUT)
        job = our_job(slurm, "orphan")
        km.provisioner.process.kill()  # type: ignore[union-attr]  # SIGKILL: nothing of ours says goodbye
        km.provisioner.process.wait(10)  # type: ignore[union-attr]
        # lease (5 s) + the agent's silence limit + the job's linger for a restart
        assert slurm.wait_state(job["id"], ("COMPLETED", "CANCELLED", "GONE"), timeout=60) != "RUNNING"
        assert slurm.active_jobs() == []
    finally:
        kc.stop_channels()
        km.cleanup_resources()


def test_a_job_that_reaches_its_time_limit_is_named_timeout_and_the_restart_submits_no_new_job(
        slurm: SlurmCluster, login: SSHServer, remote_python: Path) -> None:
    entry = slurm_entry(login, remote_python, "brief", time="0:01:00")
    write_spec(entry)
    km = KernelManager(kernel_name="brief")
    stderr = open(os.devnull, "w")  # noqa: SIM115 - closed below
    km.start_kernel(stderr=stderr)
    try:
        kc = km.client()
        kc.start_channels()
        kc.wait_for_ready(timeout=JOB_TIMEOUT)
        job = our_job(slurm, "brief")
        assert slurm.wait_state(job["id"], ("TIMEOUT",), timeout=150) == "TIMEOUT"
        assert wait_until(lambda: km.provisioner.process.poll() is not None, timeout=60)  # type: ignore[union-attr]
        assert km.provisioner.process.returncode != 0  # type: ignore[union-attr]
        # what Jupyter's auto-restart does next: the same kernel again, same connection file
        km.restart_kernel(now=True)
        assert wait_until(lambda: km.provisioner.process.poll() is not None, timeout=60)  # type: ignore[union-attr]
        assert km.provisioner.process.returncode != 0  # type: ignore[union-attr]
        assert [j["id"] for j in slurm.jobs() if j["name"].startswith("rk-brief-")] == [job["id"]]
        kc.stop_channels()
    finally:
        if km.has_kernel:
            km.shutdown_kernel(now=True)
        stderr.close()


def wait_for_text(path: Path, text: str, *, timeout: float) -> bool:
    return wait_until(lambda: text in path.read_text(errors="replace"), timeout=timeout, interval=0.2)


def queued_records() -> list[Path]:
    from jupyter_core.paths import jupyter_runtime_dir

    return sorted((Path(jupyter_runtime_dir()) / "remote-kernel").glob("slurm-queued-*.json"))


def test_ctrl_c_while_the_job_is_queued_cancels_it_at_once(
        slurm: SlurmCluster, login: SSHServer, remote_python: Path, tmp_path: Path) -> None:
    config = slurm_config(tmp_path / "rk.toml", login, remote_python, "waiting", extra_args=["--begin=now+600"])
    launched = launch_cli(["--config", str(config), "start", "waiting"], stderr_path=tmp_path / "start.err")
    try:
        assert wait_for_text(launched.stderr_path, "PENDING (BeginTime)", timeout=30), launched.stderr
        job = our_job(slurm, "waiting")
        launched.signal(signal.SIGINT)  # Ctrl-C in the terminal: there is no kernel yet to interrupt
        assert launched.wait(timeout=20) == EXIT_INTERRUPTED
        assert f"job {job['id']} cancelled while pending (Ctrl-C)" in launched.stderr
        assert slurm.wait_state(job["id"], ("CANCELLED",), timeout=10) == "CANCELLED"
        assert queued_records() == []
    finally:
        launched.stop()


def test_a_queued_job_whose_launcher_was_killed_is_listed_by_ps_and_cancelled_by_gc(
        slurm: SlurmCluster, login: SSHServer, remote_python: Path, tmp_path: Path) -> None:
    config = slurm_config(tmp_path / "rk.toml", login, remote_python, "forsaken", extra_args=["--begin=now+600"])
    launched = launch_cli(["--config", str(config), "start", "forsaken"], stderr_path=tmp_path / "start.err")
    try:
        assert wait_for_text(launched.stderr_path, "PENDING (BeginTime)", timeout=30), launched.stderr
        job = our_job(slurm, "forsaken")
        launched.proc.kill()  # SIGKILL: its local record of the queued job stays behind
        launched.wait(timeout=10)
        [row] = [r for r in cli_json(config, "ps")["kernels"] if r["job"] and r["job"]["id"] == job["id"]]
        assert (row["name"], row["state"], row["job"]["state"], row["job"]["reason"]) == (
            "forsaken", "queued", "PENDING", "BeginTime")
        # (Directories of jobs other tests left, ended by now, may be removed too: "remove-job-dir".)
        dry = cli_json(config, "gc", "--dry-run")
        assert cancels(dry) == [("cancel-job", job["id"])]
        assert slurm.job(job["id"])["state"] == "PENDING" and len(queued_records()) == 1
        done = cli_json(config, "gc")
        assert cancels(done) == [("cancel-job", job["id"])]
        assert "launcher is gone" in next(a for a in done["actions"] if a["action"] == "cancel-job")["why"]
        assert slurm.wait_state(job["id"], ("CANCELLED",), timeout=10) == "CANCELLED"
        assert queued_records() == []
    finally:
        launched.stop()


def cancels(gc_answer: dict[str, Any]) -> list[tuple[str, str]]:
    return [(a["action"], a["job_id"]) for a in gc_answer["actions"] if a["action"] == "cancel-job"]


def orphaned_row(config: Path, name: str) -> dict[str, Any] | None:
    rows = [r for r in cli_json(config, "ps")["kernels"] if r["name"] == name and r["state"] == "orphaned"]
    return rows[0] if rows else None


def test_a_killed_launcher_s_job_is_listed_by_ps_and_cancelled_by_gc_once_its_lease_ended(
        slurm: SlurmCluster, login: SSHServer, remote_python: Path, tmp_path: Path) -> None:
    """Left alone, the agent ends the kernel when its lease ends and the job ends after it (the
    test above). gc is for what cannot end itself: here the agent is frozen (SIGSTOP, as by a hung
    file system), and gc cancels the job once the lease is over, never before."""
    config = slurm_config(tmp_path / "rk.toml", login, remote_python, "stranded", kernel={"reconnect_grace": 15})
    sync(config)
    km = KernelManager(kernel_name="stranded")
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    frozen = 0
    try:
        kc.wait_for_ready(timeout=JOB_TIMEOUT)
        job = our_job(slurm, "stranded")
        km.provisioner.process.kill()  # type: ignore[union-attr]  # SIGKILL: nothing of ours says goodbye
        km.provisioner.process.wait(10)  # type: ignore[union-attr]
        assert wait_until(lambda: orphaned_row(config, "stranded") is not None, timeout=30)
        row = orphaned_row(config, "stranded")
        assert row is not None and row["job"] is not None
        assert (row["job"]["id"], row["job"]["state"], row["job"]["node"]) == (job["id"], "RUNNING", slurm.node)
        assert row["job"]["time_left"] and 0 < row["lease_left"] <= 15
        assert not [a for a in cli_json(config, "gc", "--dry-run")["actions"] if a["action"] == "cancel-job"]
        frozen = int(row["agent_pid"])
        os.kill(frozen, signal.SIGSTOP)
        time.sleep(row["lease_left"] + 1)
        done = cli_json(config, "gc")
        assert [(a["action"], a["job_id"]) for a in done["actions"] if a["action"] == "cancel-job"] == [
            ("cancel-job", job["id"])]
        assert row["dir"] in [a["dir"] for a in done["actions"] if a["action"] == "remove-job-dir"]
        assert slurm.wait_state(job["id"], ("CANCELLED", "GONE"), timeout=30) in ("CANCELLED", "GONE")
        assert not Path(row["dir"]).exists()
        # (a job still COMPLETING is listed by squeue, and so by ps, for a moment)
        assert wait_until(lambda: not [r for r in cli_json(config, "ps")["kernels"] if r["name"] == "stranded"],
                          timeout=20, interval=1)
    finally:
        if frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(frozen, signal.SIGCONT)  # a failed test leaves nothing stopped
        kc.stop_channels()
        km.cleanup_resources()


@pytest.mark.parametrize("failure", [
    {"python": "/nonexistent/python3", "shown": "/nonexistent/python3: not found"},
    {"setup": ["echo loading the environment", "false || exit 3"], "shown": "loading the environment"},
], ids=["python-not-found", "setup-line-exits"])
def test_a_job_whose_script_fails_before_its_agent_shows_the_end_of_its_output(
        slurm: SlurmCluster, login: SSHServer, remote_python: Path, tmp_path: Path, failure: dict[str, Any]) -> None:
    failure = dict(failure)
    shown = failure.pop("shown")
    config = slurm_config(tmp_path / "rk.toml", login, failure.pop("python", remote_python), "broken", kernel=failure)
    launched = launch_cli(["--config", str(config), "start", "broken"], stderr_path=tmp_path / "start.err")
    try:
        assert launched.wait(timeout=60) == 1
        assert "its batch job's script failed before the kernel started" in launched.stderr
        assert "ended with status" in launched.stderr and shown in launched.stderr
        assert wait_until(lambda: slurm.active_jobs() == [], timeout=15)  # the job ends once it was read
    finally:
        launched.stop()

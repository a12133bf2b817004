"""Kernels inside Slurm jobs (issue 17), against the real single-node cluster of tests/slurm.py and
the real sshd as the login node: the job, the kernel in it, interrupt, restart in the same job,
shutdown, a job that ends under the kernel, and no key anywhere Slurm shows."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from jupyter_client.manager import KernelManager

sys.path.insert(0, str(Path(__file__).parent))

from launch_helpers import execute, kernel_entry, started_kernel, wait_until, write_spec
from slurm import SlurmCluster, slurm, slurm_cluster  # noqa: F401 - fixtures
from sshd import SSHServer

from remote_kernel.entry import KernelEntry, SlurmSettings

pytestmark = pytest.mark.slow

JOB_TIMEOUT = 60.0


def slurm_entry(login: SSHServer, python: Path, name: str, **settings: object) -> KernelEntry:
    return kernel_entry(login, python, name, slurm=SlurmSettings(**settings))  # type: ignore[arg-type]


def our_job(cluster: SlurmCluster, name: str) -> dict[str, str]:
    jobs = [job for job in cluster.jobs() if job["name"].startswith(f"rk-{name}-")]
    assert len(jobs) == 1, jobs
    return jobs[0]


@pytest.fixture
def login(slurm: SlurmCluster, sshd_factory: object) -> SSHServer:  # noqa: F811 - the fixture
    """The "login node": a test sshd whose sessions reach the cluster."""
    return sshd_factory(extra_config=slurm.sshd_config_lines())  # type: ignore[operator, no-any-return]


def test_a_kernel_runs_in_a_job_interrupts_restarts_in_it_and_its_shutdown_ends_the_job(
        slurm: SlurmCluster, login: SSHServer, remote_python: Path) -> None:  # noqa: F811
    entry = slurm_entry(login, remote_python, "slurmy")
    write_spec(entry)
    with started_kernel("slurmy", ready_timeout=JOB_TIMEOUT) as (km, kc):
        job = our_job(slurm, "slurmy")
        assert job["state"] == "RUNNING"
        assert execute(kc, "import os; print(os.environ['SLURM_JOB_ID'])").stdout.strip() == job["id"]
        assert execute(kc, "1+1").result == "2"
        pid = execute(kc, "print(os.getpid())").stdout.strip()
        # signal mode (the spec's default): SIGINT to the launcher reaches the kernel in the job
        msg_id = kc.execute("import time; time.sleep(60)")
        time.sleep(1.0)
        km.interrupt_kernel()
        reply = kc.get_shell_msg(timeout=30)
        assert reply["parent_header"]["msg_id"] == msg_id
        assert reply["content"]["ename"] == "KeyboardInterrupt"
        assert execute(kc, "print(os.getpid())").stdout.strip() == pid
        # message mode: interrupt_request over the control channel
        msg_id = kc.execute("time.sleep(60)")
        time.sleep(1.0)
        kc.control_channel.send(kc.session.msg("interrupt_request", {}))
        reply = kc.get_shell_msg(timeout=30)
        assert reply["content"]["ename"] == "KeyboardInterrupt"
        assert execute(kc, "print(os.getpid())").stdout.strip() == pid
        # the batch script and the job's record hold no key
        key = km.session.key.decode()
        script = slurm.run("scontrol", "write", "batch_script", job["id"], "-").stdout
        assert "remote-kernel" in script and key not in script
        assert key not in slurm.run("scontrol", "show", "job", job["id"]).stdout
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


def test_a_job_cancelled_from_outside_ends_the_launcher_naming_the_job_and_its_state(
        slurm: SlurmCluster, login: SSHServer, remote_python: Path) -> None:  # noqa: F811
    entry = slurm_entry(login, remote_python, "cancelled")
    write_spec(entry)
    km = KernelManager(kernel_name="cancelled")
    km.start_kernel(stdout=None, stderr=None)
    try:
        kc = km.client()
        kc.start_channels()
        kc.wait_for_ready(timeout=JOB_TIMEOUT)
        job = our_job(slurm, "cancelled")
        slurm.run("scancel", job["id"])
        assert wait_until(lambda: km.provisioner is not None and km.provisioner.process.poll() is not None,
                          timeout=60)
        assert km.provisioner.process.returncode != 0
        kc.stop_channels()
    finally:
        if km.has_kernel:
            km.shutdown_kernel(now=True)
    assert slurm.active_jobs() == []

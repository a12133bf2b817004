"""The test Slurm cluster itself (tests/slurm.py): up, reachable from a session of the test sshd."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from slurm import SlurmCluster

from remote_kernel import bootstrap, ssh


def test_a_session_of_the_test_sshd_submits_a_job_that_runs_and_is_cancelled(
        slurm: SlurmCluster, sshd_factory: pytest.FixtureRequest) -> None:
    server = sshd_factory(extra_config=slurm.sshd_config_lines())  # type: ignore[operator]
    conn = ssh.connect(server.host_entry(name="login"))
    try:
        channel = conn.open_exec("sbatch --parsable --no-requeue -J rk-fixture -o /dev/null --wrap 'sleep 60'")
        channel.shutdown_write()
        result = bootstrap._collect(channel, time.monotonic() + 30)
        job = result.stdout.decode().strip()
        assert job.isdigit(), result.stderr.decode()
    finally:
        conn.close()
    assert slurm.wait_state(job, ("RUNNING",), timeout=30) == "RUNNING"
    slurm.run("scancel", job)
    assert slurm.wait_state(job, ("CANCELLED",), timeout=30) == "CANCELLED"

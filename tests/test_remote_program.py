"""bootstrap.run_program: a stdlib program on the remote host, the way doctor/discover/inventory run one."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from launch_helpers import kernel_entry
from sshd import SSHServer

from remote_kernel import bootstrap, ssh

pytestmark = pytest.mark.slow


def test_a_program_gets_its_request_on_stdin_and_its_output_and_status_come_back(
    sshd: SSHServer, remote_python: Path
) -> None:
    entry = kernel_entry(sshd, remote_python, "program", setup=["export RK_FROM_SETUP=1"], cwd="/tmp")
    source = ("import os, sys\n"
              "print(REQUEST['word'], os.environ.get('RK_FROM_SETUP'), os.getcwd(), sys.version_info[0])\n"
              "sys.stderr.write('to stderr\\n')\nsys.exit(3)\n")
    with ssh.connect(entry.host) as conn:
        result = bootstrap.run_program(conn, entry, source, request={"word": "hello"})
    assert result.stdout.decode().split() == ["hello", "1", "/tmp", "3"]
    assert result.stderr.decode().strip().endswith("to stderr")
    assert result.exit_status == 3


def test_a_program_that_never_ends_is_stopped_at_its_timeout(sshd: SSHServer, remote_python: Path) -> None:
    entry = kernel_entry(sshd, remote_python, "program")
    began = time.monotonic()
    with ssh.connect(entry.host) as conn:
        result = bootstrap.run_program(conn, entry, "import time\nprint('started', flush=True)\ntime.sleep(600)\n",
                                       timeout=2)
    assert time.monotonic() - began < 10
    assert result.exit_status is None and result.stdout == b"started\n"


"""A full remote /tmp (issue 16 item 4), and `runtime_dir`, the way out.

The remote side is an sshd started in a mount namespace of its own (unshare --mount) with a
small tmpfs over a short directory that its logins use as TMPDIR, so the kernel's files live on a
disk that can be filled without touching this machine's /tmp. The test process does not see that
tmpfs (another namespace): the kernel fills it from inside.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sshd as sshd_module
from launch_helpers import (
    connect_client,
    execute,
    kernel_entry,
    kernel_facts,
    launched_cli,
    wait_until,
    write_spec,
)
from sshd import SSHServer

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]

TMPFS_SIZE = "4m"
FILL = """
import os
path = os.path.join(os.environ["TMPDIR"], "filler")
try:
    with open(path, "wb") as handle:
        while True:
            handle.write(b"x" * 65536)
            handle.flush()
except OSError as exc:
    print("full:", exc.errno)
"""


@pytest.fixture
def short_dirs() -> Iterator[list[Path]]:
    """Two directories with short paths (the agent refuses bases over 40 characters)."""
    made = [Path(tempfile.mkdtemp(prefix="rk-", dir="/tmp")) for _ in range(2)]
    try:
        yield made
    finally:
        for path in made:
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def tmpfs_sshd(sshd_factory: Any, short_dirs: list[Path], monkeypatch: pytest.MonkeyPatch,
               tmp_path: Path) -> SSHServer:
    """An sshd whose logins have TMPDIR on a 4 MiB tmpfs that only its mount namespace sees."""
    if not shutil.which("unshare") or os.geteuid() != 0:
        message = "needs unshare(1) and root for a private mount namespace"
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    tmpfs, other = short_dirs
    wrapper = tmp_path / "sshd-in-namespace"
    wrapper.write_text(
        "#!/bin/sh\n"
        "exec unshare --mount --propagation private /bin/sh -c "
        f"'mount -t tmpfs -o size={TMPFS_SIZE},mode=1777 rk-test \"$0\" && exec {sshd_module.SSHD_BIN} \"$@\"' "
        f"{tmpfs} \"$@\"\n"
    )
    wrapper.chmod(0o755)
    monkeypatch.setattr(sshd_module, "SSHD_BIN", wrapper)
    server: SSHServer = sshd_factory(extra_config=f"SetEnv TMPDIR={tmpfs} RK_OTHER={other}")
    return server


@contextlib.contextmanager
def served(server: SSHServer, python: Path, tmp_path: Path, name: str, **fields: Any) -> Iterator[Any]:
    entry = kernel_entry(server, python, name, host=server.host_entry(name="fixture", keepalive=1.0), **fields)
    spec = write_spec(entry)
    connection_file = tmp_path / f"{name}.json"
    with launched_cli(["from-spec", str(spec), "-f", str(connection_file)],
                      stderr_path=tmp_path / f"{name}.stderr") as launcher:
        yield launcher, connection_file


def test_a_full_tmp_and_a_dropped_connection_leave_the_kernel_running(
    tmpfs_sshd: SSHServer, remote_python: Path, tmp_path: Path, short_dirs: list[Path]
) -> None:
    with served(tmpfs_sshd, remote_python, tmp_path, "full") as (launcher, connection_file):
        assert wait_until(connection_file.exists, timeout=30), launcher.stderr
        kc = connect_client(connection_file, launcher=launcher)
        try:
            facts = kernel_facts(kc)
            assert facts.remote_dir.parent.parent == short_dirs[0]  # on the tmpfs
            assert execute(kc, FILL, timeout=60).stdout.strip() == "full: 28"  # ENOSPC
            for pid in tmpfs_sshd.session_pids():  # the agent rewrites agent.json on every detach
                os.kill(pid, signal.SIGKILL)
            assert execute(kc, "print(6 * 7)", timeout=60).stdout.strip() == "42"
            assert kernel_facts(kc).pid == facts.pid
        finally:
            kc.stop_channels()

        # A second kernel on the full disk says where and what to do.
        with served(tmpfs_sshd, remote_python, tmp_path, "nospace") as (second, _):
            assert second.wait(timeout=60) == 1
        assert str(short_dirs[0]) in second.stderr and "runtime_dir" in second.stderr, second.stderr
        assert "No space left on device" in second.stderr, second.stderr


def test_runtime_dir_puts_the_kernel_files_elsewhere_with_variables_expanded_remotely(
    tmpfs_sshd: SSHServer, remote_python: Path, tmp_path: Path, short_dirs: list[Path]
) -> None:
    with served(tmpfs_sshd, remote_python, tmp_path, "elsewhere", runtime_dir="$RK_OTHER") as (launcher, path):
        assert wait_until(path.exists, timeout=30), launcher.stderr
        kc = connect_client(path, launcher=launcher)
        try:
            facts = kernel_facts(kc)
            assert facts.remote_dir.parent == short_dirs[1] / f"remote-kernel-{os.getuid()}"
            for pid in tmpfs_sshd.session_pids():  # a reattach finds it there
                os.kill(pid, signal.SIGKILL)
            assert execute(kc, "print(6 * 7)", timeout=60).stdout.strip() == "42"
        finally:
            kc.stop_channels()


@pytest.mark.parametrize(("runtime_dir", "message"), [
    ("$RK_NOT_SET/kernels", "$RK_NOT_SET is not set on this host"),
    ("/tmp/" + "d" * 40, "may be at most 40"),
    ("relative/dir", "not an absolute path"),
])
def test_a_runtime_dir_that_cannot_work_is_refused_saying_why(
    tmpfs_sshd: SSHServer, remote_python: Path, tmp_path: Path, runtime_dir: str, message: str
) -> None:
    with served(tmpfs_sshd, remote_python, tmp_path, "refused", runtime_dir=runtime_dir) as (launcher, _):
        assert launcher.wait(timeout=60) == 1
    assert message in launcher.stderr and "runtime_dir" in launcher.stderr, launcher.stderr
    assert "Traceback" not in launcher.stderr

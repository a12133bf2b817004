"""Spare kernels (issue 14): after a kernel of an entry starts through the per-user service, the
service starts one more of that entry ahead (imports done, no connection file, no code run); the
next start of the entry takes it.

Real components: the service as a launch starts it, the private OpenSSH sshd, real ipykernel,
jupyter_client's KernelManager. The spare's kernel is found by its marker in /proc/*/cmdline
(the "remote" host is this machine).
"""

from __future__ import annotations

import json
import os
import platform
import socket
import time
from pathlib import Path

import pytest
from launch_helpers import (
    execute,
    interrupted_cell,
    kernel_entry,
    kernel_facts,
    remote_base_dir,
    run_cli,
    single_kernel_config,
    started_kernel,
    wait_until,
    write_spec,
)
from sshd import SSHServer

from remote_kernel import bootstrap
from remote_kernel.service import testing

pytestmark = pytest.mark.slow

SPARE_WAIT = 60.0  # a spare is made in the background: its imports take ~1 s on a quiet machine


@pytest.fixture(autouse=True)
def service_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REMOTE_KERNEL_SERVICE", "on")  # conftest stops the service after each test


def stop_service() -> None:
    testing.stop_service(Path(os.environ["XDG_RUNTIME_DIR"]) / "remote-kernel")


def spare_pids(name: str) -> list[int]:
    """Processes of this uid started as a spare kernel of entry ``name`` (waiting or taken)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if proc.stat().st_uid != os.getuid():
                continue
            words = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        program = words[2] if len(words) > 2 and words[1] == b"-c" else b""
        if program.startswith(b"# " + bootstrap.SPARE_MARKER.encode()) and f"RK_TEST_ENTRY={name}".encode() in environ:
            found.append(int(proc.name))
    return sorted(found)


READ_SYSCALL = {"x86_64": "0", "aarch64": "63"}[platform.machine()]


def waiting_for_its_start(pid: int) -> bool:
    """The spare's imports are done: it blocks in read(0, ...) (/proc/PID/syscall: number, first argument)."""
    try:
        return (Path("/proc") / str(pid) / "syscall").read_text().split()[:2] == [READ_SYSCALL, "0x0"]
    except OSError:
        return False


def service_spares() -> list[dict]:
    result = run_cli(["--json", "service", "status"])
    assert result.returncode == 0, result.stderr
    return list(json.loads(result.stdout)["spares"])


def spare_dirs() -> set[Path]:
    """k-* directories whose agent.json says a spare waits there."""
    found = set()
    for path in remote_base_dir().glob("k-*/agent.json"):
        try:
            if json.loads(path.read_text()).get("state") == "spare":
                found.add(path.parent)
        except (OSError, ValueError):
            continue
    return found


def test_the_next_start_of_an_entry_takes_the_spare_and_behaves_as_a_plain_start(
        sshd: SSHServer, remote_python: Path, tmp_path: Path) -> None:
    write_spec(kernel_entry(sshd, remote_python, "sparing", env={"RK_TEST_ENTRY": "sparing"}))
    with started_kernel("sparing") as (_km1, kc1):
        first = kernel_facts(kc1)
        assert wait_until(lambda: len(spare_pids("sparing")) == 1 and service_spares(), timeout=SPARE_WAIT), \
            "no spare kernel was started after the first"
        [waiting] = spare_pids("sparing")
        assert waiting != first.pid
        assert spare_dirs(), "the spare's directory has no record for ps/gc"
        # ps shows it as a spare (not an orphan); gc leaves it alone.
        config = single_kernel_config(tmp_path / "rk.toml", sshd, "sparing", remote_python)
        ps = run_cli(["--config", str(config), "--json", "ps"])
        assert ps.returncode == 0, ps.stderr
        assert [row["state"] for row in json.loads(ps.stdout)["kernels"] if row["kernel_pid"] == waiting] == ["spare"]
        gc = run_cli(["--config", str(config), "--json", "gc", "--dry-run"])
        assert gc.returncode == 0, gc.stderr
        assert not [a for a in json.loads(gc.stdout)["actions"] if Path(a.get("dir") or "/") in spare_dirs()], gc.stdout
        with started_kernel("sparing") as (km2, kc2):
            second = kernel_facts(kc2)
            assert second.pid == waiting  # the spare's process is the new kernel
            assert second.connection_file.parent != first.connection_file.parent
            # What the kernel sees is what `python -m ipykernel_launcher -f FILE` shows.
            argv = execute(kc2, "import sys; print(sys.argv[0].rsplit('/', 1)[-1], sys.argv[1:])").stdout.strip()
            assert argv == f"ipykernel_launcher.py ['-f', '{second.connection_file}']"
            assert execute(kc2, "import os; os.getcwd() in __import__('sys').path or '' in __import__('sys').path"
                           ).result == "True"
            assert execute(kc2, "1+1").result == "2"
            # Interrupt (signal mode: SIGINT to the kernel's process group) works as for any kernel.
            assert interrupted_cell(km2, kc2).ename == "KeyboardInterrupt"
            # The next spare is made after this start.
            assert wait_until(lambda: len(spare_pids("sparing")) == 2, timeout=SPARE_WAIT)
    # The service stops -> the waiting spare ends, its directory too.
    stop_service()
    assert wait_until(lambda: not spare_pids("sparing"), timeout=30), spare_pids("sparing")
    assert wait_until(lambda: not spare_dirs(), timeout=30), spare_dirs()


def test_a_package_installed_after_the_spare_was_made_is_seen_by_the_kernel_that_takes_it(
        sshd: SSHServer, remote_python: Path, tmp_path: Path) -> None:
    """A directory on sys.path changed since the spare's imports: it runs a plain start instead."""
    packages = tmp_path / "site"
    packages.mkdir()
    write_spec(kernel_entry(sshd, remote_python, "fresh",
                            env={"RK_TEST_ENTRY": "fresh", "PYTHONPATH": str(packages)}))
    with started_kernel("fresh") as (_km1, kc1):
        first = kernel_facts(kc1)
        assert wait_until(lambda: len(spare_pids("fresh")) == 1, timeout=SPARE_WAIT)
        [waiting] = spare_pids("fresh")
        assert waiting != first.pid
        assert wait_until(lambda: waiting_for_its_start(waiting), timeout=SPARE_WAIT)  # imports done
        (packages / "rk_fresh_module.py").write_text("VALUE = 'new'\n")
        with started_kernel("fresh") as (_km2, kc2):
            second = kernel_facts(kc2)
            assert second.pid == waiting  # the same process, exec'd as a plain kernel
            cmdline = execute(kc2, "print(open('/proc/self/cmdline','rb').read().split(b'\\0')[1:3])").stdout
            assert "b'-m', b'ipykernel_launcher'" in cmdline
            assert execute(kc2, "import rk_fresh_module; rk_fresh_module.VALUE").result == "'new'"


def test_spare_kernel_false_makes_no_spare(sshd: SSHServer, remote_python: Path) -> None:
    write_spec(kernel_entry(sshd, remote_python, "nospare", env={"RK_TEST_ENTRY": "nospare"}, spare_kernel=False))
    with started_kernel("nospare") as (_km, kc):
        assert execute(kc, "1+1").result == "2"
        time.sleep(3.0)  # a spare would have been started by now (it is started right after ready)
        assert spare_pids("nospare") == []
        assert service_spares() == []


def test_a_start_that_fails_before_it_takes_the_spare_ends_the_spare(
        sshd: SSHServer, remote_python: Path, tmp_path: Path) -> None:
    """A port of the connection file is taken: the start fails locally; its spare does not linger."""
    write_spec(kernel_entry(sshd, remote_python, "failing", env={"RK_TEST_ENTRY": "failing"}))
    with started_kernel("failing") as (km1, _kc1):
        assert wait_until(lambda: len(spare_pids("failing")) == 1, timeout=SPARE_WAIT)
        busy = socket.socket()
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        info = json.loads(Path(km1.connection_file).read_text())
        info["shell_port"] = busy.getsockname()[1]
        taken = tmp_path / "kernel-taken.json"
        taken.write_text(json.dumps(info))
        try:
            result = run_cli(["from-spec", "failing", "-f", str(taken)], timeout=60)
        finally:
            busy.close()
        assert result.returncode != 0
        assert "in use" in result.stderr or "taken" in result.stderr, result.stderr
        assert wait_until(lambda: not spare_pids("failing"), timeout=30), spare_pids("failing")


def test_a_changed_entry_never_takes_the_old_spare_and_the_old_spare_ends(
        sshd: SSHServer, remote_python: Path) -> None:
    write_spec(kernel_entry(sshd, remote_python, "changing", env={"RK_TEST_ENTRY": "changing", "V": "1"}))
    with started_kernel("changing") as (_km, _kc):
        assert wait_until(lambda: len(spare_pids("changing")) == 1, timeout=SPARE_WAIT)
    [old_spare] = spare_pids("changing")
    write_spec(kernel_entry(sshd, remote_python, "changing", env={"RK_TEST_ENTRY": "changing", "V": "2"}))
    with started_kernel("changing") as (_km, kc):
        assert execute(kc, "import os; os.environ['V']").result == "'2'"
        assert kernel_facts(kc).pid != old_spare
        # the new entry's spare replaces the old one: one spare of the name at a time
        assert wait_until(lambda: len(spare_pids("changing")) == 1 and old_spare not in spare_pids("changing"),
                          timeout=SPARE_WAIT), spare_pids("changing")
        assert len(service_spares()) == 1

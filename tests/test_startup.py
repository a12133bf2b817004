"""The start of a kernel: setup lines (slow, endless, reading stdin), startup_timeout as the one
bound on the whole start, a kernel that ends before it is ready, and nothing left behind on the
remote host when a start fails. Real sshd, real ipykernel, the real launcher as Jupyter runs it."""

from __future__ import annotations

import os
import pty
import re
import secrets
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import IsolatedEnv
from launch_helpers import (
    connect_client,
    execute,
    kernel_entry,
    kernel_facts,
    launched_cli,
    remote_agents,
    run_cli,
    started_kernel,
    wait_remote_gone,
    wait_until,
    write_spec,
)
from sshd import SSHServer

pytestmark = pytest.mark.slow


def _processes_with(marker: str) -> list[str]:
    """Processes whose command line contains ``marker`` (a number only this test uses)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            found.append(f"{entry.name}: {cmdline.strip()}")
    return found


def _agents_named(name: str) -> list[dict[str, object]]:
    """Remote agents of entry ``name`` still alive (other tests share the base directory)."""
    return [a for a in remote_agents() if a.get("name") == name and (a["agent_alive"] or a["kernel_alive"])]


def _unique_seconds() -> str:
    """A sleep length no other process on the machine uses, so its processes can be found."""
    return str(1_000_000 + secrets.randbelow(8_000_000))


def _launch_and_fail(name: str, tmp_path: Path, timeout: float) -> tuple[float, str, int]:
    began = time.monotonic()
    result = run_cli(["from-spec", name, "-f", str(tmp_path / "kernel.json")], timeout=timeout)
    return time.monotonic() - began, result.stderr, result.returncode


def test_endless_setup_fails_at_startup_timeout_naming_it_and_leaves_nothing_running(
    sshd: SSHServer, remote_python: Path, tmp_path: Path
) -> None:
    seconds = _unique_seconds()
    entry = kernel_entry(sshd, remote_python, "endless-setup", startup_timeout=6,
                         setup=[f"sleep {seconds}", f"sh -c 'sleep {seconds}; echo child'"])
    write_spec(entry)
    elapsed, stderr, code = _launch_and_fail(entry.name, tmp_path, timeout=60)
    assert code == 1, stderr
    assert elapsed < 6 + 5, f"took {elapsed:.1f} s:\n{stderr}"
    assert "setup lines still running after 6 s" in stderr and "startup_timeout" in stderr, stderr
    assert f"sleep {seconds}" in stderr  # the message names the lines
    assert "Traceback" not in stderr
    assert wait_until(lambda: not _processes_with(seconds), timeout=5), _processes_with(seconds)
    assert _agents_named(entry.name) == []


def test_a_setup_slower_than_the_old_50_s_link_check_starts_when_startup_timeout_allows_it(
    sshd: SSHServer, remote_python: Path
) -> None:
    entry = kernel_entry(sshd, remote_python, "slow-setup", startup_timeout=120, setup=["sleep 70"])
    write_spec(entry)
    with started_kernel(entry.name, ready_timeout=130) as (_, kc):
        assert execute(kc, "1+1").result == "2"
        facts = kernel_facts(kc)
    assert wait_remote_gone(facts) == []


@pytest.mark.parametrize("line", ["cat >/dev/null", "read x", "head -c 100 >/dev/null; cat >&2 </dev/stdin"])
def test_a_setup_line_that_reads_stdin_does_not_break_the_launch(
    sshd: SSHServer, remote_python: Path, line: str
) -> None:
    entry = kernel_entry(sshd, remote_python, "stdin-setup", setup=[line])
    write_spec(entry)
    with started_kernel(entry.name) as (_, kc):
        assert execute(kc, "21*2").result == "42"


def test_startup_timeout_also_bounds_a_kernel_that_never_opens_its_sockets(
    sshd: SSHServer, remote_python: Path, tmp_path: Path
) -> None:
    seconds = _unique_seconds()
    entry = kernel_entry(sshd, remote_python, "never-ready", startup_timeout=3,
                         command=["{python}", "-c", f"import time; time.sleep({seconds})"])
    write_spec(entry)
    elapsed, stderr, code = _launch_and_fail(entry.name, tmp_path, timeout=60)
    assert code == 1 and elapsed < 3 + 5, (elapsed, stderr)
    assert "startup_timeout" in stderr and "Traceback" not in stderr, stderr
    assert wait_until(lambda: not _processes_with(seconds), timeout=8), _processes_with(seconds)
    assert wait_until(lambda: not _agents_named(entry.name), timeout=8), _agents_named(entry.name)


def test_a_kernel_that_exits_0_before_it_is_ready_is_reported(
    sshd: SSHServer, remote_python: Path, tmp_path: Path
) -> None:
    entry = kernel_entry(sshd, remote_python, "exits-zero", command=["{python}", "-c", "print('bye')"])
    write_spec(entry)
    _, stderr, code = _launch_and_fail(entry.name, tmp_path, timeout=60)
    assert code == 1, stderr
    assert "exited with code 0 before it was ready" in stderr, stderr
    assert "command" in stderr  # the hint says what to check


def test_a_kernel_that_fails_prints_its_stderr_once_and_caps_a_long_one(
    sshd: SSHServer, remote_python: Path, tmp_path: Path, isolated_env: IsolatedEnv
) -> None:
    code_text = "import sys\nfor i in range(120): print(f'usage line {i}', file=sys.stderr)\nsys.exit(2)"
    entry = kernel_entry(sshd, remote_python, "noisy-fail", command=["{python}", "-c", code_text])
    write_spec(entry)
    _, stderr, code = _launch_and_fail(entry.name, tmp_path, timeout=60)
    assert code == 1, stderr
    for line in ("usage line 0", "usage line 119"):
        assert stderr.count(line + "\n") == 1, f"{line!r} not exactly once:\n{stderr}"
    assert "usage line 70\n" not in stderr  # neither live (capped) nor in the error's tail
    log_file = isolated_env.jupyter_runtime / "remote-kernel" / "noisy-fail.stderr.log"
    assert str(log_file) in stderr, stderr
    assert "usage line 70" in log_file.read_text()
    assert log_file.stat().st_mode & 0o777 == 0o600


# --- what a start says while it works --------------------------------------------------------------


def test_under_jupyter_a_start_logs_its_steps_with_time_and_kernel_name_without_v(
    sshd: SSHServer, remote_python: Path, tmp_path: Path
) -> None:
    entry = kernel_entry(sshd, remote_python, "says-steps", setup=["true"])
    write_spec(entry)
    with launched_cli(["from-spec", entry.name, "-f", str(tmp_path / "k.json")],
                      stderr_path=tmp_path / "stderr.txt") as launcher:
        assert wait_until(lambda: "ready in" in launcher.stderr, timeout=60), launcher.stderr
    lines = launcher.stderr.splitlines()
    steps = [line for line in lines if " INFO " in line and "[says-steps]" in line]
    texts = " | ".join(steps)
    for step in ("connecting to", "connected to", "running 1 setup line", "setup done after", "ready in"):
        assert step in texts, texts
    assert re.search(r"^\d\d:\d\d:\d\d INFO +\[says-steps\] ready in [\d.]+ s: kernel pid \d+", launcher.stderr, re.M)


def test_remote_kernel_log_warning_keeps_a_start_quiet(sshd: SSHServer, remote_python: Path, tmp_path: Path) -> None:
    entry = kernel_entry(sshd, remote_python, "quiet-start")
    write_spec(entry)
    env = {**os.environ, "REMOTE_KERNEL_LOG": "warning"}
    launcher = launch_cli_env(["from-spec", entry.name, "-f", str(tmp_path / "k.json")], tmp_path / "err.txt", env)
    try:
        assert wait_until(lambda: (tmp_path / "k.json").exists() and _kernel_answers(tmp_path / "k.json"),
                          timeout=60)
    finally:
        launcher.terminate()
        launcher.wait(timeout=20)
    assert " INFO " not in (tmp_path / "err.txt").read_text()


def test_on_a_terminal_a_start_shows_one_status_line_and_prints_ready(
    sshd: SSHServer, remote_python: Path, tmp_path: Path
) -> None:
    entry = kernel_entry(sshd, remote_python, "tty-start", setup=["sleep 2"])
    write_spec(entry)
    pid, fd = pty.fork()
    if pid == 0:  # the child: the launcher on a terminal
        argv = [sys.executable, "-m", "remote_kernel", "from-spec", entry.name, "-f", str(tmp_path / "k.json")]
        os.execvpe(sys.executable, argv, {**os.environ, "TERM": "xterm"})  # noqa: S606 - our own argv
    output = b""
    deadline = time.monotonic() + 60
    try:
        while b"ready in" not in output and time.monotonic() < deadline:
            readable, _, _ = select.select([fd], [], [], 0.5)
            if readable:
                try:
                    output += os.read(fd, 65536)
                except OSError:
                    break
    finally:
        os.kill(pid, signal.SIGTERM)
        os.waitpid(pid, 0)
        os.close(fd)
    text = output.decode(errors="replace")
    assert "[tty-start] running 1 setup line (1 s)" in text, text  # the status line counts seconds
    assert "[tty-start] ready in" in text, text
    assert " INFO " not in text  # steps are the status line, not log lines


def test_a_failed_start_under_jupyter_names_the_time_and_kernel_in_its_error(
    sshd: SSHServer, python_without_ipykernel: Path, tmp_path: Path
) -> None:
    entry = kernel_entry(sshd, python_without_ipykernel, "no-ipykernel")
    write_spec(entry)
    _, stderr, code = _launch_and_fail(entry.name, tmp_path, timeout=60)
    assert code == 1
    error_line = r"^\d\d:\d\d:\d\d ERROR +\[no-ipykernel\] remote-kernel: error: cannot start kernel"
    assert re.search(error_line, stderr, re.M), stderr
    assert stderr.count("No module named ipykernel") == 1, stderr


def launch_cli_env(args: list[str], stderr_path: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with stderr_path.open("w") as err:
        return subprocess.Popen([sys.executable, "-m", "remote_kernel", *args], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=err, env=env, start_new_session=True)


def _kernel_answers(connection_file: Path) -> bool:
    try:
        kc = connect_client(connection_file, ready_timeout=10)
    except Exception:  # not up yet
        return False
    kc.stop_channels()
    return True

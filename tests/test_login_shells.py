"""A kernel starts whatever the remote login shell is: sh, bash, dash, zsh, tcsh, csh, fish.

sshd runs the exec request with the user's login shell, so the request must parse in all of
them (tcsh is common on HPC accounts). Each case is a real OS user with that login shell, logging
in to the real test sshd, running `setup` lines (POSIX sh, as the README says) and a real
ipykernel from a Python every user can run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from launch_helpers import execute, kernel_entry, kernel_facts, started_kernel, wait_remote_gone, write_spec
from os_users import OSUser, os_users_fixture, require_user_creation
from sshd import SSHServer

from remote_kernel.entry import HostEntry

__all__ = ["os_users_fixture"]  # the fixture is used by name

pytestmark = pytest.mark.slow

SHELLS = ["/bin/sh", "/bin/bash", "/bin/dash", "/usr/bin/zsh", "/usr/bin/tcsh", "/usr/bin/csh", "/usr/bin/fish"]
VENV_TIMEOUT = 300


def _require(condition: bool, reason: str) -> None:
    if condition:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI is set, so the login-shell tests must run", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def shared_python() -> Iterator[Path]:
    """A Python with ipykernel that every user can run: a venv of the system Python in a 0755
    directory (the test's own interpreter may sit under a private /root)."""
    system_python = shutil.which("python3", path="/usr/bin:/usr/local/bin")
    _require(system_python is not None, "no system python3 under /usr/bin (apt-get install python3-venv)")
    assert system_python is not None
    base = Path(tempfile.mkdtemp(prefix="rktest-venv-"))
    base.chmod(0o755)
    venv = base / "venv"
    try:
        made = subprocess.run([system_python, "-m", "venv", str(venv)], capture_output=True, text=True,
                              timeout=VENV_TIMEOUT, check=False)
        _require(made.returncode == 0, f"cannot make a venv with {system_python}: {made.stderr.strip()[-300:]}")
        installed = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "ipykernel"],
                                   capture_output=True, text=True, timeout=VENV_TIMEOUT, check=False)
        assert installed.returncode == 0, installed.stderr[-2000:]
        yield venv / "bin" / "python"
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def users_by_shell(os_users: Callable[..., OSUser]) -> dict[str, OSUser]:
    require_user_creation()
    missing = [shell for shell in SHELLS if not Path(shell).is_file()]
    _require(not missing, f"login shells not installed: {', '.join(missing)} (apt-get install tcsh csh zsh fish)")
    return {shell: os_users(shell) for shell in SHELLS}


@pytest.fixture(scope="session")
def shells_sshd(tmp_path_factory: pytest.TempPathFactory, users_by_shell: dict[str, OSUser]) -> Iterator[SSHServer]:
    """An sshd that lets every test user in with the fixture's client key. Each login keeps its own
    home (from passwd). sshd reads authorized_keys as the user, so the file sits in a 0755 directory
    outside pytest's private temp dir (the private key stays 0600 there); PAM is on because useradd
    leaves the accounts locked."""
    keys = Path(tempfile.mkdtemp(prefix="rktest-keys-"))
    keys.chmod(0o755)
    server = SSHServer(tmp_path_factory.mktemp("sshd-shells"), isolated_home=False,
                       extra_config=f"UsePAM yes\nAuthorizedKeysFile {keys / 'authorized_keys'}")
    server.user = " ".join(user.name for user in users_by_shell.values())
    try:
        server.start()
        shutil.copyfile(server.authorized_keys, keys / "authorized_keys")
        (keys / "authorized_keys").chmod(0o644)
        yield server
    finally:
        server.stop()
        shutil.rmtree(keys, ignore_errors=True)


@pytest.mark.parametrize("shell", SHELLS, ids=[Path(shell).name for shell in SHELLS])
def test_a_kernel_starts_runs_setup_and_stops_cleanly_whatever_the_login_shell(
    shell: str, users_by_shell: dict[str, OSUser], shells_sshd: SSHServer, shared_python: Path
) -> None:
    user = users_by_shell[shell]
    host = HostEntry(name=f"as-{user.name}", hostname=shells_sshd.host, port=shells_sshd.port, user=user.name,
                     identity_file=str(shells_sshd.client_key), known_hosts=str(shells_sshd.known_hosts))
    setup = ["RK_SETUP_RAN=yes; export RK_SETUP_RAN", "read ignored_line; cd \"$HOME\""]
    entry = kernel_entry(shells_sshd, shared_python, f"shell-{Path(shell).name}", host=host, setup=setup,
                         env={"RK_ENTRY_ENV": "kept"})
    write_spec(entry)
    code = "import os; print(os.getuid(), os.environ.get('RK_SETUP_RAN'), os.environ.get('RK_ENTRY_ENV'), os.getcwd())"
    with started_kernel(entry.name) as (_, kc):
        uid, setup_ran, entry_env, cwd = execute(kc, code).stdout.split()
        facts = kernel_facts(kc)
    assert (int(uid), setup_ran, entry_env, cwd) == (user.uid, "yes", "kept", str(user.home))
    assert wait_remote_gone(facts) == []


def test_the_exec_request_has_no_syntax_a_login_shell_could_misread() -> None:
    """No newline inside quotes (csh), no backslash or '!' (fish, csh history), one line per shell."""
    from remote_kernel import bootstrap
    from remote_kernel.entry import KernelEntry

    entry = KernelEntry(name="k", host=HostEntry(name="h"), display_name="k", setup=("echo 'a\\b' \"!x\"",),
                        cwd="~/it's here", python=sys.executable)
    request = bootstrap.remote_command(entry, payload_size=123).exec
    assert "\\" not in request and "!" not in request
    for line in request.splitlines():
        assert line.count("'") % 2 == 0 and line.count('"') % 2 == 0, line
    assert b"echo 'a\\b'" in bootstrap.remote_command(entry, payload_size=123).script

"""Throw-away local OS users for tests that need a second person on the machine.

Import ``os_users_fixture`` / ``os_user_fixture`` into a test module (or list this module in
``pytest_plugins``) to use the fixtures ``os_users`` and ``os_user``.

``create_user(shell)`` makes a real account with ``useradd`` (a name ``rktest-<hex>``, its own
group, a home under a 0755 directory of the system temp dir, the given login shell) and
``delete_user`` removes it with ``userdel -r``. The ``os_users`` fixture hands out a factory and
deletes every user it made at the end of the session; ``os_user`` is one ``/bin/sh`` user.

Creating users needs root. Outside CI a test that needs one is skipped without root (or without
useradd); with CI=1 that is a failure, because the test is then not run where it must be.

``run_python_as(user, code)`` runs a stdlib-only snippet as the user: a child with the user's uid,
gid and no supplementary groups (so no capability and nothing of ours), under a Python the user can
execute (the test's own interpreter may sit under a private /root/.pyenv).

The homes are not under pytest's basetemp: that is 0700 root-owned, and a user (or sshd reading
its authorized_keys as that user) must be able to reach its home.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

NAME_PREFIX = "rktest-"
LOCK_RETRIES = 40  # useradd fails (does not wait) while another useradd holds /etc/passwd's lock
COMMAND_TIMEOUT = 60.0


@dataclass(frozen=True)
class OSUser:
    name: str
    uid: int
    gid: int
    home: Path
    shell: str


def missing_requirement() -> str | None:
    """Why users cannot be created here, or None."""
    if os.geteuid() != 0:
        return "needs root to create a second OS user with useradd (CI runs the tests as root)"
    for tool in ("useradd", "userdel"):
        if shutil.which(tool) is None:
            return f"{tool} not found (apt-get install passwd)"
    return None


def require_user_creation() -> None:
    """Skip the calling test where users cannot be created; fail instead under CI=1."""
    reason = missing_requirement()
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI is set, so tests that need a second OS user must run", pytrace=False)
    pytest.skip(reason)


def homes_directory() -> Path:
    """A fresh 0755 directory for homes (every path component must be traversable by the user)."""
    base = Path(tempfile.mkdtemp(prefix="rktest-homes-"))
    base.chmod(0o755)
    return base


def create_user(shell: str = "/bin/sh", *, homes: Path | None = None) -> OSUser:
    """A new local user with its own group, a 0700 home under ``homes`` and ``shell`` as login shell."""
    if not Path(shell).is_file():
        raise FileNotFoundError(f"login shell {shell} is not installed")
    name = f"{NAME_PREFIX}{secrets.token_hex(4)}"
    home = (homes or homes_directory()) / name
    _run_locked(["useradd", "--create-home", "--home-dir", str(home), "--shell", shell, "--user-group", name])
    entry = pwd.getpwnam(name)
    return OSUser(name=name, uid=entry.pw_uid, gid=entry.pw_gid, home=home, shell=shell)


def delete_user(user: OSUser) -> None:
    """Remove the account, its group and its home; first end whatever still runs as it (a login
    session of an sshd test): userdel refuses a user with processes."""
    _kill_processes_of(user.uid)
    _run_locked(["userdel", "--remove", user.name], ok_codes=(0, 6, 12))  # 6: no such user, 12: no home
    shutil.rmtree(user.home, ignore_errors=True)


def _kill_processes_of(uid: int) -> None:
    """SIGKILL every process whose real uid is ``uid`` (only throw-away users of ours reach here)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    os.kill(int(entry.name), 9)
            except (OSError, ValueError):
                continue


def _run_locked(argv: list[str], ok_codes: tuple[int, ...] = (0,)) -> None:
    """Run a user-database command, retrying while another one (a parallel test) holds the lock."""
    result = None
    for _ in range(LOCK_RETRIES):
        result = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False)
        if result.returncode in ok_codes or "lock" not in result.stderr.lower():
            break
        time.sleep(0.25)
    assert result is not None
    if result.returncode not in ok_codes:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")


def python_for_other_users() -> str:
    """A Python 3 interpreter every user may execute (the running one, if it is world-executable)."""
    candidates = [sys.executable, "/usr/bin/python3", "/usr/local/bin/python3", shutil.which("python3") or ""]
    for candidate in candidates:
        if candidate and _world_executable(Path(candidate)):
            return candidate
    raise FileNotFoundError("no Python 3 that another user can execute (install python3 under /usr/bin)")


def _world_executable(path: Path) -> bool:
    """Every directory on the way is o+x and the file is o+x (no user-specific access check)."""
    try:
        real = path.resolve(strict=True)
    except OSError:
        return False
    return all(part.stat().st_mode & 0o001 for part in [real, *real.parents])


def popen_python_as(user: OSUser, code: str) -> subprocess.Popen[str]:
    """Start ``python -c code`` as ``user`` (stdout/stderr piped, text mode); the caller waits."""
    env = {"HOME": str(user.home), "USER": user.name, "LOGNAME": user.name, "PATH": "/usr/bin:/bin",
           "LANG": "C.UTF-8"}
    return subprocess.Popen(
        [python_for_other_users(), "-I", "-c", code], user=user.uid, group=user.gid, extra_groups=[],
        env=env, cwd=str(user.home), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )


def run_python_as(user: OSUser, code: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run ``python -c code`` as ``user`` to completion (killed by PID after ``timeout``)."""
    proc = popen_python_as(user, code)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        raise AssertionError(f"python as {user.name} ran past {timeout} s:\n{stdout}\n{stderr}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.fixture(scope="session", name="os_users")
def os_users_fixture() -> Iterator[Callable[..., OSUser]]:
    """A factory ``make(shell="/bin/sh") -> OSUser``; every user it made is deleted at session end."""
    made: list[OSUser] = []
    homes: list[Path] = []

    def make(shell: str = "/bin/sh") -> OSUser:
        require_user_creation()
        if not homes:
            homes.append(homes_directory())
        user = create_user(shell, homes=homes[0])
        made.append(user)
        return user

    try:
        yield make
    finally:
        for user in made:
            delete_user(user)
        for directory in homes:
            shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(name="os_user")
def os_user_fixture(os_users: Callable[..., OSUser]) -> OSUser:
    """One throw-away ``/bin/sh`` user (deleted at session end)."""
    return os_users()

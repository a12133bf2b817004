"""Where the service lives: a 0700 directory of the user's own, the socket, lock, pid and log."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from remote_kernel.errors import RemoteKernelError

SOCKET_NAME = "service.sock"
SUN_PATH_MAX = 100  # sockaddr_un.sun_path is 104 (macOS) or 108 (Linux) bytes with its NUL


def runtime_dir() -> Path:
    """$XDG_RUNTIME_DIR/remote-kernel, else <Jupyter runtime dir>/remote-kernel-service."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and Path(base).is_dir():
        return Path(base) / "remote-kernel"
    from jupyter_core.paths import jupyter_runtime_dir

    return Path(jupyter_runtime_dir()) / "remote-kernel-service"


def private_dir(path: Path) -> Path:
    """``path`` as a directory only we can enter (made 0700; an existing one must be ours, 0700)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise RemoteKernelError(f"{path} is not a directory of user {os.getuid()}: the service will not use it",
                                hint="remove it, or point XDG_RUNTIME_DIR at a directory of yours")
    if info.st_mode & 0o077:
        os.chmod(path, 0o700)  # our own directory: tighten it rather than refuse
    return path


def socket_path(directory: Path) -> Path:
    """The socket in ``directory``; a deep directory (a Unix socket path is at most ~104 bytes)
    gets a short one in /tmp/rk-service-<uid> (0700), named after the directory."""
    path = directory / SOCKET_NAME
    if len(os.fsencode(path)) <= SUN_PATH_MAX:
        return path
    digest = hashlib.sha256(os.fsencode(directory)).hexdigest()[:16]
    return private_dir(Path(f"/tmp/rk-service-{os.getuid()}")) / f"{digest}.sock"  # noqa: S108 - 0700, ours


def lock_path(directory: Path) -> Path:
    return directory / "service.lock"


def pid_path(directory: Path) -> Path:
    return directory / "service.pid"


def log_path(directory: Path) -> Path:
    return directory / "service.log"

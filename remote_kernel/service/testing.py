"""Stopping a service by its pid file (test teardown, and `service stop` when it does not answer)."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

from remote_kernel.service import paths


def service_pid(directory: Path) -> int | None:
    """The pid of the service holding ``directory``'s pid lock, if one does."""
    import fcntl

    path = paths.pid_path(directory)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:  # held: the service is alive
            text = path.read_text().strip()
            return int(text) if text.isdigit() else None
        return None
    finally:
        os.close(fd)


def stop_service(directory: Path, timeout: float = 15.0) -> None:
    """SIGTERM the service of ``directory`` (its kernels shut down), SIGKILL after ``timeout``."""
    pid = service_pid(directory)
    if pid is None:
        _forget_socket(directory)
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 2.0)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if service_pid(directory) is None:
                _forget_socket(directory)
                return
            time.sleep(0.05)


def _forget_socket(directory: Path) -> None:
    """A killed service cannot remove its socket (a deep directory's lives in /tmp/rk-service-<uid>)."""
    with contextlib.suppress(OSError):
        paths.socket_path(directory).unlink()

"""Reaching the per-user service: connect, or start it (double fork, setsid) under a lock so two
launches never start two services; and the argv launcher's side of a hosted kernel."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from remote_kernel.errors import RemoteKernelError
from remote_kernel.service import paths
from remote_kernel.service.wire import Channel, ForeignPeer, WireError, dial
from remote_kernel.signals import STOP_SIGNALS

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 2.0
OLD_SERVICE_WAIT = 5.0  # a take-over waits this long for the dead service's process to be gone
START_TIMEOUT = 10.0  # the daemon imports the launcher stack (~0.3 s) before it listens


class ServiceUnavailable(RemoteKernelError):  # noqa: N818 - reads as a state, like HostKeyError's peers
    """The service cannot be reached (or started)."""


def connect(directory: Path | None = None, *, timeout: float = CONNECT_TIMEOUT) -> Channel:
    """A conversation with the running service; ServiceUnavailable when there is none."""
    directory = directory or paths.runtime_dir()
    path = paths.socket_path(directory)
    try:
        return Channel(dial(str(path), timeout))
    except ForeignPeer as exc:
        raise ServiceUnavailable(f"the socket {path} belongs to uid {exc.uid}, not to us: not using it",
                                 hint=f"remove {path}") from exc
    except OSError as exc:
        raise ServiceUnavailable(f"no service at {path}: {exc.strerror or exc}") from exc


def ensure(*, timeout: float = START_TIMEOUT) -> Channel:
    """The running service, started first if there is none (under the lock: one start at a time)."""
    directory = paths.private_dir(paths.runtime_dir())
    with contextlib.suppress(ServiceUnavailable):
        return connect(directory)
    with _locked(paths.lock_path(directory)):
        with contextlib.suppress(ServiceUnavailable):
            return connect(directory)  # another launch started it while we waited for the lock
        started = time.monotonic()
        if not _spawned_early():
            spawn()
        deadline = started + timeout
        while True:
            try:
                channel = connect(directory)
            except ServiceUnavailable:
                if time.monotonic() > deadline:
                    raise ServiceUnavailable(
                        f"the service did not start within {timeout:g} s; see {paths.log_path(directory)}"
                    ) from None
                time.sleep(0.02)
                continue
            log.debug("started the per-user service in %.2f s", time.monotonic() - started)
            return channel


def _spawned_early() -> bool:
    """This process started the service already (service/early.py), once: wait for it to listen."""
    early = sys.modules.get("remote_kernel.service.early")
    if early is None or not early.state.spawned:
        return False
    early.state.spawned = False
    return True


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def spawn() -> None:
    """``python -m remote_kernel service run`` as a daemon: double fork and setsid, so it belongs
    to no terminal, no Jupyter process group and no launcher (reparented to init); stdin/stdout/
    stderr are /dev/null (it logs to its own file)."""
    pid = os.fork()
    if pid:
        os.waitpid(pid, 0)
        return
    try:  # the child: nothing of the parent's may run here (no exceptions, no atexit)
        os.setsid()
        if os.fork():
            os._exit(0)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.chdir("/")
        argv = [sys.executable, "-m", "remote_kernel", "-q", "service", "run"]
        os.execv(sys.executable, argv)  # noqa: S606 - our own interpreter, fixed arguments
    finally:
        os._exit(127)


def request(op: str, *, start: bool = False, **fields: Any) -> dict[str, Any]:
    """One request, one answer (status, stop, logout, hello)."""
    channel = ensure() if start else connect()
    try:
        channel.send({"op": op, **fields})
        answer = channel.receive()
    except WireError as exc:
        raise ServiceUnavailable(f"the service answered nonsense: {exc}") from exc
    finally:
        channel.close()
    if answer is None:
        raise ServiceUnavailable("the service closed the conversation without an answer")
    return answer


def raise_error(event: dict[str, Any]) -> None:
    """An ``error`` event as the RemoteKernelError it was in the service (message, hint, exit code)."""
    from remote_kernel import errors

    kind = getattr(errors, str(event.get("type")), None)
    message, hint = str(event.get("message")), event.get("hint")
    if isinstance(kind, type) and issubclass(kind, errors.SSHError):
        raise kind(message, host=str(event.get("host") or ""), hint=hint)
    error = errors.RemoteKernelError(message, hint=hint)
    error.exit_code = int(event.get("exit_code") or errors.EXIT_FAILED)
    raise error


# ------------------------------------------------------------------------------ detached kernels


def converse(op: str, **fields: Any) -> dict[str, Any]:
    """A request whose answer may take a while (start, attach, stop a detached kernel): the
    service's log lines meanwhile are logged here (progress on the terminal); its one answer is
    returned, or raised when it is an error. Ctrl-C ends the conversation (the service stops a
    kernel whose start nobody waits for any more)."""
    from remote_kernel.service import askpass_env

    channel = ensure()
    try:
        channel.send({"op": op, "askpass": askpass_env(os.environ), "level": _log_level(), **fields})
        while True:
            try:
                event = channel.receive()
            except WireError as exc:
                raise ServiceUnavailable(f"the service answered nonsense: {exc}") from exc
            if event is None:
                where = paths.log_path(paths.runtime_dir())
                raise ServiceUnavailable(f"the per-user service ended before it answered; see {where}")
            if event.get("event") == "log":
                _relog(event)
                continue
            if event.get("event") == "error":
                raise_error(event)
            return event
    finally:
        channel.close()


def _relog(event: dict[str, Any]) -> None:
    logging.getLogger(str(event.get("logger"))).log(
        int(event.get("level") or logging.INFO), "%s", event.get("message"), extra={"final": bool(event.get("final"))})


# ------------------------------------------------------------------------------ hosted kernels


Announce = Callable[[Path, Any], None]


class HostedLaunch:
    """The argv launcher of a kernel the service hosts: it relays signals (SIGINT -> interrupt,
    SIGTERM/SIGHUP/SIGQUIT -> shut down), logs what the service says about the kernel, and exits
    with the kernel's exit code (an error naming the service when the service dies)."""

    def __init__(self, entry: Any, connection_file: Path | None, *, runtime_dir: Path,
                 announce: Announce | None = None) -> None:
        self.entry = entry
        self.connection_file = connection_file.absolute() if connection_file is not None else None
        self.runtime_dir = runtime_dir
        self.announce = announce
        self.channel: Channel | None = None
        self.ready: dict[str, Any] | None = None
        self.took_over = False

    def run(self) -> int:
        from remote_kernel.service import early

        self.channel = early.take(self.entry.to_dict(), self.connection_file)
        if self.channel is None:  # no head start (service/early.py): ask now
            self.channel = ensure()
            self.channel.send(self._request())
        previous = {signum: signal.signal(signum, self._on_signal) for signum in (signal.SIGINT, *STOP_SIGNALS)}
        try:
            return self._relay()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            self.channel.close()

    def _request(self) -> dict[str, Any]:
        from remote_kernel.service import askpass_env

        return {"op": "serve", "entry": self.entry.to_dict(), "pid": os.getpid(),
                "connection_file": str(self.connection_file) if self.connection_file else None,
                "runtime_dir": str(self.runtime_dir), "askpass": askpass_env(os.environ), "level": _log_level()}

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.channel is None:
            return
        if signum == signal.SIGINT:  # never die on SIGINT: it means "interrupt the cell"
            self.channel.send({"op": "signal", "signum": signum})
        else:
            self.channel.send({"op": "terminate"})

    def _relay(self) -> int:
        assert self.channel is not None  # noqa: S101 - set by run()
        while True:
            try:
                event = self.channel.receive()
            except WireError:
                event = None
            if event is None:
                if self._take_over():
                    continue
                return self._service_gone()
            kind = event.get("event")
            if kind == "log":
                _relog(event)
            elif kind == "ready":
                self._on_ready(event)
            elif kind == "exit":
                if event.get("message") is not None:
                    raise_error(event)
                return int(event.get("code") or 0)
            elif kind == "error":
                raise_error(event)

    def _take_over(self) -> bool:
        """The service died (SIGKILL, OOM) after the kernel was ready: ask a new one to take the
        kernel over, on the same connection file and ports (the clients reconnect by themselves).
        Once: if the new service dies too, the launcher ends with the error."""
        adopt = self.ready.get("adopt") if self.ready is not None else None
        if not isinstance(adopt, dict) or self.took_over or self.ready is None:
            return False
        self.took_over = True
        log.warning("the per-user service serving kernel %s ended; a new service takes the kernel over",
                    self.entry.name)
        if self.channel is not None:
            self.channel.close()
        try:
            wait_until_gone(paths.private_dir(paths.runtime_dir()), OLD_SERVICE_WAIT)
            self.channel = ensure()
            request = {**self._request(), "connection_file": str(self.ready["connection_file"]), "adopt": adopt}
            self.channel.send(request)
        except ServiceUnavailable as exc:
            log.warning("cannot take the kernel over: %s", exc.message)
            return False
        return True

    def _on_ready(self, event: dict[str, Any]) -> None:
        if self.took_over:  # the kernel is served again by a new service
            log.warning("kernel %s is served by the new per-user service; nothing was restarted", self.entry.name)
            return
        self.ready = event
        log.info("the per-user service hosts kernel %s; %s its connection to %s", self.entry.name,
                 "reused" if event.get("reused") else "opened", self.entry.host.label)
        if self.announce is not None:
            self.announce(Path(str(event["connection_file"])), self.entry)

    def _service_gone(self) -> int:
        """The service died (SIGKILL, OOM) and the kernel's local end with it. The remote kernel
        lives on under its lease (reconnect_grace) and is reaped after it; a fresh local end
        cannot take over the data path (its frame sequence died with the service), so the
        launcher ends with an error and Jupyter's restarter starts a new kernel."""
        from remote_kernel.errors import LaunchError

        where = paths.log_path(paths.runtime_dir())
        if self.ready is None:
            raise LaunchError(f"the per-user service ended before kernel {self.entry.name!r} was ready; see {where}",
                              hint="start the kernel again (REMOTE_KERNEL_SERVICE=off serves it without the service)")
        raise LaunchError(
            f"the per-user service serving kernel {self.entry.name!r} ended (see {where}); the remote kernel "
            f"on {self.entry.host.label} is stopped by its agent after reconnect_grace="
            f"{self.entry.reconnect_grace:g} s", hint="restart the kernel; it starts a new service")


def wait_until_gone(directory: Path, timeout: float) -> bool:
    """Until the service's process is gone (False: still there after ``timeout``): a killed
    process's listening socket can still take a connection while its descriptors are being
    closed; its pid lock goes with it."""
    deadline = time.monotonic() + timeout
    fd = os.open(paths.pid_path(directory), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.05)
                continue
            fcntl.flock(fd, fcntl.LOCK_UN)
            return True
    finally:
        os.close(fd)


def _log_level() -> int:
    levels = [logging.getLogger(name).getEffectiveLevel() for name in ("remote_kernel", "remote_kernel.progress")]
    return min(levels)

"""The per-user service daemon (``python -m remote_kernel service run``).

One thread accepts on the 0600 socket (peers of another uid are closed at once); one thread per
conversation. Conversations: ``hello``, ``status``, ``stop``, ``login`` (the service's questions are
relayed to the user's terminal and the answers back), ``logout``, and ``serve`` (host a kernel for
an argv launcher: its log lines, ``ready`` and ``exit`` go back; its ``interrupt``/``signal``/
``terminate`` come in; the end of the conversation stops the kernel). The service exits after
REMOTE_KERNEL_SERVICE_IDLE seconds (default 600) with no kernel, no connection and no client.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

from remote_kernel import __version__
from remote_kernel.entry import HostEntry, KernelEntry
from remote_kernel.errors import RemoteKernelError
from remote_kernel.launcher import RemoteKernel
from remote_kernel.service import idle_limit, paths, prompts
from remote_kernel.service.pool import AnswerNeeded, NobodyPrompter, Pool, ServiceConnector
from remote_kernel.service.wire import Channel, WireError, same_user

log = logging.getLogger(__name__)

UPKEEP_EVERY = 2.0
LOGIN_TIMEOUT = 120.0  # a person finds their phone and types a code (sshd's LoginGraceTime is 120 s)
_session = threading.local()  # .channel of the argv launcher a kernel's serving thread logs to


class _Forward(logging.Handler):
    """Log records of a hosted kernel's serving thread go to its argv launcher (which logs them
    as if it had served the kernel itself: under Jupyter, in the server's log)."""

    def emit(self, record: logging.LogRecord) -> None:
        channel: Channel | None = getattr(_session, "channel", None)
        level: int = getattr(_session, "level", logging.INFO)
        if channel is None or record.levelno < level:
            return
        with contextlib.suppress(Exception):
            channel.send({"event": "log", "logger": record.name, "level": record.levelno,
                          "message": record.getMessage(), "final": bool(getattr(record, "final", False))})


class HostedKernel(RemoteKernel):
    """A RemoteKernel whose connections come from the service's pool and whose serving thread
    logs to the argv launcher that asked for it."""

    def __init__(self, entry: KernelEntry, connection_file: Path | None, *, runtime_dir: Path,
                 connector: ServiceConnector, channel: Channel, level: int) -> None:
        super().__init__(entry, connection_file, runtime_dir=runtime_dir)
        self._launcher.connector = connector  # the only change: the shared connection
        self.channel, self.level = channel, level

    def _serve(self) -> None:
        _session.channel, _session.level = self.channel, self.level
        try:
            super()._serve()
        finally:
            _session.channel = None


class Service:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.pool = Pool()
        self.kernels: dict[int, dict[str, Any]] = {}
        self.clients = 0
        self.since = time.time()
        self.last_busy = time.monotonic()
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._ids = itertools.count(1)

    # -------------------------------------------------------------------------- lifetime

    def run(self) -> int:
        with self._pid_lock() as locked:
            if not locked:
                log.info("another service already runs in %s", self.dir)
                return 0
            listener = self._listen()
            threading.Thread(target=self._upkeep, name="rk-service-upkeep", daemon=True).start()
            log.info("service %s (pid %d) listening on %s", __version__, os.getpid(), paths.socket_path(self.dir))
            try:
                self._accept(listener)
            finally:
                self._shutdown(listener)
        return 0

    @contextlib.contextmanager
    def _pid_lock(self) -> Any:
        """Held for the service's life: a second service (a race of two launches) exits at once."""
        fd = os.open(paths.pid_path(self.dir), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                yield False
                return
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            yield True
        finally:
            os.close(fd)

    def _listen(self) -> socket.socket:
        path = paths.socket_path(self.dir)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a dead service's socket (we hold the pid lock: no live one owns it)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # born 0600: no window in which another user could connect
        try:
            listener.bind(str(path))
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        listener.listen(64)
        listener.settimeout(1.0)
        return listener

    def _accept(self, listener: socket.socket) -> None:
        while not self.stopping.is_set():
            try:
                sock, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                log.warning("accept failed: %s", exc)
                time.sleep(0.5)
                continue
            if not same_user(sock):
                log.warning("refused a connection from another user (SO_PEERCRED)")
                sock.close()
                continue
            sock.settimeout(None)
            threading.Thread(target=self._converse, args=(sock,), name="rk-service-client", daemon=True).start()

    def _upkeep(self) -> None:
        limit = idle_limit()
        while not self.stopping.wait(UPKEEP_EVERY):
            with contextlib.suppress(Exception):
                self.pool.keepalive(limit)
            with self._lock:
                busy = bool(self.kernels) or self.clients > 0
            if busy or self.pool.busy():
                self.last_busy = time.monotonic()
            elif time.monotonic() - self.last_busy > limit:
                log.info("idle for %.0f s: exiting", limit)
                self.stopping.set()

    def _shutdown(self, listener: socket.socket) -> None:
        with self._lock:
            kernels = [k["kernel"] for k in self.kernels.values()]
        for kernel in kernels:
            kernel.terminate()
        for kernel in kernels:
            kernel.wait(10.0)
        self.pool.close_all()
        listener.close()
        with contextlib.suppress(OSError):
            paths.socket_path(self.dir).unlink()

    # -------------------------------------------------------------------------- conversations

    def _converse(self, sock: socket.socket) -> None:
        channel = Channel(sock)
        with self._lock:
            self.clients += 1
        try:
            request = channel.receive()
            if request is not None:
                handler = getattr(self, f"_op_{request.get('op')}", None)
                if handler is None:
                    channel.send({"event": "error", "message": f"unknown request {request.get('op')!r}"})
                else:
                    handler(channel, request)
        except WireError as exc:
            log.warning("dropped a client: %s", exc)
        except Exception:  # a bug: keep serving the others
            log.exception("a conversation failed")
        finally:
            with self._lock:
                self.clients -= 1
            self.last_busy = time.monotonic()
            channel.close()

    def _op_hello(self, channel: Channel, request: dict[str, Any]) -> None:
        channel.send({"event": "hello", "pid": os.getpid(), "version": __version__})

    def _op_status(self, channel: Channel, request: dict[str, Any]) -> None:
        with self._lock:
            kernels = [{key: value for key, value in k.items() if key != "kernel"} for k in self.kernels.values()]
        channel.send({"event": "status", "pid": os.getpid(), "version": __version__, "since": self.since,
                      "socket": str(paths.socket_path(self.dir)), "connections": self.pool.describe(),
                      "kernels": kernels})

    def _op_stop(self, channel: Channel, request: dict[str, Any]) -> None:
        with self._lock:
            count = len(self.kernels)
        channel.send({"event": "stopping", "pid": os.getpid(), "kernels": count})
        self.stopping.set()

    def _op_login(self, channel: Channel, request: dict[str, Any]) -> None:
        host = HostEntry.from_dict(request["host"])
        prompter = RelayPrompter(channel)
        try:
            link, reused = self.pool.login(host, prompter, timeout=LOGIN_TIMEOUT)
        except RemoteKernelError as exc:
            channel.send(_error_event(exc))
            return
        channel.send({"event": "done", "host": host.name, "label": host.label, "auth": link.auth(),
                      "reused": reused, "since": link.since})

    def _op_logout(self, channel: Channel, request: dict[str, Any]) -> None:
        host = HostEntry.from_dict(request["host"])
        channel.send({"event": "done", "host": host.name, "kernels": self.pool.logout(host)})

    def _op_serve(self, channel: Channel, request: dict[str, Any]) -> None:
        entry = KernelEntry.from_dict(request["entry"])
        kernel = self._hosted(channel, request, entry)
        ident = next(self._ids)
        with self._lock:
            self.kernels[ident] = {"id": ident, "kernel": kernel, "name": entry.name, "host": entry.host.name,
                                   "label": entry.host.label, "since": time.time(),
                                   "launcher_pid": request.get("pid"), "connection_file": None}
        try:
            kernel.start()
            threading.Thread(target=_relay_control, args=(channel, kernel), name="rk-service-control",
                             daemon=True).start()
            self._report(channel, kernel, ident)
        finally:
            with self._lock:
                self.kernels.pop(ident, None)

    def _hosted(self, channel: Channel, request: dict[str, Any], entry: KernelEntry) -> HostedKernel:
        env = request.get("askpass") or {}
        program = prompts.askpass_program(env, terminal=False)
        prompter = prompts.AskpassPrompter(program, env) if program else NobodyPrompter(entry.host)

        def waiting(need: AnswerNeeded) -> None:
            log.warning("%s (waiting up to startup_timeout=%g s)", need.message, entry.startup_timeout)

        connector = ServiceConnector(self.pool, prompter, startup_timeout=entry.startup_timeout, on_wait=waiting)
        connection_file = request.get("connection_file")
        return HostedKernel(entry, Path(connection_file) if connection_file else None,
                            runtime_dir=Path(request["runtime_dir"]), connector=connector, channel=channel,
                            level=int(request.get("level") or logging.INFO))

    def _report(self, channel: Channel, kernel: HostedKernel, ident: int) -> None:
        try:
            kernel.wait_ready(timeout=365 * 86400.0)  # the launcher bounds the start itself
        except RemoteKernelError:
            pass
        else:
            connector = kernel._launcher.connector
            reused = getattr(connector, "reused", None)
            with self._lock:
                if ident in self.kernels:
                    self.kernels[ident]["connection_file"] = str(kernel.connection_file)
            channel.send({"event": "ready", "connection_file": str(kernel.connection_file), "reused": reused})
        code = kernel.wait()
        error = kernel.error
        channel.send({**(_error_event(error) if error is not None else {}), "event": "exit", "code": code})


class RelayPrompter:
    """Asks through the `login` conversation: the question goes to the user's terminal, the typed
    answer comes back (never logged). The end of the conversation is "no answer"."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self._lock = threading.Lock()  # one question at a time

    def ask(self, host: str, prompt: str, *, echo: bool, kind: str, instructions: str = "") -> str | None:
        with self._lock:
            if not self.channel.send({"event": "prompt", "host": host, "prompt": prompt, "echo": echo,
                                      "kind": kind, "instructions": instructions}):
                return None
            reply = self.channel.receive()
        if reply is None or reply.get("op") != "answer" or not isinstance(reply.get("text"), str):
            return None
        text: str = reply["text"]
        return text


def _relay_control(channel: Channel, kernel: HostedKernel) -> None:
    """The argv launcher's signals; its end (closed, killed) stops the kernel at once."""
    while True:
        try:
            message = channel.receive()
        except WireError:
            message = None
        if message is None:
            if kernel.poll() is None:
                log.info("the launcher of kernel %s went away: stopping the kernel", kernel.entry.name)
                kernel.terminate()
            return
        op = message.get("op")
        if op == "terminate":
            kernel.terminate()
        elif op == "signal" and isinstance(message.get("signum"), int):
            kernel.send_signal(int(message["signum"]))


def _error_event(exc: RemoteKernelError) -> dict[str, Any]:
    return {"event": "error", "type": type(exc).__name__, "message": exc.message, "hint": exc.hint,
            "exit_code": exc.exit_code, "host": getattr(exc, "host", None)}


def main() -> int:
    """The daemon's body: logging to <runtime>/service.log, then serve until idle or stopped."""
    directory = paths.private_dir(paths.runtime_dir())
    _setup_logging(paths.log_path(directory))
    service = Service(directory)
    signal.signal(signal.SIGTERM, lambda *_: service.stopping.set())
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the terminal of `service start` may close
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Jupyter interrupts the launcher's whole group
    return service.run()


def _setup_logging(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    handler = logging.StreamHandler(os.fdopen(fd, "a", buffering=1, encoding="utf-8"))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    level = logging.DEBUG if os.environ.get("REMOTE_KERNEL_SERVICE_DEBUG") else logging.INFO
    handler.setLevel(level)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    progress = logging.getLogger("remote_kernel.progress")  # console.setup_logging set it up for a terminal
    for old in list(progress.handlers):
        progress.removeHandler(old)
    progress.setLevel(logging.NOTSET)
    progress.propagate = True
    logging.getLogger("remote_kernel").addHandler(_Forward())
    for noisy in ("paramiko", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if level == logging.DEBUG else logging.WARNING)
    if level != logging.DEBUG:
        # paramiko logs a traceback for every exception raised on its transport thread, also for
        # the "nobody can answer" that ends an unattended attempt on purpose; the caller gets the
        # same exception and logs it in words.
        logging.getLogger("paramiko.transport").setLevel(logging.CRITICAL)

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
import dataclasses
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

from remote_kernel import __version__, detached
from remote_kernel.backends import Locator
from remote_kernel.entry import HostEntry, KernelEntry
from remote_kernel.errors import RemoteKernelError, UsageError
from remote_kernel.launcher import SHUTDOWN_WAIT, Adoption, KernelGoneError, RemoteKernel
from remote_kernel.service import idle_limit, paths, prompts
from remote_kernel.service.pool import AnswerNeeded, NobodyPrompter, Pool, ServiceConnector
from remote_kernel.service.spares import Spare, Spares
from remote_kernel.service.wire import Channel, WireError, same_user

log = logging.getLogger(__name__)

UPKEEP_EVERY = 2.0
RESTART_WAIT = 10.0  # a restart's new kernel waits this long for the old one to free the ports
LOGIN_TIMEOUT = 120.0  # a person finds their phone and types a code (sshd's LoginGraceTime is 120 s)
_session = threading.local()  # .kernel: the HostedKernel a serving thread serves (its logs follow it)


class _Forward(logging.Handler):
    """Log records of a hosted kernel's serving thread go to its argv launcher (which logs them
    as if it had served the kernel itself: under Jupyter, in the server's log), or to the command
    that started or attached a detached kernel until it has its answer."""

    def emit(self, record: logging.LogRecord) -> None:
        kernel: HostedKernel | None = getattr(_session, "kernel", None)
        channel = kernel.channel if kernel is not None else None
        if kernel is None or channel is None or record.levelno < kernel.level:
            return
        with contextlib.suppress(Exception):
            channel.send({"event": "log", "logger": record.name, "level": record.levelno,
                          "message": record.getMessage(), "final": bool(getattr(record, "final", False))})


class HostedKernel(RemoteKernel):
    """A RemoteKernel whose connections come from the service's pool and whose serving thread
    logs to the argv launcher that asked for it."""

    def __init__(self, entry: KernelEntry, connection_file: Path | None, *, runtime_dir: Path,
                 connector: ServiceConnector, channel: Channel, level: int, adopt: Adoption | None = None,
                 spare: Spare | None = None) -> None:
        super().__init__(entry, connection_file, runtime_dir=runtime_dir, adopt=adopt, spare=spare)
        self._launcher.connector = connector  # the only change: the shared connection
        if spare is not None:  # the spare's connection counts as this kernel's first
            connector.acquired, connector.reused = 1, True
        self.channel: Channel | None = channel  # None: nobody listens (a detached kernel, once started)
        self.level = level

    def _serve(self) -> None:
        _session.kernel = self
        try:
            super()._serve()
        finally:
            _session.kernel = None


class Service:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.pool = Pool()
        self.spares = Spares(self.pool)
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
            with contextlib.suppress(Exception):
                self.spares.upkeep()
            with self._lock:
                busy = bool(self.kernels) or self.clients > 0
            if busy or self.pool.busy():
                self.last_busy = time.monotonic()
            elif time.monotonic() - self.last_busy > limit:
                log.info("idle for %.0f s: exiting", limit)
                self.stopping.set()

    def _shutdown(self, listener: socket.socket) -> None:
        with self._lock:
            kernels = [k["kernel"] for k in self.kernels.values() if not k.get("detached")]
            detached = [k["kernel"] for k in self.kernels.values() if k.get("detached")]
        for kernel in detached:  # they outlive the service: `attach` takes them over again
            kernel.release()
        for kernel in kernels:
            kernel.terminate()
        for kernel in kernels:
            kernel.wait(10.0)
        self.spares.close_all()
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
            kernels = [{**{key: value for key, value in k.items() if key != "kernel"}, "clients": k["kernel"].clients(),
                        "forwards": [served.to_dict() for served in k["kernel"].forwards()]}
                       for k in self.kernels.values()]
        channel.send({"event": "status", "pid": os.getpid(), "version": __version__, "since": self.since,
                      "socket": str(paths.socket_path(self.dir)), "connections": self.pool.describe(),
                      "kernels": kernels, "spares": self.spares.describe()})

    def _op_stop(self, channel: Channel, request: dict[str, Any]) -> None:
        with self._lock:
            detached = sum(1 for k in self.kernels.values() if k.get("detached"))
            count = len(self.kernels) - detached
        channel.send({"event": "stopping", "pid": os.getpid(), "kernels": count, "detached": detached})
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
        self.spares.end_for(host)  # a spare is no kernel of the user's: it does not keep the login
        channel.send({"event": "done", "host": host.name, "kernels": self.pool.logout(host)})

    def _op_query(self, channel: Channel, request: dict[str, Any]) -> None:
        """`ps`/`gc`'s remote query on the connection held to the host (a host that needs a
        one-time code is asked nothing); "none" when there is no such connection: the command
        connects by itself, as without a service."""
        from remote_kernel import inventory

        target = inventory.HostTarget.from_dict(request["target"])
        lease = self.pool.held(target.host)
        if lease is None:
            channel.send({"event": "none"})
            return
        try:
            answer = inventory.query_connection(lease, target, request["request"])
        except RemoteKernelError as exc:
            channel.send(_error_event(exc))
            return
        finally:
            lease.close()
        channel.send({"event": "answer", "answer": answer})

    def _op_serve(self, channel: Channel, request: dict[str, Any]) -> None:
        entry = KernelEntry.from_dict(request["entry"])
        self._wait_for_previous(request.get("connection_file"))
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

    def _wait_for_previous(self, connection_file: Any) -> None:
        """A serve for the connection file of a kernel hosted here is a restart (jupyter_client's
        ``restart_kernel(now=True)`` SIGKILLs the old launcher and starts the new one at once): the
        old kernel, stopped because its launcher's conversation ended, still holds the file's
        ports for a moment. Wait for it (bounded), so the new one can bind them."""
        if not connection_file:
            return
        with self._lock:
            previous = [k["kernel"] for k in self.kernels.values() if k.get("connection_file") == connection_file]
        for kernel in previous:
            if kernel.wait(RESTART_WAIT) is None:
                log.warning("kernel %s still serves %s after %g s; starting its successor anyway",
                            kernel.entry.name, connection_file, RESTART_WAIT)

    def _op_detach(self, channel: Channel, request: dict[str, Any]) -> None:
        DetachedKernels(self).detach(channel, request)

    def _op_attach(self, channel: Channel, request: dict[str, Any]) -> None:
        DetachedKernels(self).attach(channel, request)

    def _op_stop_kernel(self, channel: Channel, request: dict[str, Any]) -> None:
        DetachedKernels(self).stop(channel, request)

    def _op_signal_kernel(self, channel: Channel, request: dict[str, Any]) -> None:
        DetachedKernels(self).signal(channel, request)

    def _op_forward(self, channel: Channel, request: dict[str, Any]) -> None:
        """`remote-kernel forward`: one more forward for a kernel served here, for the kernel's life."""
        try:
            kernel = self._kernel_named(str(request.get("kernel") or ""))
            served = kernel.forward(int(request["remote"]), request.get("local"))
        except RemoteKernelError as exc:
            channel.send(_error_event(exc))
            return
        channel.send({"event": "forwarding", **served.to_dict(), "name": kernel.entry.name,
                      "host": kernel.entry.host.label, "connection_file": str(kernel.connection_file)})

    def _kernel_named(self, wanted: str) -> HostedKernel:
        """A kernel served here by its detached id, its connection file, or its entry's name."""
        path = str(Path(wanted).expanduser().resolve()) if "/" in wanted or wanted.endswith(".json") else None
        with self._lock:
            hosted = list(self.kernels.values())
        found = [k for k in hosted if wanted in (k.get("kernel_id"), k["name"]) or
                 (path is not None and k.get("connection_file") and str(Path(k["connection_file"]).resolve()) == path)]
        if len(found) == 1:
            kernel: HostedKernel = found[0]["kernel"]
            return kernel
        names = ", ".join(sorted({str(k["name"]) for k in hosted})) or "none"
        if found:
            raise UsageError(f"{len(found)} kernels named {wanted!r} run in the service",
                             hint="name one by its connection file (`remote-kernel service status` lists them)")
        raise UsageError(
            f"no kernel {wanted!r} runs in the per-user service (its kernels: {names})",
            hint="a kernel served in-process (REMOTE_KERNEL_SERVICE=off, or started before the service) cannot "
                 "take an ad hoc forward: add forward = [PORT] to its entry and restart it")

    def _hosted(self, channel: Channel, request: dict[str, Any], entry: KernelEntry,
                adopt: Adoption | None = None) -> HostedKernel:
        env = request.get("askpass") or {}
        program = prompts.askpass_program(env, terminal=False)
        prompter = prompts.AskpassPrompter(program, env) if program else NobodyPrompter(entry.host)

        def waiting(need: AnswerNeeded) -> None:
            log.warning("%s (waiting up to startup_timeout=%g s)", need.message, entry.startup_timeout)

        connector = ServiceConnector(self.pool, prompter, startup_timeout=entry.startup_timeout, on_wait=waiting)
        connection_file = request.get("connection_file")
        adopt = adopt if adopt is not None else _adoption(request.get("adopt"))
        return HostedKernel(entry, Path(connection_file) if connection_file else None,
                            runtime_dir=Path(request["runtime_dir"]), connector=connector, channel=channel,
                            level=int(request.get("level") or logging.INFO), adopt=adopt,
                            spare=self.spares.take(entry) if adopt is None else None)

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
            self.spares.replenish(kernel.entry)  # the next start of this entry finds its imports done
            channel.send({"event": "ready", "connection_file": str(kernel.connection_file), "reused": reused,
                          "adopt": _takeover_record(kernel)})
        code = kernel.wait()
        error = kernel.error
        channel.send({**(_error_event(error) if error is not None else {}), "event": "exit", "code": code})


class DetachedKernels:
    """The service's side of detached kernels (issue 15): start one nobody's process owns, take one
    over from its record (after the service or the machine went down), stop one. Each answers the
    asking command once the kernel is ready (its progress goes to that command until then); the
    kernel then stays in the service, and on its host for its lease once the service is gone."""

    def __init__(self, service: Service) -> None:
        self.service = service

    def detach(self, channel: Channel, request: dict[str, Any]) -> None:
        entry = KernelEntry.from_dict(request["entry"])
        lease = float(request.get("lease") or entry.detached_lease)
        # The agent keeps a kernel with no launcher attached for reconnect_grace: for a detached
        # kernel that is its lease (and the service keeps reconnecting that long after a drop).
        entry = dataclasses.replace(entry, reconnect_grace=lease)
        kernel_id = detached.new_id()
        path = detached.connection_path(kernel_id, entry.name)
        kernel = self.service._hosted(channel, {**request, "connection_file": str(path)}, entry)
        self._host(channel, kernel, kernel_id, lease, started=time.time())

    def attach(self, channel: Channel, request: dict[str, Any]) -> None:
        record = self._record(channel, request)
        if record is None:
            return
        if self._hosted(record.id) is not None:
            channel.send({"event": "ready", "id": record.id, "name": record.name, "host": record.host,
                          "connection_file": record.connection_file, "already": True, "rebound": False})
            return
        kernel = self._adopt(channel, request, record)
        self._host(channel, kernel, record.id, record.lease, started=record.started, record=record)

    def stop(self, channel: Channel, request: dict[str, Any]) -> None:
        record = self._record(channel, request)
        if record is None:
            return
        kernel = self._hosted(record.id)
        if kernel is None:  # not served here (the service or the machine restarted): take it over first
            kernel = self._adopt(channel, request, record)
            kernel.start()
            try:
                kernel.wait_ready(timeout=record.kernel_entry().startup_timeout + 30.0)
            except RemoteKernelError as exc:
                gone = isinstance(exc, KernelGoneError)
                if gone:
                    detached.forget(record)
                channel.send({"event": "done", "id": record.id, "gone": True} if gone else _error_event(exc))
                return
        kernel.terminate()
        code = kernel.wait(SHUTDOWN_WAIT + 5.0)
        detached.forget(record)
        channel.send({"event": "done", "id": record.id, "name": record.name, "code": code, "gone": False})

    def signal(self, channel: Channel, request: dict[str, Any]) -> None:
        record = self._record(channel, request)
        if record is None:
            return
        kernel = self._hosted(record.id)
        if kernel is None:
            channel.send(_error_event(RemoteKernelError(
                f"kernel {record.id} ({record.name}) is not attached", hint=f"remote-kernel attach {record.id}")))
            return
        kernel.send_signal(int(request.get("signum") or signal.SIGINT))
        channel.send({"event": "done", "id": record.id, "name": record.name})

    def _record(self, channel: Channel, request: dict[str, Any]) -> detached.DetachedRecord | None:
        try:
            return detached.find(str(request.get("kernel")))
        except RemoteKernelError as exc:
            channel.send(_error_event(exc))
            return None

    def _hosted(self, kernel_id: str) -> HostedKernel | None:
        with self.service._lock:
            for hosted in self.service.kernels.values():
                if hosted.get("kernel_id") == kernel_id:
                    kernel: HostedKernel = hosted["kernel"]
                    return kernel
        return None

    def _adopt(self, channel: Channel, request: dict[str, Any], record: detached.DetachedRecord) -> HostedKernel:
        adopt = Adoption(record.where(), record.token, record.connection())
        return self.service._hosted(channel, {**request, "connection_file": record.connection_file},
                                    record.kernel_entry(), adopt)

    def _host(self, channel: Channel, kernel: HostedKernel, kernel_id: str, lease: float, *, started: float,
              record: detached.DetachedRecord | None = None) -> None:
        ident = next(self.service._ids)
        entry = kernel.entry
        with self.service._lock:
            self.service.kernels[ident] = {"id": ident, "kernel": kernel, "name": entry.name, "host": entry.host.name,
                                           "label": entry.host.label, "since": started, "launcher_pid": None,
                                           "connection_file": None, "detached": True, "kernel_id": kernel_id}
        kernel.start()
        ready = threading.Event()
        threading.Thread(target=_stop_if_asker_leaves, args=(channel, kernel, ready), daemon=True).start()
        try:
            kernel.wait_ready(timeout=365 * 86400.0)  # bounded by startup_timeout inside
        except RemoteKernelError as exc:
            with self.service._lock:
                self.service.kernels.pop(ident, None)
            if record is not None and isinstance(exc, KernelGoneError):
                detached.forget(record)
            channel.send(_error_event(exc))
            return
        ready.set()
        self.service.spares.replenish(entry)
        record = self._save(kernel, kernel_id, lease, started)
        with self.service._lock:
            self.service.kernels[ident]["connection_file"] = record.connection_file
        kernel.channel = None  # its later log lines go to the service's log only
        channel.send({"event": "ready", "id": kernel_id, "name": entry.name, "host": entry.host.label,
                      "connection_file": record.connection_file, "rebound": kernel.rebound, "already": False,
                      "lease": lease})
        threading.Thread(target=self._watch, args=(ident, kernel, record), name="rk-detached", daemon=True).start()

    def _save(self, kernel: HostedKernel, kernel_id: str, lease: float, started: float) -> detached.DetachedRecord:
        info, locator = kernel.connection_info, kernel.locator
        if info is None or locator is None:
            raise RuntimeError("a ready kernel has a connection and a locator")  # a bug, not a user error
        record = detached.DetachedRecord(
            id=kernel_id, name=kernel.entry.name, host=kernel.entry.host.label, entry=kernel.entry.to_dict(),
            locator=locator.to_dict(), token=kernel.token, connection_file=str(kernel.connection_file),
            ports=dict(info.ports), key=info.key, signature_scheme=info.signature_scheme, lease=lease,
            started=started)
        detached.save(record)
        return record

    def _watch(self, ident: int, kernel: HostedKernel, record: detached.DetachedRecord) -> None:
        code = kernel.wait()
        with self.service._lock:
            self.service.kernels.pop(ident, None)
        if kernel.released:
            return  # the service stops; the kernel waits on its host to be attached again
        detached.forget(record)
        error = kernel.error
        log.info("detached kernel %s (%s) ended: %s", record.id, record.name,
                 error.message if error is not None else f"exit code {code}")


def _stop_if_asker_leaves(channel: Channel, kernel: HostedKernel, ready: threading.Event) -> None:
    """A `start --detach` or `attach` interrupted before the kernel was ready: do not leave a
    kernel nobody knows about."""
    with contextlib.suppress(WireError):
        while channel.receive() is not None:
            pass
    if not ready.is_set() and kernel.poll() is None:
        log.info("the command that asked for kernel %s went away before it was ready: stopping it", kernel.entry.name)
        kernel.terminate()


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
                kernel.close_clients()  # its ports go with it, as with a launcher serving in-process
                kernel.terminate()
            return
        op = message.get("op")
        if op == "terminate":
            kernel.terminate()
        elif op == "signal" and isinstance(message.get("signum"), int):
            kernel.send_signal(int(message["signum"]))


def _takeover_record(kernel: HostedKernel) -> dict[str, Any] | None:
    """What the argv launcher keeps (in memory only) to have a new service take the kernel over
    if this one dies: where the agent is and its token. It travels on the 0600, same-uid socket."""
    locator = kernel.locator
    return None if locator is None else {"locator": locator.to_dict(), "token": kernel.token}


def _adoption(data: Any) -> Adoption | None:
    """A ``serve`` request's ``adopt``: what _takeover_record gave the launcher of a kernel whose
    service died."""
    if not isinstance(data, dict):
        return None
    return Adoption(locator=Locator.from_dict(data["locator"]), token=str(data["token"]))


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

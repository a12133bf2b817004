"""The lifecycle of one remote kernel.

connect -> start the remote agent -> serve the local ports -> watch -> relay signals -> clean up,
and reattach when the SSH connection drops. Jupyter runs this as the kernel process (kernel.json's
argv), so it behaves like one: SIGINT interrupts the remote kernel and never kills the launcher
(jupyter_client signals the whole process group, also before every shutdown); SIGTERM/SIGHUP shut
the remote kernel down; the launcher exits as soon as the kernel exits, with a non-zero code and
the reason when it died, so Jupyter's restarter can act.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import queue
import random
import secrets
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from remote_kernel import bootstrap, connection, records
from remote_kernel.backends import AgentGoneError, Backend, Connector, DirectConnector, Locator, backend_for
from remote_kernel.entry import KernelEntry
from remote_kernel.errors import EXIT_OK, HostKeyError, LaunchError, RemoteKernelError
from remote_kernel.forward import Forward, bind_forward, channel_for, parse_forward
from remote_kernel.protocol import EXIT_ATTACH_GONE, EXIT_JOB_FAILED, EXIT_NOT_FOUND
from remote_kernel.signals import RELAYED_SIGNALS, STOP_SIGNALS
from remote_kernel.tunnel import IDLE_PING, Attached, Crashed, Event, Exited, LinkLost, Log, Ready, Stderr, Tunnel

log = logging.getLogger(__name__)
remote_log = logging.getLogger("remote_kernel.remote")
progress = logging.getLogger("remote_kernel.progress")  # console.PROGRESS_LOGGER: the steps of a start

AGENT_EXIT_WAIT = 2.0  # after acknowledging EXITED: how long to wait for the agent to end
SHUTDOWN_WAIT = 8.0  # the agent waits 3 s between SIGTERM and SIGKILL; allow for a slow link
STOP_RECONNECT_WAIT = 20.0  # a stop while the link is down: time to reattach and deliver it
ATTACH_EXIT_GONE = EXIT_ATTACH_GONE  # agent.splice: the kernel's directory or socket is gone
# Capped low: once the path returns, the next attempt should come within seconds (issue 12), and an
# attempt costs one key-authenticated login (an interactive one is never retried: it needs a prompt).
BACKOFF_FIRST, BACKOFF_MAX = 0.5, 8.0
STDERR_TAIL = 20  # lines of remote stderr in an error; the rest goes to a file (error_log_path)
STDERR_KEPT = 2000  # lines kept for that file
LIVE_STDERR_LINES = 40  # remote stderr lines logged live while starting; the rest waits for the error
# The remote watchdog stops setup lines at startup_timeout; the launcher waits this much longer
# for its report before giving up by itself (a dead link).
STARTUP_MARGIN = 3.0
PROBE_INTERVAL = 5.0  # while starting, ask sshd for a reply this often (no agent to ping yet)
PROBE_TIMEOUT = 15.0  # ... and call the link dead after this long without one
AGENT_NOTE = "agent: "
DEFAULT_PING = 15.0


class Phase(enum.Enum):
    STARTING = "starting"  # connecting, setup lines, the kernel opening its sockets
    RUNNING = "running"  # ready, the link up
    RECONNECTING = "reconnecting"  # the link dropped; the kernel waits under its lease
    STOPPING = "stopping"  # shutdown requested: delivered (reconnecting if need be), then exit


# Which phase may follow which. STOPPING is final: a reattach that completes while stopping (to
# deliver the shutdown) must not make the kernel "running" again, and no drop un-stops it.
TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.STARTING: frozenset({Phase.RUNNING, Phase.STOPPING}),
    Phase.RUNNING: frozenset({Phase.RECONNECTING, Phase.STOPPING}),
    Phase.RECONNECTING: frozenset({Phase.RECONNECTING, Phase.RUNNING, Phase.STOPPING}),
    Phase.STOPPING: frozenset(),
}


@dataclass(frozen=True)
class Adoption:
    """A running remote kernel to take over instead of starting one: where its agent is, the
    token that proves it is ours, and (when its connection file may be gone: a detached kernel
    after a reboot) the connection it was served on. Its ports are bound again where free."""

    locator: Locator
    token: str
    info: connection.ConnectionInfo | None = None


class KernelGoneError(AgentGoneError):
    """The kernel to take over is no longer there (its lease ended, or it exited)."""


@dataclass
class _State:
    phase: Phase = Phase.STARTING
    link_down: bool = False  # no uplink: a drop not yet reattached (in any phase)
    remote_dir: str | None = None
    kernel_pid: int | None = None
    stop_reason: str | None = None
    shutdown_deadline: float = 0.0
    lost_at: float = 0.0
    next_attempt: float = 0.0
    attempt: int = 0
    # (line, shown live): each remote stderr line is shown once, live or in the error
    stderr_tail: deque[tuple[str, bool]] = field(default_factory=lambda: deque(maxlen=STDERR_KEPT))
    stderr_seen: int = 0  # remote stderr lines received in all
    setup_done: bool = True  # False while the entry's setup lines run
    setup_timed_out: bool = False  # the remote watchdog reported it stopped them
    startup_deadline: float = 0.0
    probe: Any = None  # threading.Event of the SSH reply asked for while starting
    probe_sent: float = 0.0


class Launcher:
    """Runs one kernel entry until the kernel exits or we are told to stop."""

    def __init__(self, entry: KernelEntry, connection_file: Path | None, *,
                 announce: Callable[[Path, KernelEntry], None] | None = None,
                 runtime_dir: Path | None = None, connector: Connector | None = None,
                 adopt: Adoption | None = None, spare: Any = None) -> None:
        self.entry = entry
        self.adoption = adopt
        self.spare = spare  # service.spares.Spare: a kernel of this entry started ahead, to take
        self.took_spare = False
        self.connector: Connector = connector or DirectConnector()
        self.backend: Backend = backend_for(entry)
        self.locator: Locator | None = None
        self.requested_file = connection_file
        self.announce = announce
        self.runtime_dir = runtime_dir
        self.events: queue.Queue[Event] = queue.Queue()
        self.state = _State()
        self.token = adopt.token if adopt is not None else secrets.token_hex(32)
        if adopt is not None:
            self.locator = adopt.locator
        self.connection_path: Path | None = None
        self.created_connection_file = False
        self.rebound = False  # a take-over found its old ports taken and serves new ones
        self.tunnel: Tunnel | None = None
        self.forwards: list[Forward] = []  # served while the kernel runs (forward.py)
        self.ssh: Any = None
        self.started = time.monotonic()
        self._stop_signal = threading.Event()
        self._release_signal = threading.Event()
        self.released = False  # let go of the kernel (release): it lives on remote under its lease

    # ------------------------------------------------------------------------------ top level

    def run(self) -> int:
        """The argv launcher (Jupyter's kernel process): serve with POSIX signals wired in."""
        previous = self._install_signal_handlers()
        try:
            return self.serve()
        finally:
            self._restore_signal_handlers(previous)

    def serve(self) -> int:
        """Start the kernel and serve it until it exits or ``request_stop``; the exit code
        (0, or a RemoteKernelError raised). Usable on any thread: no signals involved."""
        try:
            self._arm_startup()
            self._prepare_local_side()
            if self.adoption is not None:
                self._adopt_remote()
            else:
                self._start_remote()
            return self._loop()
        finally:
            self._cleanup()

    def interrupt(self) -> None:
        """Raise KeyboardInterrupt in the remote kernel's code (SIGINT to its process group)."""
        self.send_signal(signal.SIGINT)

    def send_signal(self, signum: int) -> None:
        """Deliver ``signum`` to the remote kernel's process group (the agent allows INT, TERM,
        KILL, QUIT, USR1, USR2)."""
        if signum == signal.SIGINT and self.backend.queued:
            # No kernel yet, only a job in the queue: an interrupt (Ctrl-C) means "stop waiting".
            self.backend.cancel("Ctrl-C")
            self.request_stop("interrupted while the job waited in the queue")
            return
        if self.tunnel is not None:
            log.info("relaying %s to the remote kernel", signal.Signals(signum).name)
            self.tunnel.send_signal(signum)

    def request_stop(self, reason: str) -> None:
        """Shut the remote kernel down (the agent: SIGTERM, SIGKILL after 3 s) and end serve()."""
        self.state.stop_reason = reason
        self._stop_signal.set()
        self.backend.cancel()  # a start waiting in a batch queue gives up (scancel) at once

    def close_clients(self) -> None:
        """Free the local ports and drop their clients now (the kernel's stop follows)."""
        if self.tunnel is not None:
            self.tunnel.close_clients()

    def release(self) -> None:
        """Stop serving the kernel here and leave it running remote: its agent keeps it for its
        lease (reconnect_grace) for someone to take over (a detached kernel when the service
        stops). The connection file stays."""
        self._release_signal.set()

    def _arm_startup(self) -> None:
        """startup_timeout bounds the whole start: connecting, setup lines, kernel start."""
        self.state.setup_done = not self.entry.setup
        self.state.startup_deadline = self.started + self.entry.startup_timeout + STARTUP_MARGIN

    def _prepare_local_side(self) -> None:
        path = self.requested_file
        if self.adoption is not None:
            path, info, listeners = self._rebind(path, self.adoption)
        elif path is not None and path.exists():
            info = connection.read_connection_file(path)
            listeners = connection.bind_listeners(info.ports)
        else:
            listeners = connection.bind_listeners(None)
            info = connection.new_connection_info(listeners)
            path = path or self._default_connection_path()
            connection.write_connection_file(path, info, self.entry.name)
            self.created_connection_file = True
        self.connection_path = path
        self.info = info
        # Our pings renew the remote lease, so they run even when SSH keepalives are off (0).
        # They also time the link (tunnel.py, LIVENESS): a silent link is noticed in ~10-15 s.
        keepalive = self.entry.host.keepalive or DEFAULT_PING
        ping = max(0.5, min(IDLE_PING, keepalive, self.entry.reconnect_grace / 3))
        self.tunnel = Tunnel(listeners, self.events, ping_interval=ping)
        self._open_forwards()
        log.debug("serving %s on 127.0.0.1 ports %s", path, ",".join(str(p) for p in info.ports.values()))

    def _rebind(self, path: Path | None, adoption: Adoption) -> tuple[Path, connection.ConnectionInfo, Any]:
        """The ports a kernel was served on, bound again so its clients reconnect by themselves;
        new ports (same key: the remote kernel's) and a rewritten connection file where taken."""
        if path is not None and path.exists():
            info = connection.read_connection_file(path)
        elif adoption.info is not None:
            info = adoption.info
        else:
            raise LaunchError(f"cannot take over kernel {self.entry.name!r}: its connection file {path} is gone")
        path = path or self._default_connection_path()
        try:
            listeners = connection.bind_listeners(info.ports)
        except LaunchError as exc:
            listeners = connection.bind_listeners(None)
            ports = {channel: sock.getsockname()[1] for channel, sock in listeners.items()}
            log.warning("%s: serving kernel %s on new ports %s; rewrote %s (clients must reconnect with it)",
                        exc.message, self.entry.name, ",".join(map(str, ports.values())), path)
            info = connection.ConnectionInfo(ports=ports, key=info.key, signature_scheme=info.signature_scheme)
            connection.write_connection_file(path, info, self.entry.name)
            self.rebound = True
            return path, info, listeners
        if not path.exists():
            connection.write_connection_file(path, info, self.entry.name)
        return path, info, listeners

    def forward(self, remote: int, local: int | None = None) -> Forward:
        """Serve 127.0.0.1:``local`` (default: the same number; a free port when it is taken) reaching
        127.0.0.1:``remote`` on the kernel's host, through the kernel's own link, for its life."""
        try:
            sock, served = bind_forward(remote, local or remote, self.entry.host.label)
        except OSError as exc:
            raise LaunchError(
                f"cannot listen on 127.0.0.1:{local or remote} for the forward to port {remote} on "
                f"{self.entry.host.label}: {exc.strerror or exc}",
                hint=f'pick another local port: forward = ["{remote}:LOCAL"] (or FORWARD REMOTE LOCAL)') from exc
        self._tunnel.add_listener(channel_for(remote), sock)
        self.forwards.append(served)
        return served

    def _open_forwards(self) -> None:
        """The entry's ``forward`` list. One that cannot listen is said, and the kernel starts anyway."""
        for item in self.entry.forward:
            try:
                self.forward(*parse_forward(item))
            except (ValueError, LaunchError) as exc:
                log.warning("kernel %s: forward %s: %s", self.entry.name, item, exc)

    def _default_connection_path(self) -> Path:
        return connection.default_connection_file(self.runtime_dir or _jupyter_runtime_dir(), self.entry.host)

    # ------------------------------------------------------------------------------ remote side

    def _connect(self, *, start: bool) -> Any:
        """An authenticated connection from the connector (the previous one, after a drop, is
        released first: a shared connector may hand out the same, re-established one)."""
        old, self.ssh = self.ssh, None
        if old is not None:
            with contextlib.suppress(Exception):
                self.connector.release(old)
        began = time.monotonic()
        if start:
            jumps = self.entry.host.proxy_jump
            progress.info("connecting to %s%s", self.entry.host.label,
                          " via " + " -> ".join(hop.name for hop in jumps) if jumps else "")
        self.ssh = self.connector.acquire(self.entry.host)
        (progress if start else log).info("connected to %s in %.2f s", self.entry.host.label, time.monotonic() - began)
        return self.ssh

    @property
    def _tunnel(self) -> Tunnel:
        if self.tunnel is None:
            raise RuntimeError("the local side is not prepared")  # a bug, not a user error
        return self.tunnel

    def _start_remote(self) -> None:
        hello = {
            "mode": "start", "name": self.entry.name, "key": self.info.key,
            "signature_scheme": self.info.signature_scheme, "argv": bootstrap.kernel_argv(self.entry),
            "env": dict(self.entry.env), "token": self.token,
            "reconnect_grace": self.entry.reconnect_grace, "startup_timeout": self.entry.startup_timeout,
            "replace": self._previous_kernel(),
            "runtime_dir": self.entry.runtime_dir, "output_backlog": self.entry.output_backlog,
        }
        channel = self._take_spare(hello) if self.spare is not None else None
        if channel is None:
            conn = self._connect(start=True)
            budget = self.state.startup_deadline - STARTUP_MARGIN - time.monotonic()
            channel = self.backend.start(conn, self.entry, hello, setup_budget=budget)
        if self.backend.started_at is not None:  # a batch job: startup_timeout counts from its start
            self.state.startup_deadline = self.backend.started_at + self.entry.startup_timeout + STARTUP_MARGIN
        channel.set_blocking(False)  # reads only: the pump must never wait on stdout while stderr has data
        self._tunnel.attach(channel)
        self._tunnel.start()
        if self.took_spare:
            progress.info("starting the kernel (%s, its imports done ahead by a spare)", self.entry.python)
        elif self.entry.setup:
            progress.info("running %d setup line%s", len(self.entry.setup), "s" if len(self.entry.setup) > 1 else "")
        else:
            progress.info("starting the kernel (%s)", self.entry.python)

    def _take_spare(self, hello: dict[str, Any]) -> Any:
        """The spare's agent (its kernel imported, waiting) gets this start's request: the key and
        token are this start's own. Its connection is the host's shared one, already held."""
        spare, self.spare = self.spare, None
        try:
            channel = spare.go(hello)
        except RemoteKernelError as exc:  # it ended just now: start as if there had been none
            log.info("the spare kernel of %s on %s ended (%s); starting one afresh", self.entry.name,
                     self.entry.host.label, exc.message)
            spare.discard()
            return None
        self.ssh, self.took_spare = spare.lease, True
        progress.info("connected to %s (a spare kernel waited there since %s)", self.entry.host.label,
                      time.strftime("%H:%M:%S", time.localtime(spare.since)))
        return channel

    def _adopt_remote(self) -> None:
        """Take over a kernel whose local end died: a fresh attach (both sequences start again;
        the old streams end), then the agent's HELLO says what state the kernel is in."""
        assert self.locator is not None  # noqa: S101 - set from the adoption
        progress.info("taking over kernel %s on %s", self.entry.name, self.entry.host.label)
        channel = self.backend.attach(self._connect(start=True), self.entry, self.locator)
        channel.set_blocking(False)
        self._tunnel.attach(channel, hello={"token": self.token, "fresh": True})
        self._tunnel.start()

    def _attach_remote(self) -> None:
        if self.locator is None:
            raise RuntimeError("reattach before the kernel was ready")  # a bug: the phase forbids it
        channel = self.backend.attach(self._connect(start=False), self.entry, self.locator)
        channel.set_blocking(False)
        self._tunnel.attach(channel, hello={"token": self.token})

    # ------------------------------------------------------------------------------ main loop

    def _loop(self) -> int:
        while True:
            result = self._tick()
            if result is not None:
                return result
            try:
                event = self.events.get(timeout=0.2)
            except queue.Empty:
                continue
            result = self._handle(event)
            if result is not None:
                return result

    def _tick(self) -> int | None:
        now = time.monotonic()
        state = self.state
        if self._release_signal.is_set() and state.phase is not Phase.STOPPING:
            log.info("letting go of kernel %s: it stays on %s for %g s (its lease) to be attached again",
                     self.entry.name, self.entry.host.label, self.entry.reconnect_grace)
            self.released = True
            return EXIT_OK
        if self._stop_signal.is_set() and state.phase is not Phase.STOPPING:
            self._begin_shutdown(now)
        if state.phase is Phase.STOPPING and now > state.shutdown_deadline:
            log.warning("the remote kernel did not confirm its shutdown; it will be reaped after "
                        "reconnect_grace=%g s", self.entry.reconnect_grace)
            return EXIT_OK
        if state.link_down and state.phase in (Phase.RECONNECTING, Phase.STOPPING) and now >= state.next_attempt:
            self._try_reattach(now)
        if state.phase is Phase.STARTING:
            self._watch_start(now)
        return None

    def _enter(self, phase: Phase) -> bool:
        """Move to ``phase`` if the table allows it (False, and no change, otherwise)."""
        if phase not in TRANSITIONS[self.state.phase]:
            log.debug("phase %s -> %s not taken", self.state.phase.value, phase.value)
            return False
        self.state.phase = phase
        return True

    def _watch_start(self, now: float) -> None:
        """No agent answers pings while setup lines run (minutes, for a `module load` on a busy
        login node): bound the start by startup_timeout and watch the link with SSH requests."""
        state = self.state
        if now > state.startup_deadline:
            self._drain_remote_output()
            raise self._startup_timeout_error()
        if state.probe is not None and state.probe.is_set():
            state.probe = None
        if state.probe is not None and now - state.probe_sent > PROBE_TIMEOUT:
            raise LaunchError(
                f"lost the connection to {self.entry.host.label} while {self._start_activity()}: "
                f"no answer from its sshd for {PROBE_TIMEOUT:g} s",
                hint="check the network (VPN, Wi-Fi); the remote side stops what it started by itself",
            )
        probe = getattr(self.ssh, "probe", None)
        if state.probe is None and probe is not None and now - state.probe_sent >= PROBE_INTERVAL:
            state.probe, state.probe_sent = probe(), now

    def _start_activity(self) -> str:
        return "the setup lines ran" if not self.state.setup_done else "the kernel started"

    def _startup_timeout_error(self) -> LaunchError:
        limit = f"startup_timeout={self.entry.startup_timeout:g} s"
        if not self.state.setup_done:
            lines = "; ".join(self.entry.setup)
            return LaunchError(
                f"cannot start kernel {self.entry.name!r} on {self.entry.host.label}: setup lines still running "
                f"after {self.entry.startup_timeout:g} s ({limit}): {lines}",
                stderr_tail=self._unshown_stderr(),
                hint="raise startup_timeout (e.g. \"5m\") if they are just slow, or run them by hand in "
                     "`ssh HOST` to see where they wait; they were stopped on the remote host",
            )
        return LaunchError(
            f"cannot start kernel {self.entry.name!r} on {self.entry.host.label}: the kernel did not become ready "
            f"within {limit}",
            stderr_tail=self._unshown_stderr(),
            hint="raise startup_timeout, or check `python`, `command` and `kernel_args` of this entry",
        )

    def _handle(self, event: Event) -> int | None:
        match event:
            case Ready():
                self._on_ready(event)
            case Log():
                self._on_log(event)
            case Stderr():
                self._on_stderr(event)
            case Attached():
                self._on_attached(event)
            case Exited():
                return self._on_exited(event)
            case LinkLost():
                return self._on_link_lost(event)
            case Crashed():
                return self._on_crashed(event)
        return None

    def _on_ready(self, event: Ready) -> None:
        data = event.data
        if self.adoption is None:
            self.locator = self.backend.locator(self.entry, data)
        assert self.locator is not None  # noqa: S101
        self.state.remote_dir = self.locator.dir
        self.state.kernel_pid = data.get("kernel_pid")
        # Confirm READY at once: an agent keeps a kernel after a drop only once its launcher has
        # acknowledged something (else it was abandoned mid-start), and a detached kernel's
        # service may be killed a moment after it said "ready".
        self._tunnel.acknowledge_now()
        self._enter(Phase.RUNNING)
        self._write_state_file()
        progress.info("ready in %.1f s: kernel pid %s on %s, Python %s", time.monotonic() - self.started,
                      data.get("kernel_pid"), self.entry.host.label, data.get("python"), extra={"final": True})
        if self.announce and self.connection_path:
            self.announce(self.connection_path, self.entry)

    def _on_log(self, event: Log) -> None:
        # The kernel's own stdout/stderr is relayed as is; never let its key reach our log.
        text = str(event.data).replace(self.info.key, "<key>") if self.info.key else str(event.data)
        if text.startswith(AGENT_NOTE):  # the agent's own narration: -v
            remote_log.info("remote %s", text)
        else:  # the kernel's stderr/stdout, as a local kernel's would show in Jupyter's log
            self._remote_line(text)

    def _on_stderr(self, event: Stderr) -> None:
        for line in str(event.data).splitlines():
            if line.strip() == bootstrap.SETUP_DONE:
                self.state.setup_done = True
                progress.info("setup done after %.1f s; starting the kernel", time.monotonic() - self.started)
            elif line.strip():
                self.state.setup_timed_out |= line.startswith(bootstrap.SETUP_TIMEOUT_NOTE)
                self._remote_line(line)

    def _remote_line(self, line: str) -> None:
        """Remote stderr, shown once: live (a starting kernel's first LIVE_STDERR_LINES), or in
        the error that ends the launch, whose tail is capped and whose whole text goes to a file."""
        state = self.state
        state.stderr_seen += 1
        live = state.phase is not Phase.STARTING or state.stderr_seen <= LIVE_STDERR_LINES
        state.stderr_tail.append((line, live))
        if live:
            remote_log.warning("remote: %s", line)
        elif state.stderr_seen == LIVE_STDERR_LINES + 1:
            remote_log.warning("remote: (more output; shown if the start fails)")

    def _all_stderr(self, agent_tail: Any = None) -> str:
        return "\n".join(line for line, _ in self.state.stderr_tail) or str(agent_tail or "")

    def _unshown_stderr(self, agent_tail: Any = None) -> str:
        """The remote stderr not yet logged live, its last STDERR_TAIL lines; all of it in a file."""
        kept = list(self.state.stderr_tail)
        unshown = [line for line, live in kept if not live] if kept else str(agent_tail or "").splitlines()
        if len(unshown) <= STDERR_TAIL:
            return "\n".join(unshown)
        saved = self._save_stderr([line for line, _ in kept])
        where = f"; all {self.state.stderr_seen} lines are in {saved}" if saved else ""
        return "\n".join([f"... {len(unshown) - STDERR_TAIL} earlier lines not shown{where}", *unshown[-STDERR_TAIL:]])

    def _save_stderr(self, lines: list[str]) -> Path | None:
        """The remote stderr of a failed start, in the runtime dir (0600: it is the user's output)."""
        return records.save_stderr_log(self.runtime_dir or _jupyter_runtime_dir(), self.entry.name, lines)

    def _drain_remote_output(self) -> None:
        """Handle the stderr/log events already queued (before an error is raised from them)."""
        while True:
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                return
            if event.kind in ("log", "stderr"):
                self._handle(event)

    def _on_attached(self, event: Attached) -> None:
        hello = event.data if isinstance(event.data, dict) else {}
        if self.state.phase is Phase.STARTING:  # a take-over: the agent says where its kernel is
            self._on_taken_over(hello)
            return
        lost_for = time.monotonic() - self.state.lost_at
        # The agent held the kernel's output in its backlog (output_backlog); what did not fit
        # was dropped whole messages at a time, and counted: it shows a notice where the gap is.
        dropped, lines = int(hello.get("dropped_messages") or 0), int(hello.get("dropped_lines") or 0)
        if dropped or hello.get("dropping"):
            log.warning("reattached to the remote kernel after %.1f s; output did not fit in the remote "
                        "backlog (output_backlog = %s bytes): %d lines (%d messages) dropped so far, "
                        "reported in the notebook where they were", lost_for, hello.get("output_backlog"),
                        lines, dropped)
        else:
            log.warning("reattached to the remote kernel after %.1f s; nothing was lost", lost_for)
        self.state.link_down = False
        self.state.attempt = 0
        self._enter(Phase.RUNNING)  # not while stopping: the queued shutdown goes out now

    def _on_taken_over(self, hello: dict[str, Any]) -> None:
        state = str(hello.get("state"))
        if state == "ready":
            self._on_ready(Ready({key: hello.get(key) for key in ("kernel_pid", "agent_pid", "dir", "python")}))
        elif state == "starting":
            progress.info("the kernel is still starting; waiting for it")  # its READY follows
        # exiting / exited: the agent's EXITED follows, and _on_exited says so

    def _on_crashed(self, event: Crashed) -> int:
        from remote_kernel.protocol import ProtocolError

        if isinstance(event.data, ProtocolError) and self.state.phase is Phase.STARTING:
            # Before the agent's first frame, garbage on stdout is almost always the login shell
            # printing (an rc file that echoes for non-interactive shells too).
            raise LaunchError(
                f"cannot start kernel {self.entry.name!r} on {self.entry.host.label}: something printed on the "
                f"remote login's stdout before the agent started ({event.data})",
                hint="a ~/.bashrc, ~/.cshrc or setup line that prints breaks ssh tools: print only in interactive "
                     f"shells (`[ -z \"$PS1\" ] || echo ...`) or send it to stderr; "
                     f"`remote-kernel doctor {self.entry.name}` shows what was printed",
            ) from event.data
        raise LaunchError(f"internal error in the data path: {event.data!r}") from event.data

    def _on_exited(self, event: Exited) -> int:
        self._tunnel.acknowledge_now()
        self._tunnel.flush()
        self._await_agent_exit(AGENT_EXIT_WAIT)
        data = event.data
        self._forget_state_file()
        if self.state.phase is Phase.STARTING and self.adoption is not None:
            raise KernelGoneError(f"kernel {self.entry.name!r} on {self.entry.host.label} ended while nobody "
                                  f"was attached: {data.get('reason')}",
                                  stderr_tail=self._unshown_stderr(data.get("stderr_tail")))
        if self.state.phase is Phase.STARTING:
            reason = str(data.get("reason"))
            if data.get("code") == 0:
                reason += " before it was ready (it never opened its sockets)"
            raise LaunchError(f"cannot start kernel {self.entry.name!r} on {self.entry.host.label}: {reason}",
                              stderr_tail=self._unshown_stderr(data.get("stderr_tail")),
                              hint=_hint_for(self._all_stderr(data.get("stderr_tail")))
                              or "check `command` and `kernel_args`: the kernel command must keep running")
        if self.state.phase is Phase.STOPPING or self._stop_signal.is_set() or data.get("code") == 0:
            log.info("the remote kernel exited (%s)", data.get("reason"))
            return EXIT_OK
        self.backend.check(self.ssh)  # killed with its batch job (TIMEOUT, scancel): say that
        raise LaunchError(f"the remote kernel on {self.entry.host.label} stopped: {data.get('reason')}",
                          stderr_tail=self._unshown_stderr(data.get("stderr_tail")),
                          hint=_hint_for(self._all_stderr(data.get("stderr_tail"))))

    def _await_agent_exit(self, timeout: float) -> None:
        """The agent exits once it has our ACK of its EXITED. Closing the connection before that
        can lose the ACK (sshd drops what it has not yet written to the agent's stdin), and the
        agent would then keep its directory for the whole lease: wait for its channel to end."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                event = self.events.get(timeout=left)
            except queue.Empty:
                return
            if event.kind == "link_lost":
                return
            if event.kind in ("log", "stderr"):
                self._handle(event)

    def _on_link_lost(self, event: LinkLost) -> int | None:
        status = _exit_status(event.uplink)
        state = self.state
        if state.phase is Phase.STARTING and self.adoption is not None and status == ATTACH_EXIT_GONE:
            raise KernelGoneError(f"kernel {self.entry.name!r} is no longer on {self.entry.host.label}: its lease "
                                  "ended with nobody attached, or it exited",
                                  hint="start it again; `remote-kernel gc` removes what is left of it")
        if state.phase is Phase.STARTING or state.remote_dir is None:
            self._take_stderr(event.uplink)
            self._drain_remote_output()
            if status != EXIT_JOB_FAILED:  # that one ends its job: its output says more than its state
                self.backend.check(self.ssh)  # a batch job that ended says so (state and reason)
            self._raise_startup_failure(status)
        if status == ATTACH_EXIT_GONE or (state.phase is Phase.STOPPING and status == 0):
            self._forget_state_file()
            if state.phase is Phase.STOPPING:
                return EXIT_OK  # what we were asked for: nothing is left
            raise LaunchError(f"the remote kernel on {self.entry.host.label} is gone: it was reaped "
                              f"after reconnect_grace={self.entry.reconnect_grace:g} s or it died",
                              stderr_tail=self._unshown_stderr())
        now = time.monotonic()
        if not state.link_down:
            state.link_down, state.lost_at, state.attempt, state.next_attempt = True, now, 0, now
            log.warning("lost the connection to %s: %s, reconnecting for up to %.0f s (%s)", self.entry.host.label,
                        event.data, *self._reconnect_limit())
        else:  # the channel of a reattach attempt closed: back off before the next one
            state.next_attempt = now + _backoff(state.attempt)
        self._enter(Phase.RECONNECTING)  # while stopping: stay, and reconnect to deliver the shutdown
        return None

    def _reconnect_limit(self) -> tuple[float, str]:
        if self.state.phase is Phase.STOPPING:
            return max(0.0, self.state.shutdown_deadline - time.monotonic()), "to deliver the shutdown"
        return self.entry.reconnect_grace, "reconnect_grace"

    def _take_stderr(self, channel: Any) -> None:
        """Whatever the remote command wrote on stderr before its channel closed."""
        data = b""
        with contextlib.suppress(Exception):
            while len(data) < 1 << 20 and channel.recv_stderr_ready():
                data += channel.recv_stderr(65536)
        if data:
            self._on_stderr(Stderr(data.decode("utf-8", "replace")))

    def _raise_startup_failure(self, status: int | None) -> None:
        if self.state.setup_timed_out:
            raise self._startup_timeout_error()
        tail = self._unshown_stderr()
        if status == bootstrap.CWD_FAILED_EXIT:
            reason = f"the working directory {self.entry.cwd!r} does not exist on the remote host"
        elif status == EXIT_NOT_FOUND:
            reason = f"the remote shell could not run {self.entry.python!r} (python)"
        elif status == EXIT_JOB_FAILED:
            reason = "its batch job's script failed before the kernel started (see the end of the job's output)"
        else:
            reason = "the remote side ended before the kernel started"
            if status is not None and status >= 0:
                reason += f" (exit status {status})"
            elif not self.state.setup_done:
                reason += " (while the setup lines ran)"
        raise LaunchError(f"cannot start kernel {self.entry.name!r} on {self.entry.host.label}: {reason}",
                          stderr_tail=tail, hint=_hint_for(self._all_stderr()))

    # ------------------------------------------------------------------------------ reconnect

    def _try_reattach(self, now: float) -> None:
        state = self.state
        if state.phase is not Phase.STOPPING and now - state.lost_at > self.entry.reconnect_grace:
            raise LaunchError(f"could not reconnect to {self.entry.host.label} within reconnect_grace="
                              f"{self.entry.reconnect_grace:g} s; the remote kernel has been reaped",
                              hint="check the network or the host; raise reconnect_grace for longer outages")
        state.attempt += 1
        try:
            log.info("reconnect attempt %d to %s", state.attempt, self.entry.host.label)
            self._attach_remote()
        except HostKeyError as exc:
            raise _host_key_refused(exc, self.entry) from exc
        except AgentGoneError:
            raise  # the batch job ended: no reconnect can bring it back
        except RemoteKernelError as exc:
            delay = _backoff(state.attempt)
            state.next_attempt = time.monotonic() + delay
            log.warning("reconnect attempt %d failed (%s); next in %.1f s", state.attempt, exc.message, delay)
            return
        # Wait for the agent's HELLO ("attached") or a new link_lost; give the attempt 15 s.
        state.next_attempt = time.monotonic() + 15.0

    # ------------------------------------------------------------------------------ stopping

    def _begin_shutdown(self, now: float) -> None:
        self._enter(Phase.STOPPING)
        # With the link down the shutdown waits for a reattach (the agent keeps the kernel under its
        # lease until then): allow for one, instead of leaving the kernel to the lease.
        self.state.shutdown_deadline = now + SHUTDOWN_WAIT + (STOP_RECONNECT_WAIT if self.state.link_down else 0)
        log.info("stopping the remote kernel (%s)", self.state.stop_reason or "requested")
        self._tunnel.request_shutdown()

    def _install_signal_handlers(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous: dict[int, Any] = {}
        for signum in RELAYED_SIGNALS:
            previous[signum] = signal.signal(signum, self._relay_signal)
        for signum in STOP_SIGNALS:
            previous[signum] = signal.signal(signum, self._request_stop)
        return previous

    def _restore_signal_handlers(self, previous: dict[int, Any]) -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    def _relay_signal(self, signum: int, frame: Any) -> None:
        # Never die on SIGINT: jupyter_client interrupts (signals our whole group) before
        # every shutdown, and Ctrl-C in a terminal means "interrupt the cell".
        self.send_signal(signum)

    def _request_stop(self, signum: int, frame: Any) -> None:
        self.request_stop(f"received {signal.Signals(signum).name}")

    # ------------------------------------------------------------------------------ state file

    def _state_file(self) -> Path | None:
        """Where a restart finds the kernel it replaces (keyed by the connection file)."""
        if self.requested_file is None:
            return None
        return records.restart_record_path(self.runtime_dir or _jupyter_runtime_dir(), self.requested_file)

    def _previous_kernel(self) -> dict[str, str] | None:
        """The kernel a `restart(now=True)` left behind: its launcher was SIGKILLed, so its agent
        waits out the lease. The new agent stops it at once instead (the token proves ownership)."""
        path = self._state_file()
        record = records.load_restart_record(path) if path is not None else None
        if record is None or record.host != self.entry.host.label or pid_alive(record.pid):
            return None
        job = {"job_id": record.job_id, "job_dir": record.job_dir or ""} if record.job_id else {}
        return {"dir": record.dir, "token": record.token, **job}

    def _write_state_file(self) -> None:
        path = self._state_file()
        if path is None or self.state.remote_dir is None:
            return
        job = self.locator if self.locator is not None and self.locator.job_id else None
        records.save_restart_record(path, records.RestartRecord(
            pid=os.getpid(), host=self.entry.host.label, dir=self.state.remote_dir, token=self.token,
            job_id=job.job_id if job else None, job_dir=job.job_dir if job else None))

    def _forget_state_file(self) -> None:
        if self.locator is not None and self.locator.job_id:
            return  # a batch job outlives its kernel for a moment: a restart finds it here and reuses it
        path = self._state_file()
        if path is not None:
            records.forget_restart_record(path)

    # ------------------------------------------------------------------------------ cleanup

    def _cleanup(self) -> None:
        if self.spare is not None:  # a start that ended before it took its spare: end the spare too
            self.spare.discard()
            self.spare = None
        if self.tunnel is not None:
            try:
                self.tunnel.close()
            except Exception:
                log.debug("tunnel closed with an error", exc_info=True)
        if self.ssh is not None:
            with contextlib.suppress(Exception):
                self.connector.release(self.ssh)
        if self.created_connection_file and self.connection_path is not None and not self.released:
            with contextlib.suppress(OSError):
                self.connection_path.unlink()


def _host_key_refused(exc: HostKeyError, entry: KernelEntry) -> HostKeyError:
    """A changed or unknown host key does not heal by retrying (issue 16): stop at once instead of
    hanging the notebook for reconnect_grace, and leave the remote kernel alone."""
    return HostKeyError(
        f"{exc.message}\n  This was found while reconnecting, so the launcher stops instead of retrying. The"
        f" remote kernel was not stopped: its agent keeps it for reconnect_grace={entry.reconnect_grace:g} s",
        host=exc.host,
        hint=exc.hint,
    )


def _backoff(attempt: int) -> float:
    """Exponential back-off with jitter, so many launchers do not reconnect in lockstep."""
    base: float = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** max(0, attempt - 1))
    return base * random.uniform(0.7, 1.3)  # noqa: S311 - jitter, not cryptography


def _exit_status(uplink: Any) -> int | None:
    getter = getattr(uplink, "exit_status", None)
    if getter is None:
        return None
    deadline = time.monotonic() + 1.0
    status: int | None = getter()
    while status is None and time.monotonic() < deadline:
        time.sleep(0.05)  # the exit-status message follows EOF closely
        status = getter()
    return status


def pid_alive(pid: int) -> bool:
    """Is ``pid`` a process (of ours or not) that still exists?"""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _hint_for(stderr_tail: str) -> str | None:
    if "No module named ipykernel" in stderr_tail:
        return ("install ipykernel for the remote python (`python -m pip install ipykernel`) "
                "or set `python` to one that has it")
    if "No module named" in stderr_tail:
        return "a module is missing on the remote python; check `python`, `setup` and `command`"
    if "not found" in stderr_tail:
        return "check `python` and the `setup` lines of this entry"
    return None


def _jupyter_runtime_dir() -> Path:
    from jupyter_core.paths import jupyter_runtime_dir

    return Path(jupyter_runtime_dir())


class RemoteKernel:
    """One remote kernel in-process, with jupyter_client's lifecycle verbs (the provisioner's and a
    library user's API): ``start`` returns at once, ``wait_ready`` blocks until the kernel answers or
    the start failed; ``poll``/``wait`` give the exit code; ``interrupt``, ``send_signal``,
    ``terminate``, ``kill``; ``close``. The Launcher serves it on a thread of its own; its errors
    come back from ``wait_ready`` (or ``error``), never as a signal or a process exit."""

    def __init__(self, entry: KernelEntry, connection_file: Path | None = None, *,
                 runtime_dir: Path | None = None, adopt: Adoption | None = None, spare: Any = None) -> None:
        self.entry = entry
        self._launcher = Launcher(entry, connection_file, announce=self._announce, runtime_dir=runtime_dir,
                                  adopt=adopt, spare=spare)
        self._ready = threading.Event()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self.exit_code: int | None = None
        self.error: RemoteKernelError | None = None

    @property
    def connection_file(self) -> Path | None:
        return self._launcher.connection_path

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("a RemoteKernel starts once")  # a bug in the caller, not a user error
        self._thread = threading.Thread(target=self._serve, name=f"rk-kernel-{self.entry.name}", daemon=True)
        self._thread.start()

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until the kernel is ready; raise the launch's error if it failed (or ended) first."""
        limit = self.entry.startup_timeout + STARTUP_MARGIN + 5.0 if timeout is None else timeout
        if not self._ready.wait(limit):
            self.kill()
            raise LaunchError(f"kernel {self.entry.name!r} on {self.entry.host.label} was not ready within {limit:g} s")
        if self.error is not None:
            raise self.error
        if self._done.is_set():
            raise LaunchError(f"kernel {self.entry.name!r} on {self.entry.host.label} ended before it was ready")

    def poll(self) -> int | None:
        """None while the kernel runs; its exit code once it ended (1 when it failed)."""
        return self.exit_code if self._done.is_set() else None

    def wait(self, timeout: float | None = None) -> int | None:
        self._done.wait(timeout)
        return self.poll()

    def interrupt(self) -> None:
        self._launcher.interrupt()

    def send_signal(self, signum: int) -> None:
        """SIGINT interrupts; SIGTERM/SIGHUP/SIGQUIT shut down; SIGKILL kills; others are relayed."""
        if signum == signal.SIGKILL:
            self.kill()
        elif signum in STOP_SIGNALS:
            self.terminate()
        else:
            self._launcher.send_signal(signum)

    def terminate(self) -> None:
        """Shut the remote kernel down: it gets SIGTERM, then SIGKILL after 3 s; nothing is left."""
        self._launcher.request_stop("terminate requested")

    def kill(self) -> None:
        """Stop at once: SIGKILL to the kernel's group, then the same clean-up as terminate."""
        self._launcher.request_stop("kill requested")
        self._launcher.send_signal(signal.SIGKILL)

    def release(self, timeout: float = 5.0) -> int | None:
        """Stop serving it here and leave the remote kernel running under its lease (to be taken
        over again with an Adoption); the connection file stays."""
        if self._thread is not None and not self._done.is_set():
            self._launcher.release()
            self._done.wait(timeout)
        return self.poll()

    def clients(self) -> int:
        """Jupyter clients connected to the kernel's local ports now."""
        tunnel = self._launcher.tunnel
        return tunnel.clients() if tunnel is not None else 0

    @property
    def released(self) -> bool:
        return self._launcher.released

    @property
    def rebound(self) -> bool:
        """A take-over found the old ports taken: the connection file was rewritten with new ones."""
        return self._launcher.rebound

    @property
    def locator(self) -> Locator | None:
        return self._launcher.locator

    @property
    def token(self) -> str:
        return self._launcher.token

    @property
    def connection_info(self) -> connection.ConnectionInfo | None:
        return getattr(self._launcher, "info", None)

    def close(self, timeout: float = SHUTDOWN_WAIT + 2.0) -> int | None:
        """Shut down (if running) and wait for the clean-up, bounded."""
        if self._thread is not None and not self._done.is_set():
            self.terminate()
            self._done.wait(timeout)
        return self.poll()

    def close_clients(self) -> None:
        """Free the local ports and drop their clients now, as a killed launcher process would
        (then ``terminate``): a restart's new kernel can bind them at once, and no client talks to
        the old kernel meanwhile."""
        self._launcher.close_clients()

    def forwards(self) -> list[Forward]:
        """The ports forwarded for this kernel (its ``forward`` key and ad hoc ones), while it runs."""
        return list(self._launcher.forwards)

    def forward(self, remote: int, local: int | None = None) -> Forward:
        """Launcher.forward on this kernel (the service's ``forward`` op)."""
        if self._launcher.tunnel is None:
            raise LaunchError(f"kernel {self.entry.name!r} is not serving yet: try again when it is ready")
        return self._launcher.forward(remote, local)

    def _announce(self, path: Path, entry: KernelEntry) -> None:
        self._ready.set()

    def _serve(self) -> None:
        code = 1
        try:
            code = self._launcher.serve()
        except RemoteKernelError as exc:
            self.error = exc
            code = exc.exit_code
        except Exception as exc:  # a bug: the caller must still learn that the kernel is gone
            log.debug("kernel %s: launcher failed", self.entry.name, exc_info=True)
            self.error = LaunchError(f"internal error serving kernel {self.entry.name!r}: {exc!r}")
        finally:
            self.exit_code = code
            self._done.set()
            self._ready.set()


def run_entry(entry: KernelEntry, connection_file: Path | None, *,
              announce: Callable[[Path, KernelEntry], None] | None = None) -> int:
    """Launch ``entry`` and serve it until the kernel exits; returns the exit code."""
    return Launcher(entry, connection_file, announce=announce).run()


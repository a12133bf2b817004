"""An authenticated connection (through its ProxyJump hops or ProxyCommand) and its exec channels.

``connect`` opens one transport per hop, each verified and authenticated (transport.py) before
anything is sent through it; ``SSHConnection`` runs commands (``open_exec``) and asks the server
whether it is still there (``probe``); ``ExecChannel`` is a running command's stdin, stdout,
stderr and exit status, whose stdout can be handed to a sink on paramiko's transport thread.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from remote_kernel.entry import HostEntry
from remote_kernel.errors import SSHError
from remote_kernel.ssh import _paramiko
from remote_kernel.ssh._paramiko import StdoutTap, paramiko
from remote_kernel.ssh.config import ResolvedHost, hop_chain, resolve_host
from remote_kernel.ssh.proxy import ProxyProcess
from remote_kernel.ssh.tracing import trace
from remote_kernel.ssh.transport import connection_closed, in_words, open_socket, start_transport

log = logging.getLogger("remote_kernel.ssh")  # one logger for the package: doctor quiets it, -v names it
_T = TypeVar("_T")

# The window we grant the remote side for one exec channel's output. paramiko's default (2 MiB)
# capped a kernel's 50 MB of output at ~1.3x OpenSSH's time; 16 MiB brought it to ~1.1x (bench/).
CHANNEL_WINDOW = 16 * 1024 * 1024
_CHUNK = 65536


def connect(host: HostEntry | ResolvedHost, *, timeout: float = 15.0) -> SSHConnection:
    """Open one authenticated SSH connection (through every ProxyJump hop or the ProxyCommand,
    each hop verified)."""
    resolved = host if isinstance(host, ResolvedHost) else resolve_host(host)
    hops = hop_chain(resolved)
    log.debug(
        "%s resolved to %s (keys: %s; known_hosts: %s)",
        resolved.alias,
        resolved.describe(),
        ", ".join(resolved.identity_files) or "agent/none",
        ", ".join(resolved.known_hosts) or "none",
    )
    transports: list[paramiko.Transport] = []
    proxies: list[ProxyProcess] = []
    try:
        for index, hop in enumerate(hops):
            via = (hops[index - 1], transports[-1]) if transports else None
            transports.append(_connect_hop(hop, via, hops[:index], proxies, timeout))
    except BaseException:
        for transport in reversed(transports):
            transport.close()
        for proxy in proxies:
            proxy.stop()
        raise
    return SSHConnection(resolved, transports, timeout=timeout, proxies=proxies)


def _connect_hop(
    hop: ResolvedHost,
    via: tuple[ResolvedHost, paramiko.Transport] | None,
    before: Sequence[ResolvedHost],
    proxies: list[ProxyProcess],
    timeout: float,
) -> paramiko.Transport:
    """One authenticated transport to ``hop``: through ``via``, its ProxyCommand (only the first
    hop of a chain has one: later hops are reached through the chain, as with ``ssh -J``), or
    direct."""
    started = time.monotonic()
    proxy = ProxyProcess.start(hop) if via is None and hop.proxy_command else None
    if proxy is not None:
        proxies.append(proxy)
    sock = proxy.socket if proxy is not None else open_socket(hop, via, timeout)
    log.debug("%s: TCP/channel open in %.0f ms", hop.address, (time.monotonic() - started) * 1000)
    trace("socket", hop, ms=(time.monotonic() - started) * 1000,
          via="proxycommand" if proxy is not None else "direct" if via is None else via[0].label)
    jump_spec = ",".join(f"{h.user}@{h.address}" for h in before)
    try:
        return start_transport(hop, sock, jump_spec, timeout)
    except SSHError as exc:
        if proxy is not None and proxy.is_to_blame(exc):
            raise proxy.failure(hop, exc) from exc
        raise


class SSHConnection:
    """One authenticated SSH transport to ``host`` (and the transports of its jump hosts)."""

    def __init__(
        self,
        host: ResolvedHost,
        transports: list[paramiko.Transport],
        *,
        timeout: float = 15.0,
        proxies: Sequence[ProxyProcess] = (),
    ) -> None:
        self.host = host
        self._transports = transports
        self._timeout = timeout
        self._proxies = list(proxies)

    def open_exec(self, command: str) -> ExecChannel:
        """A session channel running ``command`` (through the user's login shell, as ssh does)."""
        transport = self._transports[-1]
        started = time.monotonic()
        try:
            channel = transport.open_session(window_size=CHANNEL_WINDOW, timeout=self._timeout)
            tap = StdoutTap.install(channel)  # before exec: no byte of output can miss it
            _paramiko.send_exec_request(transport, channel, command)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise self._exec_error(exc) from exc
        log.debug(
            "exec channel on %s open in %.0f ms",
            self.host.address,
            (time.monotonic() - started) * 1000,
        )
        return ExecChannel(channel, self.host.label, tap)

    def _exec_error(self, exc: BaseException) -> SSHError:
        if connection_closed(exc) or not self._transports[-1].is_active():
            return SSHError(
                f"cannot run a command on {self.host.label}: the SSH connection closed before the command could start",
                host=self.host.label,
                hint="the network dropped or the server ended the connection; try again",
            )
        return SSHError(
            f"cannot run a command on {self.host.label}: {in_words(exc)}",
            host=self.host.label,
            hint="the connection may have dropped, or the server limits sessions (MaxSessions)",
        )

    def is_active(self) -> bool:
        return all(transport.is_active() for transport in self._transports)

    def probe(self) -> threading.Event:
        """Ask the server for a reply (``keepalive@openssh.com``, like ServerAliveInterval) and
        return an event set when it answers. paramiko's own keepalive wants no reply, so it cannot
        tell a silent link (a blackhole, a sleeping NAT) from an idle one. The request blocks until
        the reply or the transport's end, so it runs on a daemon thread: closing the connection
        ends it."""
        answered = threading.Event()
        transport = self._transports[-1]

        def ask() -> None:
            with contextlib.suppress(Exception):
                transport.global_request("keepalive@openssh.com", wait=True)  # a failure reply counts
                if transport.is_active():
                    answered.set()

        threading.Thread(target=ask, name="rk-ssh-probe", daemon=True).start()
        return answered

    def close(self) -> None:
        for transport in reversed(self._transports):
            transport.close()
        for proxy in self._proxies:
            proxy.stop()

    def __enter__(self) -> SSHConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ExecChannel:
    """A running remote command: its stdin, stdout, stderr and exit status."""

    def __init__(self, channel: paramiko.Channel, host_label: str, tap: StdoutTap | None = None) -> None:
        self._channel = channel
        self._host = host_label
        self._blocking = True
        self._tap = tap

    def fileno(self) -> int:
        """Readable when stdout data, stderr data or EOF arrives (for select/selectors)."""
        return self._channel.fileno()

    def _ready_or_eof(self, ready: bool) -> bool:
        return ready or _paramiko.at_eof(self._channel)

    def recv(self, n: int) -> bytes:
        """Up to ``n`` bytes of stdout; ``b""`` at EOF. Non-blocking mode raises BlockingIOError
        when nothing is buffered."""
        if not self._blocking and not self._ready_or_eof(self._channel.recv_ready()):
            raise BlockingIOError("no stdout data buffered")
        return self._guard(lambda: self._channel.recv(n))

    def recv_stderr(self, n: int) -> bytes:
        if not self._blocking and not self._ready_or_eof(self._channel.recv_stderr_ready()):
            raise BlockingIOError("no stderr data buffered")
        return self._guard(lambda: self._channel.recv_stderr(n))

    def recv_ready(self) -> bool:
        return self._channel.recv_ready()

    def recv_stderr_ready(self) -> bool:
        return self._channel.recv_stderr_ready()

    def deliver_to(self, sink: Callable[[bytes], None]) -> bool:
        """Hand stdout to ``sink`` as it arrives, on paramiko's transport thread; False when this
        channel cannot (read with ``recv`` then). The sink must not block and must never send on
        this connection: a send waits while keys are re-exchanged, which needs that very thread
        (ANCHORS.md: a re-key deadlock). The reader calls ``release`` for what it has consumed."""
        if self._tap is None:
            return False
        self._tap.set_sink(sink)
        return True

    def release(self, consumed: int) -> None:
        """Grant the remote side window for ``consumed`` bytes handed to the sink: what
        ``Channel.recv`` does after a read (a WINDOW_ADJUST once a tenth of the window is used).
        Not on the transport thread (see deliver_to)."""
        self._guard(lambda: _paramiko.grant_window(self._channel, consumed))

    def can_send_now(self, size: int) -> bool:
        """True when ``size`` bytes fit in the peer's window: sendall will not wait for it."""
        return _paramiko.can_send(self._channel, size)

    def sendall(self, data: bytes) -> None:
        """Send everything, blocking while the remote window is full."""
        # Not paramiko's sendall: it spins forever once the channel is closed (send returns 0).
        for start in range(0, len(data), _CHUNK):
            chunk = data[start : start + _CHUNK]
            while chunk:
                chunk = chunk[self._send_some(chunk) :]

    def _send_some(self, chunk: bytes) -> int:
        sent = self._guard(lambda: self._channel.send(chunk))
        if sent == 0:
            raise self._gone("the channel is closed")
        return sent

    def shutdown_write(self) -> None:
        with contextlib.suppress(OSError, EOFError):
            self._channel.shutdown_write()

    def set_blocking(self, blocking: bool) -> None:
        # The paramiko channel itself stays blocking, so sendall keeps blocking semantics.
        self._blocking = blocking

    def exit_status(self) -> int | None:
        """The command's exit status, -1 if it died without one (signal); None while running."""
        if not self._channel.exit_status_ready():
            return None
        return self._channel.recv_exit_status()

    def close(self) -> None:
        self._channel.close()

    @property
    def closed(self) -> bool:
        return _paramiko.is_closed(self._channel)

    def _gone(self, reason: str) -> SSHError:
        return SSHError(
            f"lost the SSH channel to {self._host}: {reason}",
            host=self._host,
            hint="the connection dropped or the server ended the session",
        )

    def _guard(self, call: Callable[[], _T]) -> _T:
        try:
            return call()
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise self._gone(in_words(exc)) from exc

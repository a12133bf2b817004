"""One hop of a connection: its socket, the SSH handshake, the host key check, authentication.

Every paramiko and socket exception of a hop leaves as an SSHError or HostKeyError naming the host
and saying what to do. We drive ``paramiko.Transport`` directly (not SSHClient) so each hop of a
ProxyJump chain is verified by the same code before anything is sent to it.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Any

from remote_kernel.errors import SSHError
from remote_kernel.ssh._paramiko import negotiated_cipher, paramiko, set_timeouts
from remote_kernel.ssh.auth import authenticate
from remote_kernel.ssh.config import ResolvedHost
from remote_kernel.ssh.hostkeys import find_known_keys, fingerprint, prefer_known_key_types, verify_host_key
from remote_kernel.ssh.tracing import trace

log = logging.getLogger("remote_kernel.ssh")  # one logger for the package: doctor quiets it, -v names it

# AES-GCM was the fastest paramiko cipher measured (ANCHORS.md); the rest keep paramiko's order.
PREFERRED_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")

# What paramiko says when the transport is already gone ("No existing session" is its jargon for
# "this connection has closed"); EOFError says nothing at all.
_CLOSED_CONNECTION = ("No existing session", "SSH session not active", "Socket is closed", "Channel closed.")
_PARAMIKO_WORDS = {
    "Unable to open channel.": "the server refused to open a channel",
    "Timeout opening channel.": "the server did not answer a request to open a channel in time",
}


class HandshakeError(SSHError):
    """The SSH handshake failed: through a ProxyCommand, most likely the command's fault."""


def connection_closed(exc: BaseException) -> bool:
    return isinstance(exc, EOFError) or str(exc) in _CLOSED_CONNECTION


def in_words(exc: BaseException) -> str:
    """A paramiko or socket exception as a user would say it."""
    if connection_closed(exc):
        return "the connection was closed"
    text = str(exc)
    return _PARAMIKO_WORDS.get(text, text or type(exc).__name__)


def _connect_error(hop: ResolvedHost, exc: BaseException, timeout: float) -> SSHError:
    if isinstance(exc, socket.gaierror):
        return SSHError(
            f"cannot resolve host name {hop.hostname!r} ({exc.strerror})",
            host=hop.label,
            hint="check hostname (or HostName in ~/.ssh/config) and your DNS / VPN",
        )
    if isinstance(exc, ConnectionRefusedError):
        return SSHError(
            f"connection to {hop.address} refused",
            host=hop.label,
            hint=f"is sshd running on {hop.address}?",
        )
    if isinstance(exc, TimeoutError):
        return SSHError(
            f"timed out after {timeout:g} s connecting to {hop.address}",
            host=hop.label,
            hint="check the address and port, VPN and firewall; a ProxyJump may be needed",
        )
    return SSHError(
        f"cannot connect to {hop.address}: {exc}",
        host=hop.label,
        hint="check the network route to it",
    )


def open_socket(hop: ResolvedHost, via: tuple[ResolvedHost, paramiko.Transport] | None, timeout: float) -> Any:
    if via is None:
        try:
            return socket.create_connection((hop.hostname, hop.port), timeout=timeout)
        except OSError as exc:
            raise _connect_error(hop, exc, timeout) from exc
    jump, transport = via
    try:
        return transport.open_channel("direct-tcpip", (hop.hostname, hop.port), ("127.0.0.1", 0), timeout=timeout)
    except (paramiko.SSHException, OSError, EOFError) as exc:
        reason = getattr(exc, "text", "") or in_words(exc)
        raise SSHError(
            f"jump host {jump.label} could not open a connection to {hop.address}: {reason}",
            host=hop.label,
            hint=f"the jump host must allow TCP forwarding (AllowTcpForwarding) to {hop.address}",
        ) from exc


def start_transport(hop: ResolvedHost, sock: Any, via: str, timeout: float) -> paramiko.Transport:
    """Handshake, host key check, authentication; the transport is closed on any failure."""
    started = time.monotonic()
    transport = paramiko.Transport(sock)
    try:
        set_timeouts(transport, timeout)
        known = find_known_keys(hop.known_hosts, hop.known_hosts_name)
        options = transport.get_security_options()
        fast = [c for c in PREFERRED_CIPHERS if c in options.ciphers]
        options.ciphers = [*fast, *(c for c in options.ciphers if c not in fast)]
        transport.use_compression(compress=False)  # compression made 50 MB of output slower
        prefer_known_key_types(transport, known)
        server_key = _handshake(transport, hop, timeout)
        trace("handshake", hop, ms=(time.monotonic() - started) * 1000, cipher=negotiated_cipher(transport),
              key_type=server_key.get_name(), fingerprint=fingerprint(server_key.asbytes()))
        verify_host_key(hop, server_key, known, via)
        handshake_done = time.monotonic()
        _authenticate_or_explain(transport, hop)
        if hop.keepalive > 0:
            transport.set_keepalive(max(1, round(hop.keepalive)))
        log.debug(
            "%s: handshake %.0f ms (cipher %s), auth %.0f ms",
            hop.address,
            (handshake_done - started) * 1000,
            negotiated_cipher(transport),
            (time.monotonic() - handshake_done) * 1000,
        )
    except BaseException:
        transport.close()
        raise
    return transport


def _handshake(transport: paramiko.Transport, hop: ResolvedHost, timeout: float) -> paramiko.PKey:
    """Key exchange; returns the server's host key (not yet trusted)."""
    try:
        transport.start_client(timeout=timeout)
        # start_client returns quietly when its timeout passes; this raises if kex is unfinished
        return transport.get_remote_server_key()
    except (paramiko.SSHException, OSError, EOFError) as exc:
        reason = transport.get_exception() or exc
        raise HandshakeError(
            f"SSH handshake with {hop.address} failed within {timeout:g} s: {in_words(reason)}",
            host=hop.label,
            hint=f"is {hop.address} an SSH server? Check the port, and the server's log",
        ) from exc


def _authenticate_or_explain(transport: paramiko.Transport, hop: ResolvedHost) -> None:
    try:
        authenticate(transport, hop)
    except (paramiko.SSHException, OSError, EOFError) as exc:
        raise SSHError(
            f"the connection to {hop.address} broke during authentication: {in_words(exc)}",
            host=hop.label,
            hint="see the server's log (MaxAuthTries, LoginGraceTime, AllowUsers)",
        ) from exc


"""Local connection files and the local listening ports they name.

A connection file holds the kernel's HMAC key, so it is only ever created 0600 (like
jupyter_client's ``secure_write``). The local ports are bound *before* the SSH connection is
made: a client that connects early is held open until the kernel exists (closing it would make
ZMQ lose its first request), and a port in use is reported before any remote work is done.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import secrets
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from remote_kernel import records
from remote_kernel.entry import HostEntry, parse_target
from remote_kernel.errors import LaunchError, UsageError
from remote_kernel.protocol import CHANNELS

log = logging.getLogger(__name__)
LOCALHOST = "127.0.0.1"


@dataclass(frozen=True)
class ConnectionInfo:
    ports: dict[str, int]
    key: str
    signature_scheme: str = "hmac-sha256"
    ip: str = LOCALHOST
    transport: str = "tcp"

    def to_dict(self, kernel_name: str) -> dict[str, Any]:
        info: dict[str, Any] = {f"{channel}_port": port for channel, port in self.ports.items()}
        info.update(ip=self.ip, transport=self.transport, key=self.key,
                    signature_scheme=self.signature_scheme, kernel_name=kernel_name)
        return info


def read_connection_file(path: Path) -> ConnectionInfo:
    """Read a connection file written by Jupyter (or by us)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"cannot read connection file {path}: {exc.strerror}") from exc
    except ValueError as exc:
        raise UsageError(f"connection file {path} is not valid JSON: {exc}") from exc
    try:
        ports = {channel: int(data[f"{channel}_port"]) for channel in CHANNELS}
    except (KeyError, TypeError, ValueError) as exc:
        raise UsageError(f"connection file {path} lacks a valid port entry ({exc})",
                         hint="it must hold shell_port, iopub_port, stdin_port, control_port, hb_port") from exc
    if data.get("transport", "tcp") != "tcp":
        transport = data.get("transport")
        raise UsageError(f"connection file {path} asks for transport {transport!r}; only tcp is served locally")
    ip = str(data.get("ip") or LOCALHOST)
    if ip not in (LOCALHOST, "localhost"):
        log.warning("connection file %s names ip %s; serving on %s only", path, ip, LOCALHOST)
    _warn_if_shared(path)
    return ConnectionInfo(ports=ports, key=str(data.get("key", "")),
                          signature_scheme=str(data.get("signature_scheme") or "hmac-sha256"))


def _warn_if_shared(path: Path) -> None:
    """The client's file is the client's: we serve it as found (refusing would only break the
    kernel, and the key may already have been read) but say that its key is exposed."""
    with contextlib.suppress(OSError):
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            log.warning("connection file %s is open to other users (mode %03o): anyone who reads its key can "
                        "run code in the kernel; Jupyter writes it 0600 unless JUPYTER_ALLOW_INSECURE_WRITES "
                        "is set", path, mode)


def bind_listeners(ports: dict[str, int] | None) -> dict[str, socket.socket]:
    """Listen on 127.0.0.1 for every channel (free ports when ``ports`` is None)."""
    listeners: dict[str, socket.socket] = {}
    try:
        for channel in CHANNELS:
            port = ports[channel] if ports else 0
            listeners[channel] = _listen(channel, port)
    except BaseException:
        close_all(listeners.values())
        raise
    return listeners


def _listen(channel: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # A restart reuses the same ports while the old connections sit in TIME_WAIT.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((LOCALHOST, port))
    except OSError as exc:
        sock.close()
        raise LaunchError(
            f"cannot listen on {LOCALHOST}:{port} for the {channel} channel: {exc.strerror}",
            hint="another process uses that port; close it or let Jupyter pick new ports (restart the kernel)",
        ) from exc
    sock.listen(64)
    sock.setblocking(False)
    return sock


def close_all(sockets: Any) -> None:
    for sock in sockets:
        with contextlib.suppress(OSError):
            sock.close()


def new_connection_info(listeners: dict[str, socket.socket]) -> ConnectionInfo:
    ports = {channel: sock.getsockname()[1] for channel, sock in listeners.items()}
    return ConnectionInfo(ports=ports, key=secrets.token_hex(32))


def write_connection_file(path: Path, info: ConnectionInfo, kernel_name: str) -> None:
    """Create ``path`` 0600 (it holds the HMAC key) atomically; its directory is made 0700. In
    jupyter_server's external_kernels directory the temp file is made beside it, not in it: the
    server adopts every file there that parses as a connection file."""
    staging = path.parent.parent if path.parent.name == "external_kernels" else None
    records.write_private_json(path, info.to_dict(kernel_name), indent=1, staging=staging)


def default_connection_file(runtime_dir: Path, host: HostEntry) -> Path:
    """``kernel-<ssh user>@<host alias>.json`` in ``runtime_dir``, named as v1.1 named it: the
    login user as ssh resolves it (the host's ``user``, else ~/.ssh/config's User, else the local
    login name; never $USER, which is unset under some Jupyter servers and may not be the SSH user)
    and the host as the user named it."""
    from remote_kernel import ssh  # paramiko: loaded here only for `start` without -f

    return default_connection_path(runtime_dir, ssh.resolve_host(host).user, host_alias(host))


def host_alias(host: HostEntry) -> str:
    """A [hosts] name or ~/.ssh/config alias as written; for a ``user@host:port`` target (v1.1's
    -t, or a kernel's ``host`` that names no [hosts] table) its host part."""
    try:
        return parse_target(host.name).host
    except ValueError:
        return host.name


def default_connection_path(runtime_dir: Path, user: str, host: str) -> Path:
    """``kernel-<user>@<host>.json`` like v1.1, with a suffix if that name is held by a live kernel."""
    stem = f"kernel-{user}@{host}".replace("/", "_")
    for attempt in range(1, 100):
        candidate = runtime_dir / (f"{stem}.json" if attempt == 1 else f"{stem}-{attempt}.json")
        if not candidate.exists() or not is_live(candidate):
            return candidate
    raise LaunchError(f"too many live kernels named {stem}-*.json in {runtime_dir}")


def is_live(path: Path) -> bool:
    """A connection file is live if something still listens on its shell port."""
    try:
        port = int(json.loads(path.read_text(encoding="utf-8"))["shell_port"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.5)
        return probe.connect_ex((LOCALHOST, port)) == 0


# Linux lists every TCP socket of this network namespace, with its owner, in these two tables.
TCP_TABLES = (Path("/proc/net/tcp"), Path("/proc/net/tcp6"))
ByteOrder = Literal["little", "big"]
_TIME_WAIT = "06"  # a closed connection's leftover: no process, no owner (uid 0), never a client


@dataclass(frozen=True)
class TcpRow:
    """One row of /proc/net/tcp or /proc/net/tcp6, addresses decoded (v4-mapped IPv6 as IPv4)."""

    local: tuple[str, int]
    remote: tuple[str, int]
    state: str
    uid: int


def can_see_socket_owners() -> bool:
    """Whether this system shows who owns a TCP socket (Linux's /proc/net/tcp; macOS and BSD do not)."""
    return TCP_TABLES[0].exists()


def peer_uid(sock: socket.socket) -> int | None:
    """The uid owning the other end of a loopback TCP connection, or None if that is not certain.

    On a shared machine (JupyterLab on a login node) any user can connect to 127.0.0.1; the HMAC
    key stops them sending, but not reading iopub. The client's socket is the one row whose
    (address, port) pairs are our peer's and ours, in that order. Ports alone are not enough
    (issue 16): another user can bind 127.0.0.2 with the owner's client port and connect to
    another of our ports, and a port-only match then finds the owner's row. None (no row, or
    more than one) means "refuse" wherever ``can_see_socket_owners()``.
    """
    try:
        client = _endpoint(sock.getpeername())
        server = _endpoint(sock.getsockname())
        tables = [path.read_text(encoding="ascii", errors="replace") for path in TCP_TABLES if path.exists()]
    except (OSError, ValueError):
        return None
    return owner_of_connection(tables, client=client, server=server)


def owner_of_connection(tables: list[str], *, client: tuple[str, int], server: tuple[str, int]) -> int | None:
    """The uid of the one socket connected from ``client`` to ``server`` in these tables (the
    text of /proc/net/tcp and tcp6: a dual-stack client's row is in tcp6, v4-mapped), else None."""
    wanted = (_normal_address(client[0]), client[1]), (_normal_address(server[0]), server[1])
    owners = [row.uid for table in tables for row in parse_tcp_table(table, ports=(client[1], server[1]))
              if (row.local, row.remote) == wanted and row.state != _TIME_WAIT]
    return owners[0] if len(owners) == 1 else None


def parse_tcp_table(text: str, *, ports: tuple[int, int] | None = None,
                    byteorder: ByteOrder = sys.byteorder) -> list[TcpRow]:
    """The rows of a /proc/net/tcp{,6} text; with ``ports`` (local, remote) only the rows with
    those ports (cheap: decoding every address of a busy login node's table is not)."""
    suffixes = None if ports is None else (f":{ports[0]:04X}", f":{ports[1]:04X}")
    rows = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 8 or (suffixes and not (fields[1].endswith(suffixes[0]) and fields[2].endswith(suffixes[1]))):
            continue
        with contextlib.suppress(ValueError):
            rows.append(TcpRow(_decode_endpoint(fields[1], byteorder), _decode_endpoint(fields[2], byteorder),
                               fields[3], int(fields[7])))
    return rows


def _decode_endpoint(text: str, byteorder: ByteOrder) -> tuple[str, int]:
    """``0100007F:1F90`` -> ("127.0.0.1", 8080). The kernel prints each 32-bit word of the
    address in host byte order (4 words for IPv6), the port in plain hex."""
    address, port = text.split(":")
    if len(address) not in (8, 32):
        raise ValueError(f"not an address: {address!r}")
    words = (int(address[i:i + 8], 16).to_bytes(4, byteorder) for i in range(0, len(address), 8))
    return _normal_address(str(ipaddress.ip_address(b"".join(words)))), int(port, 16)


def _endpoint(name: Any) -> tuple[str, int]:
    return str(name[0]).split("%")[0], int(name[1])


def _normal_address(text: str) -> str:
    """One spelling per address: ``::ffff:127.0.0.1`` (a dual-stack socket) is 127.0.0.1."""
    address = ipaddress.ip_address(text)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)

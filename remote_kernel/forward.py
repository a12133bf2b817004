"""Forwarded ports: a remote TCP port (a Dask dashboard, TensorBoard) reached on 127.0.0.1 here.

Each connection accepted on a forward's local listener is one more stream of the kernel's own link
(tunnel.py), opened on the channel ``tcp:<remote port>``; the agent connects it to 127.0.0.1:<port>
on the host where the kernel runs (the compute node of a Slurm kernel). No SSH port forwarding is
involved: it works where sshd has ``AllowTcpForwarding no`` and needs no second login.

Standard library only: ``from-spec`` reads the entry's ``forward`` before the kernel starts.
"""

from __future__ import annotations

import errno
import logging
import re
import socket
from dataclasses import dataclass
from typing import Any

from remote_kernel import protocol as P

log = logging.getLogger(__name__)

LOCALHOST = "127.0.0.1"
_SPEC = re.compile(r"^\s*(\d{1,5})\s*(?::\s*(\d{1,5})\s*)?$")


@dataclass(frozen=True)
class Forward:
    """One forward being served: 127.0.0.1:``local`` reaches ``remote`` on the kernel's host."""

    remote: int
    local: int
    requested: int  # the local port asked for (``local`` differs when it was taken)

    @property
    def url(self) -> str:
        return f"http://{LOCALHOST}:{self.local}/"

    def to_dict(self) -> dict[str, Any]:
        return {"remote": self.remote, "local": self.local, "requested": self.requested, "url": self.url}


def parse_forward(value: Any) -> tuple[int, int]:
    """``8787`` / ``"8787"`` -> (8787, 8787); ``"8888:9999"`` -> (8888, 9999): (remote, local).
    ValueError, saying what is expected, for anything else (a bool, 0, 70000, "a:b")."""
    if isinstance(value, int) and not isinstance(value, bool):
        return _port(value, value), _port(value, value)
    match = _SPEC.match(value) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f'expected a port (1-65535) or "REMOTE:LOCAL", found {value!r}')
    remote = _port(int(match[1]), value)
    return remote, _port(int(match[2]), value) if match[2] else remote


def _port(number: int, written: Any) -> int:
    if not 1 <= number <= 65535:
        raise ValueError(f"a port is a number from 1 to 65535, found {written!r}")
    return number


def format_forward(remote: int, local: int) -> str:
    """The stored form: ``"8787"`` when both ends are the same port, else ``"8888:9999"``."""
    return str(remote) if remote == local else f"{remote}:{local}"


def channel_for(remote: int) -> str:
    """The OPEN frame's payload for a forward ("tcp:8787"; the agent reads it: protocol.forward_port)."""
    return f"{P.FORWARD_PREFIX}{remote}"


def bind_forward(remote: int, local: int, where: str) -> tuple[socket.socket, Forward]:
    """A listener on 127.0.0.1:``local``, or on a free port when that one is taken (said at INFO,
    with the mapping: the URL to open is then another one). ``where``: the host, for the log."""
    try:
        sock = _listen(local)
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        sock = _listen(0)
        port = sock.getsockname()[1]
        log.info("local port %d is taken: forwarding %s:%d to port %d on %s instead (open http://%s:%d/)",
                 local, LOCALHOST, port, remote, where, LOCALHOST, port)
        return sock, Forward(remote, port, local)
    log.info("forwarding %s:%d to port %d on %s", LOCALHOST, local, remote, where)
    return sock, Forward(remote, local, local)


def _listen(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        # SO_REUSEADDR: a port in TIME_WAIT after the last kernel is ours again; on Linux and
        # macOS it never lets two listeners share a port, so "taken" is still seen.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((LOCALHOST, port))
        sock.listen(64)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock

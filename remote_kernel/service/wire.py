"""JSON lines over the service's Unix socket, and the peer check.

One message per line, at most MAX_LINE bytes. Sends are locked (a kernel's log lines and its
events come from several threads). Only a peer of our own uid is served (SO_PEERCRED): the
socket's 0600 mode and the 0700 directory already say so, and this holds even if they are loosened.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import threading
from typing import Any

MAX_LINE = 1 << 20


class WireError(Exception):
    """The peer sent something that is not one of our messages, or went away mid-line."""


class Channel:
    """One end of a service conversation."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._file = sock.makefile("rb")
        self._send_lock = threading.Lock()

    def send(self, message: dict[str, Any]) -> bool:
        """Send one message; False when the peer is gone."""
        data = json.dumps(message, separators=(",", ":")).encode() + b"\n"
        with self._send_lock:
            try:
                self.sock.sendall(data)
            except OSError:
                return False
        return True

    def receive(self) -> dict[str, Any] | None:
        """The next message, or None at the end of the conversation."""
        try:
            line = self._file.readline(MAX_LINE + 1)
        except (OSError, ValueError):
            return None
        if not line:
            return None
        if len(line) > MAX_LINE or not line.endswith(b"\n"):
            raise WireError("a message over 1 MiB or cut short")
        try:
            message = json.loads(line)
        except ValueError as exc:
            raise WireError(f"not JSON: {exc}") from exc
        if not isinstance(message, dict):
            raise WireError("not a JSON object")
        return message

    def close(self) -> None:
        for closer in (self._file.close, lambda: self.sock.shutdown(socket.SHUT_RDWR), self.sock.close):
            with contextlib.suppress(OSError):
                closer()


def peer_uid(sock: socket.socket) -> int | None:
    """The uid of the process at the other end (Linux SO_PEERCRED); None where unknown."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return None
    raw = sock.getsockopt(socket.SOL_SOCKET, option, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", raw)
    return int(uid)


def same_user(sock: socket.socket) -> bool:
    uid = peer_uid(sock)
    return uid is None or uid == os.getuid()


class ForeignPeer(OSError):  # noqa: N818 - reads as what was found, like the OSErrors beside it
    """The socket is served by another uid."""

    def __init__(self, uid: int) -> None:
        super().__init__(f"served by uid {uid}")
        self.uid = uid


def dial(path: str, timeout: float) -> socket.socket:
    """A Unix socket connected to ``path`` whose peer is our own uid (SO_PEERCRED), blocking once
    connected: OSError when nothing listens there, ForeignPeer when another uid does."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
        uid = peer_uid(sock)
    except OSError:
        sock.close()
        raise
    if uid is not None and uid != os.getuid():
        sock.close()
        raise ForeignPeer(uid)
    sock.settimeout(None)
    return sock

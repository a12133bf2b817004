"""What ``connect`` did, step by step, for ``remote-kernel doctor`` (per thread, off by default)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

from remote_kernel.ssh.config import ResolvedHost

_tracing = threading.local()


@contextlib.contextmanager
def traced() -> Iterator[list[dict[str, Any]]]:
    """Record what ``connect`` does on this thread, for ``remote-kernel doctor``: dicts with an
    ``event`` (socket, handshake, host_key, auth_offered, auth), the ``hop`` (its label) and the
    figures, in order. While tracing, authentication first asks the server which methods it
    offers (the "none" request OpenSSH's client always sends)."""
    events: list[dict[str, Any]] = []
    previous = getattr(_tracing, "events", None)
    _tracing.events = events
    try:
        yield events
    finally:
        _tracing.events = previous


def tracing() -> bool:
    """Is ``traced`` on for this thread?"""
    return getattr(_tracing, "events", None) is not None


def trace(event: str, hop: ResolvedHost, **figures: Any) -> None:
    events = getattr(_tracing, "events", None)
    if events is not None:
        events.append({"event": event, "hop": hop.label, **figures})

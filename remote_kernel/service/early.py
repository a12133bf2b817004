"""The argv launcher's head start (issue 14): ``python -m remote_kernel from-spec DIR -f FILE``
(what Jupyter runs for every kernel start) hands its ``serve`` request to a running per-user
service before it imports the rest of the launcher (the command line, the entry model, logging,
the service client: ~50-70 ms on a small machine), so the service connects and starts the kernel
meanwhile. With no service running it starts one (the double-forked daemon imports its ~0.3 s
while this process imports too) and the ordinary path sends the request once it listens.

Only for exactly that argv form, a spec directory holding kernel.json, stderr that is not a
terminal (under Jupyter) and a valid ``$REMOTE_KERNEL_LOG`` (or none); anything else, and any
trouble at all, leaves the whole launch to the ordinary path (cli.py, from_spec_cmd.py,
client.HostedLaunch), which also validates the entry and takes the request over
(``take``): a request whose entry or connection file differs from what the ordinary path
resolved is dropped (the service stops a start whose conversation ends). Standard library and
the service's light modules only.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from remote_kernel import service
from remote_kernel.service import paths
from remote_kernel.service.wire import Channel, dial

# console.py's $REMOTE_KERNEL_LOG names (it imports logging: this module may not).
_LEVELS = {"": 20, "debug": 10, "info": 20, "warning": 30, "error": 40}


class _Sent:
    def __init__(self, channel: Channel, entry: dict[str, Any], connection_file: str) -> None:
        self.channel, self.entry, self.connection_file = channel, entry, connection_file


class HeadStart:
    """What this process did ahead (one per process: ``state``)."""

    def __init__(self) -> None:
        self.sent: _Sent | None = None
        self.spawned = False  # it started the service (client.ensure waits for it, starts no other)


state = HeadStart()


def begin(args: list[str]) -> None:
    """Send the serve request now if ``args`` (after ``from-spec``) allow it; never raises."""
    try:
        _begin(args)
    except Exception:  # noqa: BLE001 - the ordinary path does everything (and reports) by itself
        drop()


def _begin(args: list[str]) -> None:
    if len(args) != 3 or args[1] != "-f" or not service.enabled() or sys.stderr.isatty():
        return
    level = _LEVELS.get(os.environ.get("REMOTE_KERNEL_LOG", "").strip().lower())
    if level is None:
        return  # the ordinary path warns about the value
    spec = json.loads((Path(args[0]) / "kernel.json").read_text(encoding="utf-8"))
    entry = spec["metadata"]["remote_kernel"]["entry"]
    if not isinstance(entry, dict):
        return
    directory = paths.runtime_dir()
    channel = _connect(paths.socket_path(directory))
    if channel is None:
        _start_service(directory)
        return
    from jupyter_core.paths import jupyter_runtime_dir  # what start_cmd._serve sends too

    connection_file = str(Path(args[2]).absolute())
    request = {"op": "serve", "entry": entry, "pid": os.getpid(), "connection_file": connection_file,
               "runtime_dir": jupyter_runtime_dir(), "askpass": service.askpass_env(os.environ), "level": level}
    state.sent = _Sent(channel, entry, connection_file)
    if not channel.send(request):
        drop()


def _connect(path: Path) -> Channel | None:
    try:
        return Channel(dial(str(path), 2.0))
    except OSError:
        return None  # nothing there, or another uid's: client.connect says which


def _start_service(directory: Path) -> None:
    """No service listens: start one now, under the start lock if nobody holds it (a launch that
    holds it is starting one already); client.ensure then waits for it to listen."""
    import fcntl

    from remote_kernel.service import client

    fd = os.open(paths.lock_path(paths.private_dir(directory)), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return
        if _connect(paths.socket_path(directory)) is None:
            client.spawn()
            state.spawned = True
    finally:
        os.close(fd)


def take(entry: dict[str, Any], connection_file: Path | None) -> Channel | None:
    """The channel of the request sent early, if it is the one the ordinary path would send."""
    sent, state.sent = state.sent, None
    if sent is None:
        return None
    wanted = str(connection_file) if connection_file is not None else None
    if sent.connection_file != wanted or _canonical(sent.entry) != _canonical(entry):
        sent.channel.close()  # the service stops the start it began for it
        return None
    return sent.channel


def drop() -> None:
    sent, state.sent = state.sent, None
    if sent is not None:
        sent.channel.close()


def _canonical(entry: dict[str, Any]) -> dict[str, Any]:
    """An entry as the service reads it (KernelEntry.from_dict(...).to_dict()), for comparison."""
    from remote_kernel.entry import KernelEntry

    return KernelEntry.from_dict(entry).to_dict()

"""Detached kernels: what the local side needs to take a kernel over again (issue 15).

A detached kernel (``remote-kernel start NAME --detach``) is hosted by the per-user service with
nobody's terminal or notebook owning it; its remote agent keeps it for its lease (``--lease``,
``detached_lease``) while no launcher is attached. Its record, one 0600 JSON file per kernel in
a 0700 directory of the user's state dir (``$XDG_STATE_HOME/remote-kernel/kernels``, which
survives a reboot, unlike $XDG_RUNTIME_DIR), holds the entry, where the agent is (the locator),
the token that proves the kernel is ours, and the connection (ports and key), so ``attach`` can
serve the same connection file again after the service or the machine went down. Nothing else
holds the token. ``stop``, the kernel's end and ``gc`` (a kernel no longer on its host) remove it.

Its connection file goes to Jupyter's ``<runtime dir>/external_kernels``, where a jupyter_server
started with ``--ServerApp.allow_external_kernels=True`` lists it as a running kernel.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from remote_kernel import records
from remote_kernel.backends import Locator
from remote_kernel.connection import ConnectionInfo
from remote_kernel.entry import KernelEntry
from remote_kernel.errors import UsageError
from remote_kernel.protocol import CHANNELS

EXTERNAL_KERNELS = "external_kernels"  # jupyter_server's default external_connection_dir, under runtime_dir


@dataclasses.dataclass(frozen=True)
class DetachedRecord(records.Record):
    id: str
    name: str  # the entry's name
    host: str  # the host's label
    entry: Mapping[str, Any]  # KernelEntry.to_dict(): the entry as it was started (the config may change)
    locator: Mapping[str, Any]
    token: str
    connection_file: str
    ports: Mapping[str, int]
    key: str
    signature_scheme: str
    lease: float
    started: float  # wall-clock time of the start

    def kernel_entry(self) -> KernelEntry:
        return KernelEntry.from_dict(self.entry)

    def where(self) -> Locator:
        return Locator.from_dict(dict(self.locator))

    def connection(self) -> ConnectionInfo:
        return ConnectionInfo(ports={channel: int(self.ports[channel]) for channel in CHANNELS}, key=self.key,
                              signature_scheme=self.signature_scheme)


def new_id() -> str:
    return secrets.token_hex(4)


def state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "remote-kernel"


def records_dir() -> Path:
    from remote_kernel.service.paths import private_dir

    return private_dir(state_dir() / "kernels")


def record_path(kernel_id: str) -> Path:
    return records_dir() / f"{kernel_id}.json"


def connection_path(kernel_id: str, name: str) -> Path:
    """Where a detached kernel's connection file goes: jupyter_server's external_connection_dir."""
    from jupyter_core.paths import jupyter_runtime_dir

    return Path(jupyter_runtime_dir()) / EXTERNAL_KERNELS / f"kernel-rk-{name}-{kernel_id}.json"


def save(record: DetachedRecord) -> Path:
    path = record_path(record.id)
    records.write_private_json(path, record.to_dict(), indent=1)
    return path


def load_all() -> list[DetachedRecord]:
    """Every readable record, oldest first (an unreadable file is skipped: it is only ours to fix)."""
    found = []
    for path in sorted(records_dir().glob("*.json")):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            found.append(DetachedRecord.from_dict(json.loads(path.read_text(encoding="utf-8"))))
    return sorted(found, key=lambda record: record.started)


def find(what: str) -> DetachedRecord:
    """The record with id ``what``, or the only one of entry ``what``; a usage error naming the
    candidates otherwise."""
    every = load_all()
    by_id = [record for record in every if record.id == what]
    if by_id:
        return by_id[0]
    by_name = [record for record in every if record.name == what]
    if len(by_name) == 1:
        return by_name[0]
    if by_name:
        ids = ", ".join(record.id for record in by_name)
        raise UsageError(f"{len(by_name)} detached kernels of entry {what!r}: {ids}", hint="name one by its id")
    known = ", ".join(f"{record.id} ({record.name})" for record in every) or "none"
    raise UsageError(f"no detached kernel {what!r}; detached kernels: {known}",
                     hint="`remote-kernel ps` lists them; `remote-kernel start NAME --detach` starts one")


def forget(record: DetachedRecord, *, connection_file: bool = True) -> None:
    """Remove the record (and the connection file, so jupyter_server stops listing the kernel)."""
    with contextlib.suppress(OSError):
        record_path(record.id).unlink()
    if connection_file:
        with contextlib.suppress(OSError):
            Path(record.connection_file).unlink()


def lease_left(record: DetachedRecord, detached_at: float | None, now: float | None = None) -> float | None:
    """Seconds the remote keeps the kernel with nobody attached; None while attached."""
    if detached_at is None:
        return None
    return max(0.0, detached_at + record.lease - (now if now is not None else time.time()))


def describe(service: Mapping[str, Any] | None, remote_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``ps`` rows of the detached kernels: attached (served by the running service, with its
    client count) or detached (with the lease left, from its host's answer when it was asked)."""
    hosted = {k.get("kernel_id"): k for k in (service or {}).get("kernels", []) if k.get("kernel_id")}
    by_dir = {row.get("dir"): row for row in remote_rows}  # a random name: one kernel on one machine
    rows = []
    for record in load_all():
        served = hosted.get(record.id)
        remote = by_dir.get(record.where().dir)
        rows.append({
            "id": record.id, "entry": record.name, "host": record.host,
            "state": "attached" if served is not None else "detached",
            "lease": record.lease,
            "lease_left": None if served is not None or remote is None else remote.get("lease_left"),
            "connection_file": record.connection_file,
            "clients": int(served.get("clients") or 0) if served is not None else 0,
            "started": record.started,
        })
    return rows


def collect_garbage(service: Mapping[str, Any] | None, targets: list[Any], *, dry_run: bool) -> list[dict[str, Any]]:
    """``gc``: forget the records of detached kernels that are no longer on their host (the host
    answered, and none of its agents lives in the kernel's directory). A kernel the service
    serves, or whose host did not answer, is kept."""
    from remote_kernel import inventory

    hosted = {k.get("kernel_id") for k in (service or {}).get("kernels", [])}
    waiting = [record for record in load_all() if record.id not in hosted]
    asked = [target for target in targets if any(record.host == target.host.label for record in waiting)]
    if not asked:
        return []
    answers = inventory.ask_hosts(asked, {"mode": "list"})
    alive: dict[str, set[str]] = {}
    for answer in answers:
        if answer.error is None:
            agents = (answer.answer or {}).get("agents", [])
            alive[answer.target.host.label] = {str(a.get("dir")) for a in agents if a.get("alive") is not False}
    actions = []
    for record in waiting:
        if record.host in alive and record.where().dir not in alive[record.host]:
            if not dry_run:
                forget(record)
            actions.append({"host": "local", "action": "forget-detached", "name": record.name,
                            "path": str(record_path(record.id)), "id": record.id})
    return actions

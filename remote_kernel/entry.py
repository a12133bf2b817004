"""Resolved, launchable entries: plain frozen dataclasses with a stable JSON form.

The JSON form and ``fingerprint()`` are derived from the fields (``records.Record``), and each
default is declared once, on the field: a new field is one line here (plus, if the TOML may set it,
one on config.py's ``KernelSettings``). Old stored forms load (missing keys take the defaults), and so
do newer ones (unknown keys are ignored).

config.py turns the TOML (validated by pydantic) into these; kernelspec.py stores
``KernelEntry.to_dict()`` in ``kernel.json`` so that ``from-spec`` launches without the TOML and
without importing pydantic (startup cost); the v1.1 ``-t`` command line builds them directly.
Standard library only.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from remote_kernel.errors import UsageError
from remote_kernel.records import Record

ENTRY_SCHEMA = 1

DEFAULT_PYTHON = "python3"
DEFAULT_STARTUP_TIMEOUT = 60.0
DEFAULT_KEEPALIVE = 15.0
DEFAULT_RECONNECT_GRACE = 300.0
DEFAULT_OUTPUT_BACKLOG = 64 * 1024 * 1024
DEFAULT_DETACHED_LEASE = 3 * 86400.0  # seconds: three days (a weekend)
HOST_KEY_POLICIES = ("strict", "accept-new")
INTERRUPT_MODES = ("message", "signal")
# How Jupyter launches the kernel: argv (`python -m remote_kernel from-spec`, works with every
# client) or our jupyter_client provisioner (in the server's process; argv stays as the fallback).
LAUNCHERS = ("argv", "provisioner")
PROVISIONER_NAME = "remote-kernel-provisioner"

KERNEL_NAME_RULE = (
    "Kernel names can only contain ASCII letters and numbers and these separators:"
    " - . _ (hyphen, period, and underscore); they are stored lower-case."
)
_KERNEL_NAME = re.compile(r"^[a-z0-9._-]+$", re.IGNORECASE)
# [user@]host[:port]; IPv6 literals go in brackets: [user@][::1][:port]
_TARGET = re.compile(
    r"^(?:(?P<user>[^@\s]+)@)?"
    r"(?:\[(?P<v6>[0-9A-Fa-f:.%\w]+)\]|(?P<host>[^:@\s\[\]]+))"
    r"(?::(?P<port>\d+))?$"
)


def is_valid_kernel_name(name: str) -> bool:
    return bool(_KERNEL_NAME.match(name)) and name not in (".", "..")


@dataclass(frozen=True)
class Target:
    """An ad-hoc ``[user@]host[:port]`` SSH target."""

    host: str
    user: str | None = None
    port: int | None = None


def parse_target(text: str) -> Target:
    """Parse ``[user@]host[:port]`` (IPv6 as ``[::1]``); raise ValueError saying what is expected."""
    match = _TARGET.match(text.strip())
    if not match:
        raise ValueError(f"expected [user@]host[:port] (IPv6 in brackets, e.g. alice@[::1]:22), found {text!r}")
    port = int(match["port"]) if match["port"] else None
    if port is not None and not 1 <= port <= 65535:
        raise ValueError(f"port must be between 1 and 65535, found {port} in {text!r}")
    return Target(host=match["v6"] or match["host"], user=match["user"], port=port)


@dataclass(frozen=True)
class HostEntry(Record):
    """How to reach one SSH host. ``None`` means: ask ~/.ssh/config, then use ssh's default."""

    name: str
    hostname: str | None = None
    port: int | None = None
    user: str | None = None
    identity_file: str | None = None
    proxy_jump: tuple[HostEntry, ...] = ()
    known_hosts: str | None = None
    host_key_policy: str = "strict"
    keepalive: float = DEFAULT_KEEPALIVE

    @property
    def label(self) -> str:
        """How the host is named in messages: ``alice@lab.example.org:2222 (lab)``."""
        host = self.hostname or self.name
        shown = f"[{host}]" if ":" in host else host  # IPv6 literal: brackets keep the port apart
        text = f"{self.user}@{shown}" if self.user else shown
        if self.port:
            text += f":{self.port}"
        return text if self.name in (host, text) else f"{text} ({self.name})"

    @classmethod
    def from_target(cls, text: str, **options: Any) -> HostEntry:
        target = parse_target(text)
        return cls(name=text, hostname=target.host, port=target.port, user=target.user, **options)


@dataclass(frozen=True)
class SlurmSettings(Record):
    """``[kernels.NAME.slurm]``: run the kernel inside a Slurm job (backends/slurm.py). Values are
    sbatch's (``time`` in Slurm's forms); ``extra_args`` go to sbatch as they are."""

    partition: str | None = None
    account: str | None = None
    time: str | None = None
    cpus: int | None = None
    mem: str | None = None
    gpus: str | None = None
    qos: str | None = None
    constraint: str | None = None
    reservation: str | None = None
    extra_args: tuple[str, ...] = ()
    queue_timeout: float | None = None  # seconds the job may wait in the queue (None: no bound)


@dataclass(frozen=True)
class KernelEntry(Record):
    """Everything needed to launch one remote kernel."""

    name: str
    host: HostEntry
    display_name: str
    python: str = DEFAULT_PYTHON
    setup: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None
    command: tuple[str, ...] | None = None
    kernel_args: tuple[str, ...] = ()
    language: str = "python"
    interrupt_mode: str = "signal"
    startup_timeout: float = DEFAULT_STARTUP_TIMEOUT
    reconnect_grace: float = DEFAULT_RECONNECT_GRACE
    runtime_dir: str | None = None
    output_backlog: int = DEFAULT_OUTPUT_BACKLOG
    detached_lease: float = DEFAULT_DETACHED_LEASE  # `start --detach`: the remote keeps it this long unattended
    launcher: str = "argv"
    slurm: SlurmSettings | None = None  # set: the kernel runs in a Slurm job
    forward: tuple[str, ...] = ()  # remote ports reached locally: "REMOTE" or "REMOTE:LOCAL" (forward.py)
    spare_kernel: bool = True  # the per-user service keeps one kernel of this entry started ahead

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        if data.get("slurm") is None:
            del data["slurm"]  # entries without it keep their stored form and fingerprint
        if not data.get("forward"):
            del data["forward"]  # the same
        if data.get("detached_lease") == DEFAULT_DETACHED_LEASE:
            del data["detached_lease"]  # the same
        if data.get("spare_kernel") is True:
            del data["spare_kernel"]  # the same
        return {"schema": ENTRY_SCHEMA, **data}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> KernelEntry:
        if isinstance(data, Mapping) and "display_name" not in data and "name" in data:
            data = {**data, "display_name": data["name"]}  # hand-written entries may leave it out
        return super().from_dict(data)

    def fingerprint(self) -> str:
        """A stable hash of everything that affects the launch (sync compares these): every field,
        since ``to_dict`` is derived from the fields."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_BYTE_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)(b?)\s*$", re.IGNORECASE)


def parse_duration(value: float | str) -> float:
    """Seconds: a number, or ``90s``, ``15m``, ``12h``, ``3d`` (ValueError saying what is expected)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    match = _DURATION.match(str(value).lower())
    if not match:
        raise ValueError(f'expected seconds or a string like "90s", "15m", "12h", "3d", found {value!r}')
    return float(match[1]) * _DURATION_UNITS[match[2]]


def parse_byte_size(value: int | str) -> int:
    """Bytes: an integer, or ``64MiB``, ``512MB``, ``1G`` (K/M/G/T; with or without ``i``: powers of 1024)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    match = _BYTE_SIZE.match(str(value))
    if not match:
        raise ValueError(f'expected bytes or a string like "64MiB", "512MB", "1GiB", found {value!r}')
    power = " kmgt".index(match[2].lower() or " ")
    return int(float(match[1]) * 1024**power)


# v1.1's -c: a leading bare python becomes {python}, the entry's interpreter after its setup lines.
_BARE_PYTHON = re.compile(r"python[0-9.]*")


def kernel_command(text: str) -> list[str]:
    """``python -m spyder_kernels.console`` -> ``["{python}", "-m", "spyder_kernels.console"]``.

    A leading bare python (python, python3, python3.11) becomes ``{python}`` so the entry's
    ``python`` setting applies; an explicit path is kept as written.
    """
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise UsageError(f"-c {text!r}: {exc}") from exc
    if not words:
        raise UsageError("-c: the kernel command is empty")
    if _BARE_PYTHON.fullmatch(words[0]):
        words[0] = "{python}"
    return words

"""The per-user service: one process of the user's own that owns authenticated SSH connections
(one per host and jump chain, shared by every kernel on that host) and hosts the kernels whose
launchers ask it to (issue 14).

- ``paths``: the 0700 runtime directory, the 0600 socket, the lock, pid and log files.
- ``wire``: JSON lines over the Unix socket; every peer's uid checked (SO_PEERCRED).
- ``pool``: the shared connections (single-flight connect and re-authentication, keepalives,
  a second connection when a host refuses another session) and ``ServiceConnector``.
- ``prompts``: who answers authentication's questions (terminal, SSH_ASKPASS, nobody).
- ``server``: the daemon (``python -m remote_kernel service run``): login/logout, status, stop,
  and ``serve``, which runs a kernel's ``RemoteKernel`` for an argv launcher that relays its
  lifecycle (signals in, exit code out).
- ``client``: reach the service or start it (double fork, setsid, a lock against two starts).

``REMOTE_KERNEL_SERVICE=off`` makes launches serve in-process as before the service existed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

ENV_SWITCH = "REMOTE_KERNEL_SERVICE"
ENV_IDLE = "REMOTE_KERNEL_SERVICE_IDLE"
DEFAULT_IDLE = 600.0  # seconds without kernels, logins or clients before the service exits


def enabled() -> bool:
    """Do launches go through the service? (REMOTE_KERNEL_SERVICE=off|0|no: serve in-process.)"""
    return os.environ.get(ENV_SWITCH, "on").strip().lower() not in ("off", "0", "no", "false")


def idle_limit() -> float:
    try:
        return max(1.0, float(os.environ.get(ENV_IDLE, DEFAULT_IDLE)))
    except ValueError:
        return DEFAULT_IDLE


# What the service needs of a launcher's environment to ask through its SSH_ASKPASS program.
ASKPASS_ENV = ("SSH_ASKPASS", "SSH_ASKPASS_REQUIRE", "DISPLAY", "WAYLAND_DISPLAY", "XAUTHORITY")


def askpass_env(env: Mapping[str, str]) -> dict[str, str]:
    """The part of a launcher's environment the service needs to ask through its SSH_ASKPASS."""
    return {name: env[name] for name in ASKPASS_ENV if env.get(name)}

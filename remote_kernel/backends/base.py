"""The backend seam: what the launcher, ``ps``/``gc`` and (later) the per-user service need to
start, find again and query a kernel's agent, whatever stands between us and it.

- ``Connector``: acquire/release an authenticated SSH connection to a host. ``DirectConnector``
  opens one per acquire (and closes it on release); a shared connection plugs in here.
- ``Backend``: start the agent (its ``start`` request, key included, travels on the channel's
  stdin), attach to a running one, run a one-shot query (``list``/``gc`` modes). Each returns the
  open uplink (an ssh.ExecChannel) with the request already sent.
- ``Locator``: what is needed to find an agent again (restart records, ``ps``): the backend kind,
  the host, the agent's private directory, and for batch backends the job and node.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Protocol

from remote_kernel.entry import HostEntry, KernelEntry
from remote_kernel.errors import LaunchError


class AgentGoneError(LaunchError):
    """The place the agent lived in has ended for good (a batch job: TIMEOUT, CANCELLED, ...):
    reconnecting cannot bring it back, so the launcher stops retrying and says why."""


@dataclass(frozen=True)
class Locator:
    """Where a kernel's agent lives."""

    kind: str  # the backend: "ssh" (the agent on the host itself)
    host: str  # the host's label, as the entry names it
    dir: str  # the agent's private directory (agent.sock is there)
    job_id: str | None = None  # batch backends: the job holding the agent
    node: str | None = None  # ... and the node it runs on
    job_dir: str | None = None  # ... and the name of the job's directory (where a restart asks)

    def to_dict(self) -> dict[str, Any]:
        return {name: value for name, value in asdict(self).items() if value is not None}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Locator:
        known = {field.name for field in fields(cls)}
        return cls(**{name: data[name] for name in known if data.get(name) is not None})


class Connection(Protocol):
    """What a backend needs of an SSH connection (ssh.SSHConnection)."""

    def open_exec(self, command: str) -> Any: ...

    def close(self) -> None: ...


class Connector(Protocol):
    def acquire(self, host: HostEntry, *, timeout: float = ...) -> Any: ...

    def release(self, connection: Any) -> None: ...


class DirectConnector:
    """A new connection per acquire, closed on release (a connection of one's own)."""

    def acquire(self, host: HostEntry, *, timeout: float = 15.0) -> Any:
        from remote_kernel import ssh  # paramiko is imported only when we really connect

        return ssh.connect(host, timeout=timeout)

    def release(self, connection: Any) -> None:
        connection.close()


class Backend(Protocol):
    kind: str
    # When the agent's place started (a batch job's start, after its queue wait): startup_timeout
    # counts from there. None: from the launch itself.
    started_at: float | None
    queued: bool  # the start waits in a batch queue: no kernel yet (an interrupt gives up the wait)

    def cancel(self, reason: str = "") -> None:
        """Give up a start that waits (a batch queue): the launcher was told to stop (``reason``,
        e.g. "Ctrl-C", ends the error message)."""

    def check(self, connection: Any) -> None:
        """Raise AgentGoneError if the agent's place has ended (nothing for a plain SSH host)."""

    def start(self, connection: Any, entry: KernelEntry, request: dict[str, Any], *,
              setup_budget: float | None = None) -> Any:
        """Run a new agent in ``start`` mode for ``entry``; ``request`` is its BOOT request;
        ``setup_budget`` bounds the entry's setup lines (what is left of startup_timeout)."""

    def attach(self, connection: Any, entry: KernelEntry, locator: Locator) -> Any:
        """Join a running agent (after a drop); the caller then introduces itself (HELLO)."""

    def query(self, connection: Any, entry: KernelEntry, request: dict[str, Any]) -> Any:
        """Run the agent in a one-shot mode (``list``, ``gc``); read its answer from the uplink."""

    def locator(self, entry: KernelEntry, ready: dict[str, Any]) -> Locator:
        """Where the agent that sent READY (``ready``) can be found again."""

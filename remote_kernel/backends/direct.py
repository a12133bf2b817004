"""The agent on the SSH host itself: one exec channel runs the dispatcher, the cd/setup script
and the bootstrap (bootstrap.py); the agent program and its request follow on stdin."""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

from remote_kernel import bootstrap
from remote_kernel.backends.base import Locator
from remote_kernel.entry import KernelEntry
from remote_kernel.errors import RemoteKernelError

log = logging.getLogger(__name__)


class DirectBackend:
    kind = "ssh"
    started_at: float | None = None
    queued = False

    def cancel(self, reason: str = "") -> None:
        """Nothing waits: a start on the host itself is bounded by startup_timeout alone."""

    def check(self, connection: Any) -> None:
        """The host outlives its kernels: nothing ends under the agent."""

    def start(self, connection: Any, entry: KernelEntry, request: dict[str, Any], *,
              setup_budget: float | None = None) -> Any:
        channel = self._exec(connection, entry, start=True, setup_budget=setup_budget,
                             spare=request.get("mode") == "spare")
        # The key and token travel on stdin, inside the encrypted session; never in argv. The
        # remote command can end before it reads them (python not found: exit 127; a missing cwd):
        # the caller learns why from the channel's exit status and stderr, not from this send.
        with contextlib.suppress(RemoteKernelError):
            channel.sendall(bootstrap.agent_input(request))
        return channel

    def attach(self, connection: Any, entry: KernelEntry, locator: Locator) -> Any:
        channel = self._exec(connection, entry, start=False)
        channel.sendall(bootstrap.agent_input({"mode": "attach", "dir": locator.dir}))
        return channel

    def query(self, connection: Any, entry: KernelEntry, request: dict[str, Any]) -> Any:
        channel = self._exec(connection, entry, start=False)
        channel.sendall(bootstrap.agent_input(request))
        return channel

    def locator(self, entry: KernelEntry, ready: dict[str, Any]) -> Locator:
        return Locator(kind=self.kind, host=entry.host.label, dir=str(ready["dir"]))

    def _exec(self, connection: Any, entry: KernelEntry, *, start: bool, setup_budget: float | None = None,
              spare: bool = False) -> Any:
        """The exec channel with the dispatcher's script sent. ``start=False`` (attach, query)
        leaves out the ``cd`` and the setup lines: the agent code needs only the python.
        ``setup_budget``: seconds the setup lines may run (what is left of startup_timeout)."""
        began = time.monotonic()
        command = bootstrap.remote_command(entry, payload_size=len(bootstrap.agent_payload()), with_cwd=start,
                                           setup_budget=setup_budget, spare=spare)
        channel = connection.open_exec(command.exec)
        channel.sendall(command.script)
        log.debug("exec channel on %s: %.0f ms", entry.host.label, (time.monotonic() - began) * 1000)
        return channel


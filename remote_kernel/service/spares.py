"""Spare kernels: the per-user service keeps one kernel of an entry started ahead (issue 14).

Most of a kernel's start is its own imports (ipykernel, IPython, zmq, debugpy: ~0.3-0.5 s of a
~0.6 s start, on the remote host). Once a kernel of an entry has started through the service, the
service starts one more of that entry in the background on the same authenticated connection: an
agent in ``spare`` mode (remote/spawn.py) whose kernel has done its imports and waits, with no
connection file, no key and no code run. The next start of that entry (a second notebook, a
restart) takes it: the launcher sends the start's own request (key, token) as a second BOOT frame
and the kernel goes on from where it waited, so the start costs about one round trip and the
kernel's socket set-up. Then the service makes the next spare.

Bounds: one spare per entry (a changed entry's old spare ends when the new one is made); only
while the host's connection is held without asking anybody (a
spare never prompts); it ends after SPARE_LIFETIME unused (its agent ends by itself soon after,
also when the service is gone: ``spare_wait``), when the service stops, and when its session ends.
``spare_kernel = false`` in an entry turns it off. Only ipykernel's default command qualifies
(bootstrap.spare_eligible).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from remote_kernel import bootstrap
from remote_kernel.backends.direct import DirectBackend
from remote_kernel.entry import KernelEntry
from remote_kernel.errors import RemoteKernelError

log = logging.getLogger(__name__)

SPARE_LIFETIME = 600.0  # seconds a spare waits to be taken before the service ends it
SPARE_WAIT_MARGIN = 60.0  # ... and its agent ends by itself this much later (the service died)


def spare_key(entry: KernelEntry) -> str:
    """Spares are per entry: everything that shapes the remote process (python, setup, env, cwd,
    kernel_args, runtime_dir) is in the entry's fingerprint."""
    return entry.fingerprint()


@dataclass
class Spare:
    """A kernel started ahead: its agent waits on ``channel`` for a start's request."""

    key: str
    name: str
    host: str
    lease: Any  # service.pool.Lease: the host's shared connection, held for the spare
    channel: Any  # ssh.ExecChannel of the spare's agent
    made: float = field(default_factory=time.monotonic)
    since: float = field(default_factory=time.time)

    def usable(self) -> bool:
        """Its session still runs (a spare whose agent or connection ended cannot be taken)."""
        with contextlib.suppress(Exception):
            return not self.channel.closed and self.channel.exit_status() is None and self.lease.is_active()
        return False

    def go(self, request: dict[str, Any]) -> Any:
        """Hand the spare the real start's request; its channel, as Backend.start returns one.
        The connection it holds is the taking kernel's from now on."""
        self.channel.sendall(bootstrap.boot_frame(request))
        self.lease.mark_spare(False)
        return self.channel

    def discard(self) -> None:
        """End the spare: the agent reads EOF, stops its kernel and removes its directory."""
        with contextlib.suppress(Exception):
            self.channel.close()
        with contextlib.suppress(Exception):
            self.lease.close()

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "host": self.host, "since": self.since}


class Spares:
    """At most one spare per entry, made in the background after a start of that entry."""

    def __init__(self, pool: Any, *, lifetime: float = SPARE_LIFETIME) -> None:
        self.pool = pool
        self.lifetime = lifetime
        self._spares: dict[str, Spare] = {}
        self._making: set[str] = set()
        self._ended: dict[int, int] = {}  # id(pool slot) -> how many times its spares were ended (end_for)
        self._lock = threading.Lock()
        self.closed = False

    def take(self, entry: KernelEntry) -> Spare | None:
        """The entry's spare, if one is ready to be taken (it is then the caller's)."""
        if not bootstrap.spare_eligible(entry):
            return None
        with self._lock:
            spare = self._spares.pop(spare_key(entry), None)
        if spare is None:
            return None
        if not spare.usable():
            log.info("the spare kernel of %s on %s had ended; starting one afresh", entry.name, entry.host.label)
            spare.discard()
            return None
        return spare

    def replenish(self, entry: KernelEntry) -> None:
        """Make the entry's spare in the background, unless it has one (or one is being made)."""
        if not bootstrap.spare_eligible(entry):
            return
        key = spare_key(entry)
        with self._lock:
            if self.closed or key in self._spares or key in self._making:
                return
            self._making.add(key)
        threading.Thread(target=self._make, args=(entry, key), name="rk-service-spare", daemon=True).start()

    def _make(self, entry: KernelEntry, key: str) -> None:
        slot = id(self.pool.slot(entry.host))
        with self._lock:
            ended = self._ended.get(slot, 0)
        try:
            spare = self._start(entry, key)
        finally:
            with self._lock:
                self._making.discard(key)
        if spare is None:
            return
        with self._lock:
            if self.closed or key in self._spares or self._ended.get(slot, 0) != ended:
                replaced, keep = [], False
            else:  # an entry changed since its last spare (same name and host): that one is stale
                stale = [k for k, old in self._spares.items() if (old.name, old.host) == (spare.name, spare.host)]
                replaced = [self._spares.pop(k) for k in stale]
                self._spares[key] = spare
                keep = True
        for old in replaced:
            old.discard()
        if not keep:
            spare.discard()
        else:
            log.info("a spare kernel of %s waits on %s", entry.name, entry.host.label)

    def _start(self, entry: KernelEntry, key: str) -> Spare | None:
        lease = self.pool.held(entry.host)  # never a new connection, never a prompt
        if lease is None:
            return None
        if lease.link.full:  # MaxSessions reached: a spare must not make the pool open another connection
            lease.close()
            return None
        lease.mark_spare(True)
        request = bootstrap.spare_request(entry, self.lifetime + SPARE_WAIT_MARGIN)
        try:
            channel = DirectBackend().start(lease, entry, request, setup_budget=entry.startup_timeout)
        except RemoteKernelError as exc:
            log.info("no spare kernel of %s on %s: %s", entry.name, entry.host.label, exc.message)
            lease.close()
            return None
        return Spare(key=key, name=entry.name, host=entry.host.label, lease=lease, channel=channel)

    def upkeep(self) -> None:
        """End spares nobody took within their lifetime, and forget ended ones."""
        now = time.monotonic()
        with self._lock:
            ended = [key for key, spare in self._spares.items()
                     if now - spare.made > self.lifetime or not spare.usable()]
            spares = [self._spares.pop(key) for key in ended]
        for spare in spares:
            spare.discard()

    def end_for(self, host: Any) -> None:
        """End the spares on ``host`` (a HostEntry): `logout` closes its connection."""
        slot = self.pool.slot(host)
        with self._lock:
            self._ended[id(slot)] = self._ended.get(id(slot), 0) + 1  # and the one being made, if any
            ended = [key for key, spare in self._spares.items() if getattr(spare.lease, "slot", None) is slot]
            spares = [self._spares.pop(key) for key in ended]
        for spare in spares:
            spare.discard()

    def close_all(self) -> None:
        with self._lock:
            self.closed = True
            spares, self._spares = list(self._spares.values()), {}
        for spare in spares:
            spare.discard()

    def describe(self) -> list[dict[str, Any]]:
        with self._lock:
            return [spare.describe() for spare in self._spares.values()]

    def __len__(self) -> int:
        with self._lock:
            return len(self._spares)

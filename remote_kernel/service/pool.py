"""The service's SSH connections: one authenticated transport per host (and jump chain), shared.

Every kernel on a host opens its exec channel on the same connection: the second and later
kernels skip TCP, key exchange and authentication. At most one connection attempt per host runs
at a time (single flight): after a dropped network every kernel of the host asks again at once,
and all of them wait for the one re-authentication. An attempt that needs a person (a one-time
code, a passphrase) and has nobody to ask is not repeated: the host waits for `remote-kernel login`
(no retry loop that could lock the account). A host that refuses another session on a connection
(MaxSessions) gets a second connection, asking only if that one needs an answer too.

Lock order: a slot's ``cond`` is never held while connecting or while calling into paramiko.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from remote_kernel.entry import HostEntry
from remote_kernel.errors import LaunchError, SSHError

log = logging.getLogger(__name__)

PROBE_EVERY = 15.0  # keepalive: ask each connection for a reply this often (host.keepalive if set)
PROBE_LIMIT = 20.0  # ... and close it when a reply is this late (its kernels then reattach)
VERIFY_WAIT = 5.0  # a reacquire after a drop checks the connection answers, this long at most


class AnswerNeeded(SSHError):  # noqa: N818 - a state of the host, not a malfunction
    """Authentication needs a person (a code, a passphrase, a password) and nobody can answer."""

    def __init__(self, host: HostEntry, what: str) -> None:
        super().__init__(needs_login_message(host, what), host=host.label,
                         hint=f"run `remote-kernel login {host.name}` in a terminal, then start the kernel again")
        self.what = what


def needs_login_message(host: HostEntry, what: str) -> str:
    return f"host {host.name} needs {what}: run `remote-kernel login {host.name}` in a terminal"


def host_key(host: HostEntry) -> str:
    """Connections are shared between entries that reach a host the same way (jump chain included)."""
    return json.dumps(host.to_dict(), sort_keys=True, separators=(",", ":"))


class NobodyPrompter:
    """For a launch with no terminal: a keyboard-interactive or password question ends the attempt
    at once (AnswerNeeded, no guess sent); an encrypted key is skipped and remembered."""

    def __init__(self, host: HostEntry) -> None:
        self.host = host
        self.passphrase_for: str | None = None

    def ask(self, host: str, prompt: str, *, echo: bool, kind: str, instructions: str = "") -> str | None:
        if kind == "passphrase":
            self.passphrase_for = prompt.split("'")[1] if "'" in prompt else "a key"
            return None
        raise AnswerNeeded(self.host, "a one-time code" if kind == "keyboard-interactive" else "a password")


@dataclass(eq=False)
class Link:
    """One authenticated connection (ssh.SSHConnection) of a host."""

    conn: Any
    since: float  # wall-clock time it was authenticated
    methods: list[str]
    full: bool = False  # the host refused another session on it (MaxSessions)
    leases: int = 0  # kernels using it (spares included)
    spares: int = 0  # of those, spare kernels waiting to be taken (service/spares.py)
    probe: threading.Event | None = None
    probe_sent: float = 0.0
    last_ok: float = field(default_factory=time.monotonic)

    def alive(self) -> bool:
        try:
            return bool(self.conn.is_active())
        except Exception:  # noqa: BLE001 - a half-closed transport: as good as gone
            return False

    def auth(self) -> str:
        return "+".join(dict.fromkeys(self.methods)) or "none"


@dataclass(eq=False)
class Slot:
    """Everything about one host: its connections and who waits for them."""

    host: HostEntry
    cond: threading.Condition = field(default_factory=threading.Condition)
    links: list[Link] = field(default_factory=list)
    connecting: bool = False
    attempts: int = 0  # finished connection attempts (waiters tell theirs from a later one)
    last_error: SSHError | None = None
    needs: AnswerNeeded | None = None  # set until a login answers: no more unattended attempts
    leases: int = 0
    logged_in: bool = False  # made or claimed by `login`: kept with no kernels until logout
    idle_since: float = field(default_factory=time.monotonic)
    reuses: int = 0


class Lease:
    """What a Launcher holds (the Connection protocol): exec channels on the host's shared
    connection; ``close`` gives it back to the pool (the connection stays for the others)."""

    def __init__(self, pool: Pool, slot: Slot, link: Link, prompter: Any) -> None:
        self.pool, self.slot, self.link, self.prompter = pool, slot, link, prompter
        self.closed = False
        self.spare = False  # held by a spare kernel (counted apart in `service status`)

    def mark_spare(self, spare: bool) -> None:
        """A spare's lease, or (False) the lease of the kernel that took the spare."""
        with self.slot.cond:
            if spare != self.spare and not self.closed:
                self.link.spares += 1 if spare else -1
            self.spare = spare

    def open_exec(self, command: str) -> Any:
        try:
            return self.link.conn.open_exec(command)
        except SSHError as exc:
            if not _session_refused(exc) or not self.link.alive():
                raise
            self.link.full = True
            if self.spare:  # a spare kernel never makes the pool open (and log in on) another connection
                raise
            log.info("%s refused another session on its connection (MaxSessions): using another", self.slot.host.label)
        new = self.pool.roomier_link(self.slot, self.prompter)
        with self.slot.cond:
            self.link.leases -= 1
            new.leases += 1
            if self.spare:
                self.link.spares -= 1
                new.spares += 1
        self.link = new
        return self.link.conn.open_exec(command)

    def probe(self) -> threading.Event:
        event: threading.Event = self.link.conn.probe()
        return event

    def is_active(self) -> bool:
        return self.link.alive()

    def close(self) -> None:
        if not self.closed:
            self.mark_spare(False)
            self.closed = True
            self.pool.release(self.slot, self.link)


def _probe_while_alive(link: Link, limit: float) -> bool:
    """Whether ``link`` answers a probe within ``limit``; a transport seen closed meanwhile
    (another kernel's drop noticed it) ends the wait at once."""
    answered = link.conn.probe()
    deadline = time.monotonic() + limit
    while not answered.wait(min(0.1, max(0.0, deadline - time.monotonic()))):
        if time.monotonic() >= deadline or not link.alive():
            return False
    return True


def _session_refused(exc: SSHError) -> bool:
    """A session refused on a connection that is fine: OpenSSH over MaxSessions answers "Connect
    failed" (paramiko's ChannelException code 2), others "administratively prohibited" (code 1)."""
    cause = exc.__cause__
    return type(cause).__name__ == "ChannelException" and getattr(cause, "code", None) in (1, 2)


Connect = Callable[[HostEntry, Any, float], Link]


def _connect(host: HostEntry, prompter: Any, timeout: float) -> Link:
    from remote_kernel import ssh

    with ssh.prompts_through(prompter) as methods:
        conn = ssh.connect(host, timeout=timeout)
    return Link(conn=conn, since=time.time(), methods=methods)


class Pool:
    """The service's connections, by host."""

    def __init__(self, connect: Connect = _connect) -> None:
        self._connect = connect
        self._slots: dict[str, Slot] = {}
        self._lock = threading.Lock()

    def slot(self, host: HostEntry) -> Slot:
        with self._lock:
            return self._slots.setdefault(host_key(host), Slot(host))

    def slots(self) -> list[Slot]:
        with self._lock:
            return list(self._slots.values())

    # -------------------------------------------------------------------------- acquire

    def acquire(self, host: HostEntry, prompter: Any, *, deadline: float, verify: bool = False,
                on_wait: Callable[[AnswerNeeded], None] | None = None, timeout: float = 15.0) -> Lease:
        """A lease on a live connection to ``host``: an existing one (``verify``: after a drop,
        only if it still answers), the one being made by someone else, or a new one made with
        ``prompter``. When the host needs a person and ``prompter`` is a NobodyPrompter, wait for
        a login until ``deadline`` (``on_wait`` is told once), then raise AnswerNeeded."""
        slot = self.slot(host)
        told = False
        while True:
            link, seen = self._live_or_wait(slot, prompter, deadline, verify)
            if link is not None:
                return self._lease(slot, link, prompter)
            if seen is None:  # our turn to connect
                link = self._attempt(slot, prompter, timeout)
                if link is not None:
                    return self._lease(slot, link, prompter)
            if slot.needs is not None and not told and on_wait is not None:
                told = True
                on_wait(slot.needs)
            if time.monotonic() >= deadline:
                raise slot.needs or slot.last_error or LaunchError(f"no connection to {host.label} in time")
            if seen is not None and slot.attempts != seen and slot.needs is None and slot.last_error is not None:
                raise slot.last_error  # the attempt we waited for failed: its error is ours too

    def held(self, host: HostEntry) -> Lease | None:
        """A lease on a live connection already held to ``host``, or None: never a new one (a
        one-shot query must not prompt, nor leave a connection behind)."""
        with self._lock:
            slot = self._slots.get(host_key(host))
        if slot is None:
            return None
        with slot.cond:
            self._forget_dead(slot)
            live = [link for link in slot.links if not link.full] or slot.links
        return self._lease(slot, live[0], NobodyPrompter(host)) if live else None

    def _live_or_wait(self, slot: Slot, prompter: Any, deadline: float, verify: bool) -> tuple[Link | None, int | None]:
        """(a live link, None) | (None, None): connect now | (None, attempts seen): waited, look again."""
        with slot.cond:
            self._forget_dead(slot)
            live = [link for link in slot.links if not link.full] or slot.links
            if live:
                if not verify or self._answers(slot, live[0]):
                    slot.reuses += 1
                    return live[0], None
                # The silent one is closed; while we asked it, another kernel of the host may
                # have made the new connection: look again before making one more.
                return None, slot.attempts
            unattended = isinstance(prompter, NobodyPrompter)
            if slot.connecting or (slot.needs is not None and unattended):
                seen = slot.attempts
                slot.cond.wait(max(0.0, min(1.0, deadline - time.monotonic())))
                return None, seen
            slot.connecting = True
            return None, None

    def _answers(self, slot: Slot, link: Link) -> bool:
        """After a drop the connection may look alive and be silent (a blackhole): ask it."""
        if time.monotonic() - link.last_ok < 1.0:
            return True
        slot.cond.release()
        try:
            answered = _probe_while_alive(link, VERIFY_WAIT)
        finally:
            slot.cond.acquire()
        if answered:
            link.last_ok = time.monotonic()
            return True
        log.warning("the connection to %s did not answer in %g s: closing it", slot.host.label, VERIFY_WAIT)
        self._close_link(slot, link)
        return False

    def _attempt(self, slot: Slot, prompter: Any, timeout: float) -> Link | None:
        """One connection attempt (we hold slot.connecting). None when it failed (the error is
        in the slot for everyone who waited)."""
        link: Link | None = None
        error: SSHError | None = None
        try:
            link = self._connect_once(slot.host, prompter, timeout)
        except SSHError as exc:
            error = exc
        with slot.cond:
            slot.connecting = False
            slot.attempts += 1
            slot.last_error = error
            if isinstance(error, AnswerNeeded):
                slot.needs = error
            if link is not None:
                slot.links.append(link)
                if not isinstance(prompter, NobodyPrompter):
                    slot.needs = None
            slot.cond.notify_all()
        if error is not None and not isinstance(error, AnswerNeeded):
            raise error
        return link

    def _connect_once(self, host: HostEntry, prompter: Any, timeout: float) -> Link:
        began = time.monotonic()
        try:
            link = self._connect(host, prompter, timeout)
        except AnswerNeeded:
            raise  # said once, by whoever waits for the login (ServiceConnector.on_wait)
        except SSHError as exc:
            passphrase = getattr(prompter, "passphrase_for", None)
            if passphrase:
                raise AnswerNeeded(host, f"the passphrase of key {passphrase}") from exc
            raise
        log.debug("connected to %s in %.2f s (auth: %s)", host.label, time.monotonic() - began, link.auth())
        return link

    def _lease(self, slot: Slot, link: Link, prompter: Any) -> Lease:
        with slot.cond:
            slot.leases += 1
            link.leases += 1
        return Lease(self, slot, link, prompter)

    def roomier_link(self, slot: Slot, prompter: Any) -> Link:
        """A connection of ``slot`` that has not refused a session, made if there is none."""
        with slot.cond:
            self._forget_dead(slot)
            room = [link for link in slot.links if not link.full]
            if room:
                return room[0]
        link = self._connect_once(slot.host, prompter, 15.0)
        with slot.cond:
            slot.links.append(link)
        return link

    def release(self, slot: Slot, link: Link) -> None:
        with slot.cond:
            slot.leases -= 1
            link.leases -= 1
            if slot.leases <= 0:
                slot.idle_since = time.monotonic()

    # -------------------------------------------------------------------------- login / logout

    def login(self, host: HostEntry, prompter: Any, *, timeout: float) -> tuple[Link, bool]:
        """A live connection to ``host`` made with ``prompter`` (a person); (link, reused)."""
        before = set(map(id, self.slot(host).links))
        lease = self.acquire(host, prompter, deadline=time.monotonic() + timeout, verify=True, timeout=timeout)
        reused = id(lease.link) in before
        with lease.slot.cond:
            lease.slot.logged_in = True
        lease.close()
        return lease.link, reused

    def logout(self, host: HostEntry) -> int:
        """Forget the login; close the connections now unless kernels use them (they keep them
        until they end). Returns the number of kernels still using them."""
        slot = self.slot(host)
        with slot.cond:
            slot.logged_in = False
            slot.needs = None
            leases = slot.leases
            if leases <= 0:
                for link in list(slot.links):
                    self._close_link(slot, link)
        return leases

    # -------------------------------------------------------------------------- upkeep

    def keepalive(self, idle_limit: float) -> None:
        """Ask every connection for a reply; close the silent ones, and the unused ones after
        ``idle_limit`` (unless logged in)."""
        now = time.monotonic()
        for slot in self.slots():
            with slot.cond:
                self._forget_dead(slot)
                for link in list(slot.links):
                    self._keep(slot, link, now)
                if slot.leases <= 0 and not slot.logged_in and now - slot.idle_since > idle_limit:
                    for link in list(slot.links):
                        log.info("closing the unused connection to %s", slot.host.label)
                        self._close_link(slot, link)

    def _keep(self, slot: Slot, link: Link, now: float) -> None:
        every = slot.host.keepalive or PROBE_EVERY
        if link.probe is not None and link.probe.is_set():
            link.probe, link.last_ok = None, now
        if link.probe is not None and now - link.probe_sent > max(PROBE_LIMIT, 2 * every):
            log.warning("the connection to %s is silent (no keepalive reply in %.0f s): closing it",
                        slot.host.label, now - link.probe_sent)
            self._close_link(slot, link)
        elif link.probe is None and now - link.last_ok >= every:
            link.probe, link.probe_sent = link.conn.probe(), now

    def _forget_dead(self, slot: Slot) -> None:
        for link in [link for link in slot.links if not link.alive()]:
            log.info("the connection to %s is gone", slot.host.label)
            self._close_link(slot, link)

    def _close_link(self, slot: Slot, link: Link) -> None:
        if link in slot.links:
            slot.links.remove(link)
        with contextlib.suppress(Exception):
            link.conn.close()

    def busy(self) -> bool:
        """Anything worth staying up for: a connection or a lease."""
        return any(slot.links or slot.leases > 0 or slot.connecting for slot in self.slots())

    def close_all(self) -> None:
        for slot in self.slots():
            with slot.cond:
                for link in list(slot.links):
                    self._close_link(slot, link)

    def describe(self) -> list[dict[str, Any]]:
        rows = []
        for slot in self.slots():
            with slot.cond:
                for link in slot.links:
                    rows.append({"host": slot.host.name, "label": slot.host.label, "since": link.since,
                                 "kernels": max(0, link.leases - link.spares), "spares": link.spares,
                                 "auth": link.auth(),
                                 "login": slot.logged_in, "full": link.full})
                if not slot.links and slot.needs is not None:
                    rows.append({"host": slot.host.name, "label": slot.host.label, "since": None,
                                 "kernels": max(0, slot.leases), "auth": "needs login",
                                 "login": False, "full": False})
        return rows


class ServiceConnector:
    """The Connector protocol over the pool for one hosted kernel: its acquires share the host's
    connection; a reacquire (after a drop) checks the connection still answers, and waits for
    the one re-authentication of the host instead of connecting on its own."""

    def __init__(self, pool: Pool, prompter: Any, *, startup_timeout: float,
                 on_wait: Callable[[AnswerNeeded], None] | None = None) -> None:
        self.pool = pool
        self.prompter = prompter
        self.startup_timeout = startup_timeout
        self.on_wait = on_wait
        self.acquired = 0
        self.reused: bool | None = None

    def acquire(self, host: HostEntry, *, timeout: float = 15.0) -> Lease:
        first = self.acquired == 0
        # A start may wait for a login for its whole startup_timeout; a reattach for one attempt.
        wait = self.startup_timeout if first else timeout
        before = set(map(id, self.pool.slot(host).links))
        lease = self.pool.acquire(host, self.prompter, deadline=time.monotonic() + wait, verify=not first,
                                  on_wait=self.on_wait, timeout=timeout)
        self.acquired += 1
        if first:
            self.reused = id(lease.link) in before
        return lease

    def release(self, connection: Any) -> None:
        connection.close()

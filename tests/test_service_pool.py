"""The service's connection pool at its own seam (the connect function): single flight after a
drop. The real-sshd tests (test_service.py) prove the same end to end; these pin down the races."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from remote_kernel.entry import HostEntry
from remote_kernel.service import pool as pool_module
from remote_kernel.service.pool import Link, NobodyPrompter, Pool


class FakeConnection:
    """An SSH connection as the pool sees it: alive or not, answering probes or silent."""

    def __init__(self, *, answers: bool) -> None:
        self.answers = answers
        self.active = True
        self.closed = False

    def is_active(self) -> bool:
        return self.active and not self.closed

    def probe(self) -> threading.Event:
        event = threading.Event()
        if self.answers:
            event.set()
        return event

    def close(self) -> None:
        self.closed = True


class CountingConnect:
    def __init__(self) -> None:
        self.made: list[FakeConnection] = []
        self.lock = threading.Lock()

    def __call__(self, host: HostEntry, prompter: Any, timeout: float) -> Link:
        with self.lock:
            conn = FakeConnection(answers=True)
            self.made.append(conn)
        return Link(conn=conn, since=time.time(), methods=["publickey"])


def host() -> HostEntry:
    return HostEntry(name="lab", hostname="127.0.0.1", port=22, user="me")


def stale_link(pool: Pool, entry: HostEntry) -> FakeConnection:
    """A connection that still looks alive after the network dropped: it answers nothing."""
    silent = FakeConnection(answers=False)
    slot = pool.slot(entry)
    slot.links.append(Link(conn=silent, since=time.time(), methods=["publickey"], last_ok=time.monotonic() - 60))
    return silent


def test_a_reacquire_that_finds_the_connection_silent_takes_the_one_another_kernel_made_meanwhile(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pool_module, "VERIFY_WAIT", 2.0)
    connect = CountingConnect()
    pool, entry = Pool(connect), host()
    silent = stale_link(pool, entry)
    leases: list[Any] = []
    first = threading.Thread(target=lambda: leases.append(
        pool.acquire(entry, NobodyPrompter(entry), deadline=time.monotonic() + 10, verify=True)))
    first.start()
    time.sleep(0.3)  # the first kernel is asking the silent connection
    silent.active = False  # ... when the transport notices the drop
    leases.append(pool.acquire(entry, NobodyPrompter(entry), deadline=time.monotonic() + 10, verify=True))
    first.join(timeout=10)
    assert not first.is_alive()
    assert len(connect.made) == 1  # one re-authentication for both kernels
    assert {lease.link.conn for lease in leases} == {connect.made[0]}


def test_two_kernels_finding_the_connection_silent_make_one_new_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pool_module, "VERIFY_WAIT", 0.5)
    connect = CountingConnect()
    pool, entry = Pool(connect), host()
    stale_link(pool, entry)
    leases: list[Any] = []
    threads = [threading.Thread(target=lambda: leases.append(
        pool.acquire(entry, NobodyPrompter(entry), deadline=time.monotonic() + 10, verify=True)))
        for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert len(leases) == 3
    assert len(connect.made) == 1
    assert pool.slot(entry).leases == 3

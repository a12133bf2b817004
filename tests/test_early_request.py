"""The argv launcher's head start (service/early.py): ``python -m remote_kernel from-spec DIR -f
FILE`` sends its serve request to a running service before importing the rest of the launcher.

A stand-in service (a Unix socket at the service's path, in the isolated XDG_RUNTIME_DIR) records
what arrives: our own seam, in addition to the real launches through the service in
test_service.py and test_spare.py (KernelManager runs exactly that argv, so they go this way).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from remote_kernel.entry import HostEntry, KernelEntry
from remote_kernel.service import early, paths
from remote_kernel.service.wire import Channel


class StandIn:
    """Listens where the service would; keeps the first message of each conversation."""

    def __init__(self) -> None:
        directory = paths.private_dir(paths.runtime_dir())
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(paths.socket_path(directory)))
        self.listener.listen(8)
        self.listener.settimeout(10)
        self.requests: list[dict[str, Any]] = []
        self.ended = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except OSError:
            return
        channel = Channel(sock)
        message = channel.receive()
        if message is not None:
            self.requests.append(message)
        if channel.receive() is None:  # the launcher closed the conversation
            self.ended.set()
        channel.close()

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def stand_in(isolated_env: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[StandIn]:
    monkeypatch.setenv("REMOTE_KERNEL_SERVICE", "on")  # the suite's default is off
    server = StandIn()
    yield server
    early.drop()
    server.close()


def entry() -> KernelEntry:
    return KernelEntry(name="early", host=HostEntry(name="lab", hostname="lab.example.org"), display_name="Early")


def spec_dir(tmp_path: Path, kernel: KernelEntry) -> Path:
    directory = tmp_path / "spec"
    directory.mkdir()
    (directory / "kernel.json").write_text(json.dumps({"metadata": {"remote_kernel": {"entry": kernel.to_dict()}}}))
    return directory


def test_the_request_goes_out_before_the_launcher_is_imported_and_is_taken_once(
        stand_in: StandIn, tmp_path: Path) -> None:
    directory = spec_dir(tmp_path, entry())
    early.begin([str(directory), "-f", "kernel-1.json"])
    stand_in.thread.join(0.5)
    assert early.state.sent is not None
    channel = early.take(entry().to_dict(), Path("kernel-1.json").absolute())
    assert channel is not None
    assert early.take(entry().to_dict(), Path("kernel-1.json").absolute()) is None  # once
    channel.close()
    assert stand_in.ended.wait(10)
    [request] = stand_in.requests
    assert request["op"] == "serve"
    assert KernelEntry.from_dict(request["entry"]) == entry()
    assert request["connection_file"] == str(Path("kernel-1.json").absolute())
    assert request["pid"] == os.getpid()
    assert request["level"] == 20
    assert request["runtime_dir"] == os.environ["JUPYTER_RUNTIME_DIR"]


def test_a_request_for_another_entry_or_file_is_dropped_and_its_conversation_ended(
        stand_in: StandIn, tmp_path: Path) -> None:
    directory = spec_dir(tmp_path, entry())
    early.begin([str(directory), "-f", "kernel-1.json"])
    other = KernelEntry(name="early", host=HostEntry(name="lab", hostname="other.example.org"), display_name="Early")
    assert early.take(other.to_dict(), Path("kernel-1.json").absolute()) is None
    assert stand_in.ended.wait(10)  # the service stops the start it began for it


@pytest.mark.parametrize("args", [["spec", "-f"], ["spec", "--json", "-f", "x"], ["name-not-dir", "-f", "x"]])
def test_other_forms_are_left_to_the_ordinary_path(stand_in: StandIn, args: list[str]) -> None:
    early.begin(args)
    assert early.state.sent is None
    assert not stand_in.requests


def test_an_unknown_log_level_or_the_service_switched_off_sends_nothing(
        stand_in: StandIn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = spec_dir(tmp_path, entry())
    monkeypatch.setenv("REMOTE_KERNEL_LOG", "loud")
    early.begin([str(directory), "-f", "k.json"])
    assert early.state.sent is None
    monkeypatch.setenv("REMOTE_KERNEL_LOG", "debug")
    monkeypatch.setenv("REMOTE_KERNEL_SERVICE", "off")
    early.begin([str(directory), "-f", "k.json"])
    assert early.state.sent is None


def test_python_m_remote_kernel_from_spec_imports_no_launcher_module_before_sending(tmp_path: Path) -> None:
    """What the head start imports, in a fresh interpreter: the request's modules, not the launcher's."""
    code = ("import sys; from remote_kernel.service import early; "
            "print(sorted(m for m in sys.modules if m.startswith('remote_kernel')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    loaded = set(eval(result.stdout))  # noqa: S307 - our own subprocess's printed list
    assert not loaded & {"remote_kernel.cli", "remote_kernel.entry", "remote_kernel.launcher",
                         "remote_kernel.service.client", "remote_kernel.console"}, loaded

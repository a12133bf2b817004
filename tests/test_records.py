"""One schema for entries and records: the stored JSON forms, derived from the dataclass fields, and
the one private-file writer (fast, no sshd)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import stat
import threading
from pathlib import Path
from typing import Any

import pytest

from remote_kernel import records
from remote_kernel.connection import ConnectionInfo, write_connection_file
from remote_kernel.entry import (
    DEFAULT_OUTPUT_BACKLOG,
    DEFAULT_RECONNECT_GRACE,
    HostEntry,
    KernelEntry,
    SlurmSettings,
)
from remote_kernel.records import RestartRecord


def full_entry() -> KernelEntry:
    """Every field set to something other than its default."""
    jump = HostEntry(name="bastion", hostname="bastion.example.org", user="alice", port=2222, keepalive=0.0)
    host = HostEntry(name="lab", hostname="10.0.0.5", port=22, user="bob", identity_file="~/.ssh/id_lab",
                     proxy_jump=(jump,), known_hosts="~/.ssh/kh", host_key_policy="accept-new", keepalive=30.0)
    return KernelEntry(
        name="gpu", host=host, display_name="GPU (lab)", python="/opt/conda/bin/python",
        setup=("module load cuda", "source ~/.venv/bin/activate"), env={"B": "2", "A": "1"}, cwd="~/project",
        command=("{python}", "-m", "spyder_kernels.console"), kernel_args=("--matplotlib=inline",),
        language="python3", interrupt_mode="message", startup_timeout=120.0, reconnect_grace=0.0,
        runtime_dir="/scratch/$USER", output_backlog=1024, launcher="provisioner")


def minimal_entry() -> KernelEntry:
    return KernelEntry(name="lab", host=HostEntry.from_target("alice@lab.example.org"), display_name="lab")


# The `entry` of metadata.remote_kernel in a kernel.json written by `sync` at commit 684c9ae (before
# runtime_dir, output_backlog and launcher existed), produced by that commit's KernelEntry.to_dict().
ENTRY_AT_684C9AE: dict[str, Any] = json.loads("""
{"schema": 1, "name": "old", "host": {"name": "lab", "hostname": "10.0.0.5", "port": 2222, "user": "bob",
 "identity_file": null, "proxy_jump": [{"name": "bastion", "hostname": null, "port": null, "user": null,
 "identity_file": null, "proxy_jump": [], "known_hosts": null, "host_key_policy": "strict", "keepalive": 15.0}],
 "known_hosts": null, "host_key_policy": "strict", "keepalive": 15.0}, "display_name": "Old",
 "python": "python3", "setup": ["module load x"], "env": {"A": "1"}, "cwd": null,
 "command": ["{python}", "-m", "ipykernel_launcher"], "kernel_args": [], "language": "python",
 "interrupt_mode": "message", "startup_timeout": 90.0, "reconnect_grace": 300.0}
""")


# --- entries: round trips and compatibility --------------------------------------------------------


@pytest.mark.parametrize("entry", [minimal_entry(), full_entry()], ids=["minimal", "full"])
def test_an_entry_survives_the_trip_through_kernel_json(entry: KernelEntry) -> None:
    stored = json.loads(json.dumps(entry.to_dict()))
    assert KernelEntry.from_dict(stored) == entry
    assert KernelEntry.from_dict(stored).fingerprint() == entry.fingerprint()


def test_every_field_of_kernel_entry_and_host_entry_is_in_to_dict() -> None:
    # slurm, forward, detached_lease and spare_kernel: left out when unset (default)
    entry = dataclasses.replace(full_entry(), slurm=SlurmSettings(time="1:00:00"), forward=("8787",),
                                detached_lease=3600.0, spare_kernel=False)
    assert set(entry.to_dict()) == {"schema"} | {field.name for field in dataclasses.fields(KernelEntry)}
    assert KernelEntry.from_dict(entry.to_dict()) == entry
    assert set(entry.host.to_dict()) == {field.name for field in dataclasses.fields(HostEntry)}
    assert set(entry.to_dict()["host"]["proxy_jump"][0]) == {field.name for field in dataclasses.fields(HostEntry)}


def test_the_stored_form_is_plain_json_with_lists_and_sorted_env() -> None:
    stored = full_entry().to_dict()
    assert stored["schema"] == 1
    assert stored["setup"] == ["module load cuda", "source ~/.venv/bin/activate"]
    assert list(stored["env"]) == ["A", "B"]
    assert stored["host"]["proxy_jump"][0]["name"] == "bastion"
    assert json.loads(json.dumps(stored)) == stored


def test_fingerprints_of_unchanged_entries_stay_what_they_were_before_the_schema_was_derived() -> None:
    # Computed by the hand-written to_dict of commit b3ddf3a: `sync` reports these specs unchanged.
    assert minimal_entry().fingerprint() == "110a8bd15b8bacc6"
    assert full_entry().fingerprint() == "7d1627b11f5f7809"


def test_an_entry_stored_by_an_old_sync_loads_with_the_declared_defaults_for_newer_fields() -> None:
    entry = KernelEntry.from_dict(ENTRY_AT_684C9AE)
    assert (entry.name, entry.display_name, entry.interrupt_mode, entry.startup_timeout) == (
        "old", "Old", "message", 90.0)
    assert entry.host.proxy_jump[0] == HostEntry(name="bastion")
    assert entry.command == ("{python}", "-m", "ipykernel_launcher")
    assert (entry.runtime_dir, entry.output_backlog, entry.launcher) == (None, DEFAULT_OUTPUT_BACKLOG, "argv")


def test_a_minimal_hand_written_entry_takes_every_default() -> None:
    entry = KernelEntry.from_dict({"name": "k", "host": {"name": "lab"}})
    assert entry == KernelEntry(name="k", host=HostEntry(name="lab"), display_name="k")
    assert entry.reconnect_grace == DEFAULT_RECONNECT_GRACE


def test_keys_from_a_newer_version_are_ignored() -> None:
    stored = full_entry().to_dict()
    stored["schema"] = 2
    stored["gpus"] = 4
    stored["host"]["jump_policy"] = "auto"
    stored["host"]["proxy_jump"][0]["transport"] = "quic"
    assert KernelEntry.from_dict(stored) == full_entry()


def test_a_missing_required_key_is_a_key_error_naming_it() -> None:
    with pytest.raises(KeyError, match="host"):
        KernelEntry.from_dict({"name": "k"})
    with pytest.raises(KeyError, match="name"):
        KernelEntry.from_dict({"name": "k", "host": {"hostname": "lab"}})


@pytest.mark.parametrize(("key", "value", "where"), [
    ("setup", "module load x", "KernelEntry.setup"),  # a string would otherwise become its characters
    ("startup_timeout", "60", "KernelEntry.startup_timeout"),
    ("output_backlog", True, "KernelEntry.output_backlog"),
    ("env", {"A": 1}, "KernelEntry.env.A"),
    ("python", None, "KernelEntry.python"),
    ("host", "lab", "KernelEntry.host: expected HostEntry"),
])
def test_a_value_of_the_wrong_type_is_a_type_error_naming_the_field(key: str, value: Any, where: str) -> None:
    stored = minimal_entry().to_dict()
    stored[key] = value
    with pytest.raises(TypeError, match=where.replace(".", r"\.")):
        KernelEntry.from_dict(stored)


def test_a_wrong_type_in_a_jump_host_names_the_nested_field() -> None:
    stored = full_entry().to_dict()
    stored["host"]["proxy_jump"][0]["port"] = "2222"
    with pytest.raises(TypeError, match=r"HostEntry\.port: expected int, found str"):
        KernelEntry.from_dict(stored)


# --- fingerprint sensitivity ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class WiderEntry(KernelEntry):
    """KernelEntry with a field added the way a new one would be: declared once, with its default."""

    gpus: int = 0


@dataclasses.dataclass(frozen=True)
class WiderHost(HostEntry):
    jump_policy: str = "auto"


def test_a_field_added_to_the_entry_is_stored_and_changes_the_fingerprint() -> None:
    base = {field.name: getattr(full_entry(), field.name) for field in dataclasses.fields(KernelEntry)}
    one, two = WiderEntry(**base, gpus=1), WiderEntry(**base, gpus=2)
    assert one.to_dict()["gpus"] == 1
    assert one.fingerprint() != two.fingerprint()
    assert WiderEntry.from_dict(one.to_dict()) == one


def test_a_field_added_to_the_host_changes_the_entry_fingerprint() -> None:
    entry = full_entry()
    host = {field.name: getattr(entry.host, field.name) for field in dataclasses.fields(HostEntry)}
    auto = dataclasses.replace(entry, host=WiderHost(**host, jump_policy="auto"))
    never = dataclasses.replace(entry, host=WiderHost(**host, jump_policy="never"))
    assert auto.fingerprint() != never.fingerprint()


@pytest.mark.parametrize("name", [field.name for field in dataclasses.fields(KernelEntry)])
def test_changing_any_one_field_changes_the_fingerprint(name: str) -> None:
    entry = dataclasses.replace(full_entry(), slurm=SlurmSettings(time="1:00:00"), forward=("8787",),
                                detached_lease=3600.0, spare_kernel=False)
    other = minimal_entry()
    changed = dataclasses.replace(entry, **{name: getattr(other, name)})
    assert changed.fingerprint() != entry.fingerprint()


# --- the private-file writer ----------------------------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_private_file_is_0600_in_a_new_0700_directory_even_under_umask_0(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        path = tmp_path / "runtime" / "remote-kernel" / "secret.json"
        records.write_private_json(path, {"key": "k"})
    finally:
        os.umask(old)
    assert json.loads(path.read_text()) == {"key": "k"}
    assert (mode(path), mode(path.parent)) == (0o600, 0o700)


def test_an_existing_file_is_replaced_by_a_new_private_one(tmp_path: Path) -> None:
    path = tmp_path / "dir" / "kernel.json"
    path.parent.mkdir()
    path.write_text("old and long content\n")
    path.chmod(0o644)
    records.write_private(path, "new")
    assert (path.read_text(), mode(path)) == ("new", 0o600)
    assert os.listdir(path.parent) == ["kernel.json"]  # no temp file left behind


def test_a_failed_write_leaves_the_old_file_whole_and_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "dir" / "record.json"
    path.parent.mkdir()
    path.write_text("old")
    with pytest.raises(UnicodeEncodeError):
        records.write_private(path, "half written \udc80 then an unencodable character")
    assert path.read_text() == "old"
    assert os.listdir(path.parent) == ["record.json"]


def test_a_reader_never_sees_a_partial_file(tmp_path: Path) -> None:
    path = tmp_path / "record.json"
    versions = ["a" * 300_000, "b" * 500_000]
    records.write_private(path, versions[0])
    seen: set[int] = set()
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            seen.add(len(path.read_text()))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for index in range(200):
            records.write_private(path, versions[index % 2])
    finally:
        done.set()
        reader.join(timeout=10)
    assert seen <= {len(text) for text in versions}


def test_the_connection_file_goes_through_the_private_writer(tmp_path: Path) -> None:
    path = tmp_path / "new-dir" / "kernel-1.json"
    ports = {"shell": 1, "iopub": 2, "stdin": 3, "control": 4, "hb": 5}
    write_connection_file(path, ConnectionInfo(ports=ports, key="secret"), "lab")
    data = json.loads(path.read_text())
    assert (data["key"], data["shell_port"], data["kernel_name"]) == ("secret", 1, "lab")
    assert (mode(path), mode(path.parent)) == (0o600, 0o700)


def test_saved_stderr_is_private_and_a_failure_to_save_is_not_an_error(tmp_path: Path) -> None:
    saved = records.save_stderr_log(tmp_path, "lab", ["line 1", "line 2"])
    assert saved == tmp_path / "remote-kernel" / "lab.stderr.log"
    assert (saved.read_text(), mode(saved)) == ("line 1\nline 2\n", 0o600)
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    assert records.save_stderr_log(blocked, "lab", ["x"]) is None


# --- the restart record ---------------------------------------------------------------------------


def test_a_restart_record_round_trips_privately_in_its_stable_form(tmp_path: Path) -> None:
    path = records.restart_record_path(tmp_path, tmp_path / "kernel-1.json")
    record = RestartRecord(pid=4242, host="alice@lab", dir="/tmp/remote-kernel-1000/k-ab12",
                           token="t0k")  # noqa: S106 - a test value, not a secret
    records.save_restart_record(path, record)
    assert json.loads(path.read_text()) == {"pid": 4242, "host": "alice@lab",
                                            "dir": "/tmp/remote-kernel-1000/k-ab12", "token": "t0k"}
    assert mode(path) == 0o600
    assert records.load_restart_record(path) == record
    records.forget_restart_record(path)
    assert not path.exists()
    records.forget_restart_record(path)  # twice is fine


def test_the_record_path_is_keyed_by_the_resolved_connection_file_as_before(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    connection_file = tmp_path / "kernel-1.json"
    digest = hashlib.sha256(str(connection_file.resolve()).encode()).hexdigest()[:24]
    # The same formula as the launchers before records.py: a record they left is found after an upgrade.
    assert records.restart_record_path(tmp_path, Path("kernel-1.json")) == tmp_path / "remote-kernel" / f"{digest}.json"
    assert records.restart_record_path(tmp_path, Path("kernel-2.json")) != records.restart_record_path(
        tmp_path, connection_file)


@pytest.mark.parametrize("content", [
    "", "not json", "[]", '{"pid": 1}', '{"pid": "1", "host": "h", "dir": "d", "token": "t"}'])
def test_an_unreadable_restart_record_is_no_record(tmp_path: Path, content: str) -> None:
    path = tmp_path / "record.json"
    path.write_text(content)
    assert records.load_restart_record(path) is None
    assert records.load_restart_record(tmp_path / "absent.json") is None


def test_a_connection_file_in_external_kernels_is_staged_outside_that_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # jupyter_server adopts every file in external_kernels that parses as a connection file: a
    # temp file there, listed between its write and the rename, would be a ghost kernel.
    from remote_kernel.connection import ConnectionInfo, write_connection_file

    moves: list[tuple[Path, Path]] = []
    real_replace = os.replace
    monkeypatch.setattr(records.os, "replace", lambda src, dst: (moves.append((Path(src), Path(dst))),
                                                                 real_replace(src, dst)))
    path = tmp_path / "runtime" / "external_kernels" / "kernel-rk-lab-1.json"
    ports = {"shell": 1, "iopub": 2, "stdin": 3, "control": 4, "hb": 5}
    write_connection_file(path, ConnectionInfo(ports=ports, key="k"), "lab")
    [(source, target)] = moves
    assert target == path and source.parent == tmp_path / "runtime"
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    assert json.loads(path.read_text())["kernel_name"] == "lab"

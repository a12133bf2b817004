"""remote-kernel sync: kernelspecs follow the TOML; only our own specs are ever changed.

Every test runs in the isolated HOME/JUPYTER_DATA_DIR of conftest.py; `jupyter kernelspec list`
runs as a real subprocess to see what Jupyter itself sees.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from remote_kernel import cli
from remote_kernel import sync as sync_module
from remote_kernel.entry import HostEntry, KernelEntry
from remote_kernel.errors import KernelspecError
from remote_kernel.kernelspec import (
    CONFLICT,
    CREATE,
    PRUNE,
    UNCHANGED,
    UPDATE,
    InstalledSpec,
    check_spec_name,
    desired_specs,
    plan_sync,
    render_kernel_json,
)
from remote_kernel.sync import LOCK_NAME, scan_installed, sync_kernelspecs, sync_lock

JUPYTER = Path(sys.executable).parent / "jupyter"

TWO_KERNELS = """
    # our lab machines
    [hosts.lab]
    hostname = "lab.example.org"
    user = "alice"

    [kernels.lab-py]            # the main one
    host = "lab"
    display_name = "Lab Python"

    [kernels.gpu]
    host = "bob@gpu.example.org:2222"
    display_name = "GPU box"
"""


# --- helpers ---------------------------------------------------------------------------------------


def write_config(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


@pytest.fixture
def kernels_dir() -> Path:
    return Path(os.environ["JUPYTER_DATA_DIR"]) / "kernels"


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    return write_config(tmp_path / "remote-kernels.toml", TWO_KERNELS)


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def jupyter_kernelspecs() -> dict[str, Any]:
    """What `jupyter kernelspec list --json` reports, run as its own process."""
    completed = subprocess.run(
        [str(JUPYTER), "kernelspec", "list", "--json"],
        capture_output=True, text=True, timeout=60, check=True, env=dict(os.environ),
    )
    specs: dict[str, Any] = json.loads(completed.stdout)["kernelspecs"]
    return specs


def tree_digest(root: Path) -> str:
    """A hash of every name, type, mode and byte under root (symlinks not followed)."""
    digest = hashlib.sha256()
    if not root.exists():
        return "absent"
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            info = path.lstat()
            digest.update(f"{path.relative_to(root)}|{info.st_mode}|{info.st_mtime_ns}".encode())
            if path.is_file() and not path.is_symlink():
                digest.update(path.read_bytes())
    return digest.hexdigest()


def mtimes(root: Path) -> dict[str, int]:
    return {str(path): path.lstat().st_mtime_ns for path in [root, *root.rglob("*")]}


def entry(name: str, display: str | None = None, host: str = "alice@lab") -> KernelEntry:
    return KernelEntry(name=name, host=HostEntry.from_target(host), display_name=display or name)


def make_foreign_spec(kernels_dir: Path, name: str, display: str = "Hand made") -> Path:
    spec_dir = kernels_dir / name
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps(
        {"argv": ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
         "display_name": display, "language": "python"}))
    (spec_dir / "notes.txt").write_text("mine, do not touch\n")
    return spec_dir


# --- the plan is pure ------------------------------------------------------------------------------


def installed_from(kernels_dir: Path, specs: dict[str, Any], config: Path) -> dict[str, InstalledSpec]:
    return {
        name: InstalledSpec(name=name, path=kernels_dir / name, kernel_json=spec.kernel_json,
                            owner_config=str(config))
        for name, spec in specs.items()
    }


def test_plan_creates_updates_keeps_and_prunes_by_comparing_kernel_json(tmp_path: Path) -> None:
    kdir, config = tmp_path / "k", tmp_path / "c.toml"
    old = desired_specs([entry("a"), entry("b"), entry("gone")], kernels_dir=kdir,
                        config_path=config, python="/py")
    new = desired_specs([entry("a"), entry("b", "B changed"), entry("fresh")], kernels_dir=kdir,
                        config_path=config, python="/py")
    plan = plan_sync(new, installed_from(kdir, old, config), config, True, kernels_dir=kdir)
    assert {item.name: item.action for item in plan.actions} == {
        "a": UNCHANGED, "b": UPDATE, "fresh": CREATE, "gone": PRUNE,
    }
    assert plan.has_changes
    assert plan_sync(new, installed_from(kdir, old, config), config, False,
                     kernels_dir=kdir).of(PRUNE) == []


def test_plan_treats_specs_it_did_not_write_as_conflicts_never_as_updates(tmp_path: Path) -> None:
    kdir, config = tmp_path / "k", tmp_path / "c.toml"
    desired = desired_specs([entry("a"), entry("b"), entry("c")], kernels_dir=kdir,
                            config_path=config, python="/py")
    installed = {
        "a": InstalledSpec(name="a", path=kdir / "a", kernel_json={"argv": ["x"]}),
        "b": InstalledSpec(name="b", path=kdir / "b", is_symlink=True),
        "c": InstalledSpec(name="c", path=kdir / "c"),  # a plain file, or no readable kernel.json
        "x": InstalledSpec(name="x", path=kdir / "x", kernel_json={"argv": ["x"]}),
    }
    plan = plan_sync(desired, installed, config, True, kernels_dir=kdir)
    assert {item.name: item.action for item in plan.actions} == {
        "a": CONFLICT, "b": CONFLICT, "c": CONFLICT,
    }
    assert "symlink" in plan.conflicts[1].reason


def test_plan_leaves_specs_of_another_live_config_alone_but_adopts_orphans(tmp_path: Path) -> None:
    kdir, mine, other = tmp_path / "k", tmp_path / "mine.toml", tmp_path / "other.toml"
    theirs = desired_specs([entry("a"), entry("b"), entry("c")], kernels_dir=kdir,
                           config_path=other, python="/py")
    installed = installed_from(kdir, theirs, other)
    installed["b"] = InstalledSpec(name="b", path=kdir / "b", kernel_json=theirs["b"].kernel_json,
                                   owner_config=str(other), owner_config_exists=False)
    desired = desired_specs([entry("a"), entry("b")], kernels_dir=kdir, config_path=mine,
                            python="/py")
    plan = plan_sync(desired, installed, mine, True, kernels_dir=kdir)
    actions = {item.name: item.action for item in plan.actions}
    assert actions == {"a": CONFLICT, "b": UPDATE}  # c belongs to other.toml: never pruned by us
    assert "another config file" in plan.conflicts[0].reason
    assert "adopted" in plan.of(UPDATE)[0].reason


def test_a_spec_of_a_newer_marker_schema_is_foreign(tmp_path: Path) -> None:
    kdir, config = tmp_path / "k", tmp_path / "c.toml"
    desired = desired_specs([entry("a")], kernels_dir=kdir, config_path=config, python="/py")
    newer = json.loads(json.dumps(desired["a"].kernel_json))
    newer["metadata"]["remote_kernel"]["schema"] = 2
    (kdir / "a").mkdir(parents=True)
    (kdir / "a" / "kernel.json").write_text(json.dumps(newer))
    plan = plan_sync(desired, scan_installed(kdir), config, True, kernels_dir=kdir)
    assert [item.action for item in plan.actions] == [CONFLICT]


@pytest.mark.parametrize("name", ["../escape", "a/b", "..", ".", "", "a b", ".remote-kernel-x"])
def test_names_that_could_escape_the_kernels_dir_are_refused(name: str) -> None:
    with pytest.raises(KernelspecError):
        check_spec_name(name)


def test_kernel_json_is_self_contained_and_launchable_without_the_toml(tmp_path: Path) -> None:
    the_entry = entry("lab", "Lab")
    spec = render_kernel_json(the_entry, spec_dir=tmp_path / "lab", config_path=tmp_path / "c.toml",
                              python="/venv/bin/python")
    assert spec["argv"] == ["/venv/bin/python", "-m", "remote_kernel", "from-spec",
                            str(tmp_path / "lab"), "-f", "{connection_file}"]
    assert (spec["display_name"], spec["language"], spec["env"]) == ("Lab", "python", {})
    marker = spec["metadata"]["remote_kernel"]
    assert marker["schema"] == 1
    assert marker["config"] == str(tmp_path / "c.toml")
    assert marker["fingerprint"] == the_entry.fingerprint()
    assert KernelEntry.from_dict(marker["entry"]) == the_entry


# --- sync on disk ----------------------------------------------------------------------------------


def test_sync_makes_jupyter_list_exactly_the_entries_with_their_display_names(
        config_file: Path, kernels_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = set(jupyter_kernelspecs())
    code, out, _ = run_cli(capsys, "sync", "--config", str(config_file))
    assert code == 0, out
    specs = jupyter_kernelspecs()
    added = {name: specs[name] for name in set(specs) - before}
    assert {name: spec["spec"]["display_name"] for name, spec in added.items()} == {
        "lab-py": "Lab Python", "gpu": "GPU box",
    }
    for name, spec in added.items():
        assert spec["resource_dir"] == str(kernels_dir / name)
        assert spec["spec"]["argv"][:5] == [str(Path(sys.executable).absolute()), "-m",
                                            "remote_kernel", "from-spec", str(kernels_dir / name)]
    assert "2 created" in out


def test_sync_writes_world_readable_files_and_copies_ipykernel_logos(
        config_file: Path, kernels_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old_umask = os.umask(0o077)
    try:
        assert run_cli(capsys, "sync", "--config", str(config_file))[0] == 0
    finally:
        os.umask(old_umask)
    spec_dir = kernels_dir / "gpu"
    assert spec_dir.stat().st_mode & 0o777 == 0o755
    assert sorted(path.name for path in spec_dir.iterdir()) == [
        "kernel.json", "logo-32x32.png", "logo-64x64.png", "logo-svg.svg"]
    assert all(path.stat().st_mode & 0o777 == 0o644 for path in spec_dir.iterdir())


def test_a_second_sync_reports_everything_unchanged_and_changes_no_mtime(
        config_file: Path, kernels_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(capsys, "sync", "--config", str(config_file))[0] == 0
    before = mtimes(kernels_dir)
    time.sleep(0.01)
    code, out, _ = run_cli(capsys, "sync", "--config", str(config_file), "--json")
    assert code == 0
    document = json.loads(out)
    assert document["plan"]["counts"] == {"create": 0, "update": 0, "unchanged": 2, "prune": 0,
                                          "conflict": 0}
    assert document["in_sync"] is True
    assert mtimes(kernels_dir) == before


def test_changing_an_entry_updates_its_spec_in_place(
        config_file: Path, kernels_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(capsys, "sync", "--config", str(config_file))[0] == 0
    inode = (kernels_dir / "gpu").stat().st_ino
    config_file.write_text(config_file.read_text().replace('"GPU box"', '"GPU box v2"'))
    code, out, _ = run_cli(capsys, "sync", "--config", str(config_file))
    assert code == 0
    assert "1 updated" in out
    assert jupyter_kernelspecs()["gpu"]["spec"]["display_name"] == "GPU box v2"
    assert (kernels_dir / "gpu").stat().st_ino == inode  # never removed, not even for a moment
    assert not [p for p in (kernels_dir / "gpu").iterdir() if p.name.startswith(".")]


def test_renaming_an_entry_prunes_the_old_spec_and_creates_the_new_one(
        config_file: Path, kernels_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(capsys, "sync", "--config", str(config_file))[0] == 0
    config_file.write_text(config_file.read_text().replace("[kernels.gpu]", "[kernels.gpu2]"))
    code, out, _ = run_cli(capsys, "sync", "--config", str(config_file))
    assert code == 0, out
    assert "1 created" in out
    assert "1 pruned" in out
    assert sorted(p.name for p in kernels_dir.iterdir() if not p.name.startswith(".")) == [
        "gpu2", "lab-py"]
    specs = jupyter_kernelspecs()
    assert "gpu" not in specs
    assert "gpu2" in specs


def test_no_prune_keeps_specs_whose_entries_were_removed(
        config_file: Path, kernels_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(capsys, "sync", "--config", str(config_file))[0] == 0
    config_file.write_text(config_file.read_text().replace("[kernels.gpu]", "[kernels.gpu2]"))
    assert run_cli(capsys, "sync", "--no-prune", "--config", str(config_file))[0] == 0
    assert (kernels_dir / "gpu" / "kernel.json").exists()


def test_sync_never_touches_a_foreign_kernelspec_with_any_name(
        config_file: Path, kernels_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    foreign = [make_foreign_spec(kernels_dir, name) for name in ("python3", "my-r", "lab-py-old")]
    digests = {path: tree_digest(path) for path in foreign}
    assert run_cli(capsys, "sync", "--config", str(config_file))[0] == 0
    config_file.write_text(config_file.read_text().replace('"GPU box"', '"GPU 2"'))
    assert run_cli(capsys, "sync", "--config", str(config_file))[0] == 0
    config_file.write_text("")  # every entry removed: prune all
    code, out, _ = run_cli(capsys, "sync", "--config", str(config_file))
    assert code == 0
    assert "2 pruned" in out
    assert {path: tree_digest(path) for path in foreign} == digests


def test_a_foreign_spec_named_like_an_entry_is_a_conflict_left_untouched(
        config_file: Path, kernels_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    foreign = make_foreign_spec(kernels_dir, "gpu")
    digest = tree_digest(foreign)
    code, out, err = run_cli(capsys, "sync", "--config", str(config_file))
    assert code == 1
    assert tree_digest(foreign) == digest
    assert str(foreign) in err
    assert "remove the other kernelspec" in err
    assert "Traceback" not in err
    assert "gpu\tconflict" in out
    assert (kernels_dir / "lab-py" / "kernel.json").exists()  # the other entry still synced


def test_a_conflict_in_json_mode_prints_one_document_and_exits_1(
        config_file: Path, kernels_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_foreign_spec(kernels_dir, "gpu")
    code, out, err = run_cli(capsys, "sync", "--json", "--config", str(config_file))
    assert code == 1
    document = json.loads(out)  # exactly one document
    assert document["command"] == "sync"
    assert document["ok"] is False
    assert document["error"]["type"] == "SyncConflict"
    assert [a["action"] for a in document["plan"]["actions"]] == [CONFLICT, CREATE]
    assert "gpu" in err


def test_two_config_files_synced_into_one_dir_do_not_prune_each_other(
        tmp_path: Path, kernels_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first = write_config(tmp_path / "a" / "remote-kernels.toml",
                         '[kernels.one]\nhost = "alice@lab"\n')
    second = write_config(tmp_path / "b" / "remote-kernels.toml",
                          '[kernels.two]\nhost = "bob@lab"\n')
    assert run_cli(capsys, "sync", "--config", str(first))[0] == 0
    assert run_cli(capsys, "sync", "--config", str(second))[0] == 0
    assert run_cli(capsys, "sync", "--config", str(first))[0] == 0
    assert {"one", "two"} <= set(jupyter_kernelspecs())
    # A name both files declare is a conflict for the second, not a takeover.
    second.write_text('[kernels.one]\nhost = "bob@lab"\n')
    code, _, err = run_cli(capsys, "sync", "--config", str(second))
    assert code == 1
    assert str(first) in err


def test_check_exits_1_on_drift_and_0_when_in_sync(
        config_file: Path, kernels_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "sync", "--check", "--config", str(config_file))
    assert code == 1
    assert "out of sync" in out
    assert not kernels_dir.exists()
    assert run_cli(capsys, "sync", "--config", str(config_file))[0] == 0
    code, out, _ = run_cli(capsys, "sync", "--check", "--config", str(config_file))
    assert code == 0
    assert "in sync" in out
    config_file.write_text(config_file.read_text().replace('"GPU box"', '"GPU 3"'))
    assert run_cli(capsys, "sync", "--check", "--config", str(config_file))[0] == 1


def test_dry_run_leaves_the_directory_byte_identical(
        config_file: Path, kernels_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(capsys, "sync", "--config", str(config_file))[0] == 0
    make_foreign_spec(kernels_dir, "other")
    config_file.write_text(config_file.read_text().replace("[kernels.gpu]", "[kernels.gpu2]")
                           .replace('"Lab Python"', '"Lab 2"'))
    digest = tree_digest(kernels_dir.parent)
    code, out, _ = run_cli(capsys, "sync", "--dry-run", "--config", str(config_file))
    assert code == 0
    assert "dry run" in out
    assert "1 created" in out
    assert "1 updated" in out
    assert "1 pruned" in out
    assert tree_digest(kernels_dir.parent) == digest


def test_dry_run_and_check_create_nothing_not_even_the_kernels_dir(
        config_file: Path, kernels_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_cli(capsys, "sync", "--dry-run", "--config", str(config_file))
    run_cli(capsys, "sync", "--check", "--config", str(config_file))
    assert not kernels_dir.exists()


def test_a_symlinked_spec_dir_is_never_followed_nor_pruned(
        tmp_path: Path, config_file: Path, kernels_dir: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(capsys, "sync", "--config", str(config_file))[0] == 0
    # An owned-looking spec outside the kernels dir, linked in under a name we would prune.
    outside = tmp_path / "elsewhere" / "old"
    outside.parent.mkdir()
    (kernels_dir / "gpu").rename(outside)
    (kernels_dir / "old").symlink_to(outside, target_is_directory=True)
    # And a symlink named like an entry.
    (kernels_dir / "gpu").symlink_to(outside, target_is_directory=True)
    digest = tree_digest(outside)
    code, _, err = run_cli(capsys, "sync", "--config", str(config_file))
    assert code == 1
    assert "symlink" in err
    assert (kernels_dir / "old").is_symlink()
    assert (kernels_dir / "gpu").is_symlink()
    assert tree_digest(outside) == digest


def test_prune_is_skipped_when_a_write_failed(
        tmp_path: Path, kernels_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "c.toml"
    kdir = kernels_dir
    first = desired_specs([entry("keep"), entry("old")], kernels_dir=kdir, config_path=config,
                          python="/py")
    sync_kernelspecs(first, kernels_dir=kdir, config_path=config, prune=True)
    second = desired_specs([entry("keep"), entry("new")], kernels_dir=kdir, config_path=config,
                           python="/py")
    real_rename = os.rename

    def failing_rename(source: Any, target: Any) -> None:
        if Path(target).name == "new":
            raise PermissionError(13, "Permission denied")
        real_rename(source, target)

    monkeypatch.setattr(os, "rename", failing_rename)
    _plan, result = sync_kernelspecs(second, kernels_dir=kdir, config_path=config, prune=True)
    assert result is not None
    assert not result.ok
    assert result.prune_skipped
    assert (kdir / "old" / "kernel.json").exists()
    assert not (kdir / "new").exists()
    assert [name for name in os.listdir(kdir) if name.startswith(".remote-kernel-tmp")] == []


@pytest.mark.parametrize("fail_at", [1, 2, 3, 4])
def test_a_crash_between_steps_leaves_every_spec_old_or_new(
        tmp_path: Path, kernels_dir: Path, monkeypatch: pytest.MonkeyPatch, fail_at: int) -> None:
    config = tmp_path / "c.toml"
    kdir = kernels_dir
    old = desired_specs([entry("a", "A"), entry("b", "B"), entry("gone")], kernels_dir=kdir,
                        config_path=config, python="/py")
    sync_kernelspecs(old, kernels_dir=kdir, config_path=config, prune=True)
    new = desired_specs([entry("a", "A2"), entry("b", "B2"), entry("c")], kernels_dir=kdir,
                        config_path=config, python="/py")
    real_rename, calls = os.rename, []

    def crashing_rename(source: Any, target: Any) -> None:
        calls.append(target)
        if len(calls) == fail_at:
            raise KeyboardInterrupt  # like a Ctrl-C between two steps: nothing catches it
        real_rename(source, target)

    monkeypatch.setattr(os, "rename", crashing_rename)
    with pytest.raises(KeyboardInterrupt):
        sync_kernelspecs(new, kernels_dir=kdir, config_path=config, prune=True)
    monkeypatch.setattr(os, "rename", real_rename)
    for name in ("a", "b", "c", "gone"):
        spec = sync_module.read_kernel_json(kdir / name)
        allowed = [s.kernel_json for s in (old.get(name), new.get(name)) if s] + [None]
        assert spec in allowed, name  # old, new, or absent (create not done / prune done)
    assert sync_module.read_kernel_json(kdir / "a") is not None
    # The next sync finishes the job and clears the leftovers.
    _plan, result = sync_kernelspecs(new, kernels_dir=kdir, config_path=config, prune=True)
    assert result is None or result.ok
    assert sorted(name for name in os.listdir(kdir) if name != LOCK_NAME) == ["a", "b", "c"]
    assert all(not p.name.startswith(".") for p in (kdir / "a").iterdir())


def test_the_lock_makes_a_second_sync_wait_then_give_up_with_a_clear_message(
        kernels_dir: Path) -> None:
    kernels_dir.mkdir(parents=True)
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with sync_lock(kernels_dir):
            held.set()
            release.wait(10)

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        assert held.wait(10)
        started = time.monotonic()
        with pytest.raises(KernelspecError, match="another remote-kernel sync"), \
                sync_lock(kernels_dir, timeout=0.3):
            pass
        assert time.monotonic() - started >= 0.3
    finally:
        release.set()
        thread.join(10)
    with sync_lock(kernels_dir, timeout=1):
        pass


def test_concurrent_syncs_of_two_configs_both_land(tmp_path: Path, kernels_dir: Path) -> None:
    configs = []
    for index in range(2):
        text = "".join(f'[kernels.c{index}-k{n}]\nhost = "u@h{n}"\n' for n in range(40))
        configs.append(write_config(tmp_path / f"c{index}" / "remote-kernels.toml", text))
    remote_kernel = Path(sys.executable).parent / "remote-kernel"
    processes = [subprocess.Popen([str(remote_kernel), "sync", "--config", str(c)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  env=dict(os.environ)) for c in configs]
    for process in processes:
        _, err = process.communicate(timeout=60)
        assert process.returncode == 0, err
    names = {p.name for p in kernels_dir.iterdir() if not p.name.startswith(".")}
    assert len(names) == 80
    assert all(sync_module.read_kernel_json(kernels_dir / name) for name in names)


def test_prefix_target_writes_under_prefix_share_jupyter_kernels(
        tmp_path: Path, config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prefix = tmp_path / "image-root"
    code, _, _ = run_cli(capsys, "sync", "--prefix", str(prefix), "--launcher-python",
                         "/usr/local/bin/python3", "--config", str(config_file))
    assert code == 0
    spec = json.loads((prefix / "share/jupyter/kernels/gpu/kernel.json").read_text())
    assert spec["argv"][0] == "/usr/local/bin/python3"
    assert spec["argv"][4] == str(prefix / "share/jupyter/kernels/gpu")


def test_sys_prefix_target_is_sys_prefix_share_jupyter_kernels() -> None:
    assert sync_module.kernels_dir_for(sys_prefix=True) == (
        Path(sys.prefix).absolute() / "share" / "jupyter" / "kernels")
    assert sync_module.kernels_dir_for() == Path(os.environ["JUPYTER_DATA_DIR"]) / "kernels"


def test_list_shows_whether_each_entry_is_in_sync(
        config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "list", "--json", "--config", str(config_file))
    assert code == 0
    assert {k["name"]: k["sync"] for k in json.loads(out)["kernels"]} == {
        "lab-py": "missing", "gpu": "missing"}
    run_cli(capsys, "sync", "--config", str(config_file))
    config_file.write_text(config_file.read_text().replace('"GPU box"', '"GPU 4"'))
    code, out, _ = run_cli(capsys, "list", "--json", "--config", str(config_file))
    assert {k["name"]: k["sync"] for k in json.loads(out)["kernels"]} == {
        "lab-py": "in sync", "gpu": "outdated"}
    assert code == 0


def test_an_unusable_target_is_a_clear_error_not_a_traceback(
        tmp_path: Path, config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    code, _, err = run_cli(capsys, "sync", "--prefix", str(blocker), "--config", str(config_file))
    assert code == 1
    assert f"kernels directory {blocker}/share/jupyter/kernels" in err
    assert "Traceback" not in err
    code, _, err = run_cli(capsys, "sync", "--launcher-python", "no-such-python-here",
                           "--config", str(config_file))
    assert code == 2
    assert "--launcher-python" in err


def test_leftovers_of_a_killed_sync_are_invisible_to_jupyter_and_removed_next_time(
        config_file: Path, kernels_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    half_built = kernels_dir / ".remote-kernel-tmp-dead" / "gpu"
    half_built.mkdir(parents=True)
    (half_built / "kernel.json").write_text('{"argv": ["x"], "display_name": "half"}')
    assert not {"gpu", ".remote-kernel-tmp-dead"} & set(jupyter_kernelspecs())
    assert run_cli(capsys, "sync", "--config", str(config_file))[0] == 0
    assert not (kernels_dir / ".remote-kernel-tmp-dead").exists()
    assert jupyter_kernelspecs()["gpu"]["spec"]["display_name"] == "GPU box"

"""`discover HOST`: the Python environments on a host, and `--add` turning them into kernels.

The "remote" host is this machine behind the real sshd fixture: the tests make venvs under a temp
dir (one that reaches ipykernel through a .pth file, one bare, three levels down) and a conda-style
``~/.conda/environments.txt`` in the sshd login's HOME naming a fake conda environment.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from launch_helpers import execute, host_table, started_kernel, write_config
from sshd import SSHServer, free_port

from remote_kernel import bootstrap, cli, discover
from remote_kernel.config import load_config
from remote_kernel.entry import HostEntry, KernelEntry
from remote_kernel.errors import RemoteKernelError

pytestmark = pytest.mark.usefixtures("sshd")

COMMENTED_HEAD = """\
# Team kernels -- keep this comment!
[defaults]
startup_timeout = 60   # trailing comment

"""


@dataclass(frozen=True)
class RemoteEnvs:
    """What the tests put on the "remote" host."""

    search: Path  # given with --search
    with_ipykernel: Path  # a venv's prefix, 1 level below search
    without_ipykernel: Path  # a bare venv, 3 levels below search
    conda_env: Path  # listed in ~/.conda/environments.txt only


def _venv(prefix: Path) -> Path:
    prefix.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(prefix)], check=True,
                   capture_output=True, timeout=120)
    return prefix


def _site_packages(prefix: Path) -> Path:
    found = sorted(prefix.glob("lib/python3*/site-packages"))
    assert found, f"no site-packages under {prefix}"
    return found[0]


@pytest.fixture(scope="module")
def remote_envs(tmp_path_factory: pytest.TempPathFactory, sshd: SSHServer) -> Iterator[RemoteEnvs]:
    search = tmp_path_factory.mktemp("discover") / "projects"
    with_ik = _venv(search / "analysis" / ".venv")
    # ipykernel without installing it: a .pth file adds this test run's site-packages (where
    # ipykernel and its dependencies are) to the venv's path, as `pip install` would have.
    (_site_packages(with_ik) / "rk-test-ipykernel.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    without = _venv(search / "deep" / "down" / "bare")
    assert sshd.remote_home is not None
    conda_env = _venv(sshd.remote_home / "fakeconda" / "envs" / "condaenv")
    (conda_env / "conda-meta").mkdir()
    conda_dir = sshd.remote_home / ".conda"
    conda_dir.mkdir()
    (conda_dir / "environments.txt").write_text(f"{conda_env}\n")
    try:
        yield RemoteEnvs(search=search, with_ipykernel=with_ik, without_ipykernel=without, conda_env=conda_env)
    finally:  # the sshd's HOME is shared by the session: leave it as it was
        shutil.rmtree(conda_dir, ignore_errors=True)
        shutil.rmtree(sshd.remote_home / "fakeconda", ignore_errors=True)


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def config_for(path: Path, sshd: SSHServer, *, head: str = "") -> Path:
    """A config whose [hosts.lab] is the sshd fixture and which has no kernels yet."""
    write_config(path, hosts={"lab": host_table(sshd)}, kernels={})
    path.write_text(head + path.read_text())
    return path


def by_python(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {env["python"]: env for env in document["environments"]}


def python_of(prefix: Path) -> str:
    return str(prefix / "bin" / "python")


# --- over the real sshd --------------------------------------------------------------------------


def test_discover_finds_the_searched_venvs_and_the_environments_txt_entry_and_tells_which_have_ipykernel(
        remote_envs: RemoteEnvs, sshd: SSHServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = config_for(tmp_path / "remote-kernels.toml", sshd)
    code, out, err = run_cli(capsys, "discover", "lab", "--search", str(remote_envs.search), "--json",
                             "--config", str(config))
    assert code == 0, err
    document = json.loads(out)
    assert document["command"] == "discover"
    assert document["ok"] is True
    found = by_python(document)
    with_ik = found[python_of(remote_envs.with_ipykernel)]
    assert (with_ik["kind"], with_ik["name"], with_ik["usable"]) == ("venv", "analysis", True)
    import ipykernel

    assert with_ik["ipykernel"] == ipykernel.__version__
    assert with_ik["version"] == ".".join(map(str, sys.version_info[:3]))
    assert with_ik["entry"] == "lab-analysis"
    bare = found[python_of(remote_envs.without_ipykernel)]
    assert (bare["kind"], bare["name"], bare["ipykernel"], bare["usable"]) == ("venv", "bare", None, False)
    assert bare["install_command"] == f"{python_of(remote_envs.without_ipykernel)} -m pip install ipykernel"
    assert bare["entry"] is None
    conda = found[python_of(remote_envs.conda_env)]
    assert (conda["kind"], conda["name"], conda["ipykernel"]) == ("conda", "condaenv", None)
    assert document["notes"] == []


def test_discover_prints_a_table_and_the_command_that_installs_ipykernel_where_it_is_missing(
        remote_envs: RemoteEnvs, sshd: SSHServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = config_for(tmp_path / "remote-kernels.toml", sshd)
    code, out, err = run_cli(capsys, "discover", "lab", "--search", str(remote_envs.search),
                             "--search", "~/no-such-dir", "--config", str(config))
    assert code == 0, err
    with capsys.disabled():
        print(out)  # shown with -s: the table as a user sees it (not a terminal: tab-separated)
    lines = out.splitlines()
    assert lines[0].split("\t") == ["env", "kind", "python", "version", "ipykernel", "kernel entry"]
    rows = {line.split("\t")[2]: line.split("\t") for line in lines[1:] if line.count("\t") == 5}
    assert rows[python_of(remote_envs.with_ipykernel)][4:] == [__import__("ipykernel").__version__, "lab-analysis"]
    assert rows[python_of(remote_envs.without_ipykernel)][4:] == ["no", "-"]
    assert rows[python_of(remote_envs.conda_env)][:2] == ["condaenv", "conda"]
    assert f"  {python_of(remote_envs.without_ipykernel)} -m pip install ipykernel" in lines
    assert any(line.startswith("note: --search ~/no-such-dir: no such directory on the host") for line in lines)
    assert "`remote-kernel discover lab --add` adds 1 kernel entry: lab-analysis" in lines
    assert tomllib.loads(config.read_text())["kernels"] == {}, "without --add nothing is written"


@pytest.mark.slow
def test_discover_add_appends_entries_that_validate_keeping_every_byte_and_their_kernel_starts(
        remote_envs: RemoteEnvs, sshd: SSHServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = config_for(tmp_path / "remote-kernels.toml", sshd, head=COMMENTED_HEAD)
    original = config.read_bytes()
    code, out, err = run_cli(capsys, "discover", "lab", "--search", str(remote_envs.search), "--add",
                             "--prefix", "Team", "--config", str(config))
    with capsys.disabled():
        print(out)  # shown with -s
    assert code == 0, err
    assert config.read_bytes().startswith(original)
    assert f"added to {config}: [kernels.team-analysis]" in out
    code, _, err = run_cli(capsys, "validate", "--config", str(config))
    assert code == 0, err
    entry = load_config(config).entry("team-analysis")
    assert (entry.host.name, entry.python) == ("lab", python_of(remote_envs.with_ipykernel))
    assert set(tomllib.loads(config.read_text())["kernels"]) == {"team-analysis"}  # only envs with ipykernel
    with started_kernel("team-analysis") as (_, kc):
        assert execute(kc, "1+1").result == "2"
    # A second --add finds the entry already there and adds nothing.
    before = config.read_bytes()
    code, out, err = run_cli(capsys, "discover", "lab", "--search", str(remote_envs.search), "--add",
                             "--prefix", "team", "--config", str(config))
    assert code == 0, err
    assert config.read_bytes() == before
    assert "nothing to add: every environment with ipykernel is already configured" in out


def test_discover_add_to_an_ad_hoc_target_creates_the_user_config_with_one_entry(
        remote_envs: RemoteEnvs, sshd: SSHServer, isolated_env: Any, capsys: pytest.CaptureFixture[str]) -> None:
    # `ssh alice@127.0.0.1 -p PORT` works with the key and known_hosts in ~/.ssh, as for a user.
    shutil.copy(sshd.client_key, isolated_env.ssh_dir / "id_ed25519")
    (isolated_env.ssh_dir / "known_hosts").write_text(sshd.known_hosts.read_text())
    target = f"{sshd.user}@{sshd.host}:{sshd.port}"
    code, out, err = run_cli(capsys, "discover", target, "--search", str(remote_envs.search), "--add", "--json")
    assert code == 0, err
    document = json.loads(out)
    user_config = isolated_env.xdg_config / "remote-kernel" / "remote-kernels.toml"
    assert document["config"] == str(user_config)
    name = f"{sshd.user}-{sshd.host}-{sshd.port}-analysis"
    assert document["added"] == [name]
    assert document["result"]["applied"] == [{"name": name, "action": "create"}]
    assert (user_config.stat().st_mode & 0o777) == 0o600
    assert load_config(user_config).entry(name).host.label == target


def test_conda_env_list_and_an_install_roots_envs_are_read(sshd: SSHServer, tmp_path: Path) -> None:
    assert sshd.remote_home is not None
    root = _venv(sshd.remote_home / "miniconda3")  # a common install root: its base env and envs/
    ml = _venv(root / "envs" / "ml")
    elsewhere = _venv(tmp_path / "shared" / "tools")  # known only to `conda env list`
    for prefix in (root, ml, elsewhere):
        (prefix / "conda-meta").mkdir()
    # conda itself is not installed here: its condabin/conda prints what `conda env list --json` does.
    conda = root / "condabin" / "conda"
    conda.parent.mkdir()
    conda.write_text("#!/bin/sh\ntest \"$*\" = 'env list --json' || exit 2\n"
                     f"echo '{json.dumps({'envs': [str(root), str(ml), str(elsewhere)]})}'\n")
    conda.chmod(0o755)
    try:
        found = discover.discover(sshd.host_entry(), [])
    finally:
        shutil.rmtree(root)
    mine = {python_of(prefix) for prefix in (root, ml, elsewhere)}
    conda_envs = [(env.kind, env.name, env.python) for env in found.environments if env.python in mine]
    assert conda_envs == [("conda", "base", python_of(root)), ("conda", "ml", python_of(ml)),
                          ("conda", "tools", python_of(elsewhere))]
    assert found.notes == ()


def _fake_venv(prefix: Path, script: str) -> Path:
    (prefix / "bin").mkdir(parents=True)
    (prefix / "pyvenv.cfg").write_text("home = /nowhere\n")
    python = prefix / "bin" / "python"
    python.write_text("#!/bin/sh\n" + script + "\n")
    python.chmod(0o755)
    return python


def test_a_python_that_hangs_or_fails_is_reported_in_its_row_and_holds_nothing_up(
        remote_envs: RemoteEnvs, sshd: SSHServer, tmp_path: Path) -> None:
    search = tmp_path / "odd"
    # exec: the probe's timeout kills the sleep itself, nothing is left behind
    hangs = _fake_venv(search / "hangs", "exec sleep 30")
    fails = _fake_venv(search / "fails", "echo 'Fatal Python error: init_fs_encoding' >&2; exit 3")
    found = discover.discover(sshd.host_entry(), [str(search), str(remote_envs.search)], python_timeout=1.0)
    rows = {env.python: env for env in found.environments}
    assert rows[str(hangs)].error == "its python did not answer within 1 s"
    assert rows[str(fails)].error == "its python failed (exit 3): Fatal Python error: init_fs_encoding"
    assert not rows[str(hangs)].usable
    assert rows[python_of(remote_envs.with_ipykernel)].usable  # the others were still asked
    assert found.seconds < 25  # bounded by the 1 s limit, not by the 30 s sleep (a generous bound)


def test_discover_reads_its_answer_past_a_bashrc_that_prints(
        remote_envs: RemoteEnvs, sshd: SSHServer) -> None:
    assert sshd.remote_home is not None
    bashrc = sshd.remote_home / ".bashrc"
    assert not bashrc.exists()
    bashrc.write_text("echo 'Welcome to the lab cluster!'\n")
    try:
        found = discover.discover(sshd.host_entry(), [str(remote_envs.search)])
    finally:
        bashrc.unlink()
    assert python_of(remote_envs.with_ipykernel) in {env.python for env in found.environments}


def test_discover_of_a_host_that_cannot_be_reached_fails_with_one_clear_line(
        sshd: SSHServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "remote-kernels.toml"
    write_config(config, hosts={"gone": host_table(sshd, port=free_port())}, kernels={})
    code, out, err = run_cli(capsys, "discover", "gone", "--config", str(config))
    assert code == 1
    assert out == ""
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("remote-kernel: error: ")
    assert "refused" in lines[0]


# --- at our own seams (in addition to the real tests above) --------------------------------------


def _discovery(*environments: discover.Environment, home: str = "/home/alice") -> discover.Discovery:
    return discover.Discovery(host=HostEntry(name="lab"), environments=environments, home=home)


def _env(name: str, python: str, *, version: str = "3.11.4", ipykernel: str | None = "6.29.0",
         kind: str = "conda") -> discover.Environment:
    return discover.Environment(kind=kind, name=name, prefix=python.rsplit("/bin/", 1)[0], python=python,
                                version=version, ipykernel=ipykernel)


def test_entry_names_follow_the_kernel_name_rule_and_never_clash() -> None:
    found = _discovery(
        _env("ML env", "/opt/conda/envs/ML env/bin/python"),
        _env("ml-env", "/home/alice/miniconda3/envs/ml-env/bin/python"),
        _env("base", "/home/alice/miniconda3/bin/python"),
        _env("old", "/opt/py36/bin/python", version="3.6.15"),
        _env("bare", "/opt/bare/bin/python", ipykernel=None),
    )
    existing = {"lab-base": KernelEntry(name="lab-base", host=HostEntry(name="other"), display_name="x")}
    planned = discover.plan_entries(found, prefix="lab", existing=existing, taken=["lab-ml-env-2"])
    assert [(item.name, item.python) for item in planned] == [
        ("lab-ml-env", "/opt/conda/envs/ML env/bin/python"),
        ("lab-ml-env-3", "~/miniconda3/envs/ml-env/bin/python"),
        ("lab-base-2", "~/miniconda3/bin/python"),
    ]


def test_an_environment_already_configured_for_the_host_is_not_added_again() -> None:
    found = _discovery(_env("ml", "/home/alice/envs/ml/bin/python"))
    existing = {"mine": KernelEntry(name="mine", host=HostEntry(name="lab"), display_name="x",
                                    python="~/envs/ml/bin/python")}
    [planned] = discover.plan_entries(found, prefix="lab", existing=existing)
    assert (planned.name, planned.existing) == ("mine", True)


def test_the_host_prefix_is_made_valid_and_a_bad_prefix_is_refused_before_connecting(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert discover.host_prefix("alice@lab.example.org:2222", None) == "alice-lab.example.org-2222"
    assert discover.host_prefix("Lab Server", None) == "lab-server"
    code, out, err = run_cli(capsys, "discover", "nowhere.invalid", "--prefix", "bad/name")
    assert code == 2
    assert "invalid --prefix 'bad/name'" in err
    assert "Kernel names can only contain" in err


def test_the_answer_is_found_after_whatever_a_login_shell_printed() -> None:
    answer = {"environments": [{"kind": "path", "name": "python3", "prefix": "/usr", "python": "/usr/bin/python3",
                                "version": "3.8.10", "ipykernel": None}], "notes": [], "home": "/h", "seconds": 0.2}
    stdout = b"Welcome to lab!\n" + discover.MARKER.encode() + b"\n" + json.dumps(answer).encode() + b"\n"
    found = discover.parse_answer(HostEntry(name="lab"), "python3",
                                  bootstrap.ProgramResult(stdout=stdout, stderr=b"", exit_status=0))
    assert [env.python for env in found.environments] == ["/usr/bin/python3"]


def test_a_missing_remote_python_is_an_error_that_names_it_and_the_way_out() -> None:
    result = bootstrap.ProgramResult(stdout=b"", stderr=b"sh: 1: exec: python3: not found\n", exit_status=127)
    with pytest.raises(RemoteKernelError) as caught:
        discover.parse_answer(HostEntry(name="lab"), "python3", result)
    assert "exit 127" in caught.value.message
    assert "python3: not found" in caught.value.message
    assert "--python" in (caught.value.hint or "")


def test_the_marker_is_the_probes_own() -> None:
    from remote_kernel.remote import discover_probe

    assert discover_probe.MARKER == discover.MARKER


def test_the_probe_parses_as_python_3_8() -> None:
    import ast

    ast.parse(discover.PROBE_SOURCE.read_text(encoding="utf-8"), feature_version=(3, 8))


def _older_pythons() -> list[str]:
    """Interpreters older than ours on this machine (the probe promises Python 3.8+)."""
    import glob
    import os

    found = {shutil.which(f"python3.{minor}") for minor in (8, 9, 10)}
    pyenv = os.environ.get("PYENV_ROOT")
    if pyenv:
        found |= set(glob.glob(f"{pyenv}/versions/3.[89].*/bin/python3.[89]"))
    return sorted(path for path in found if path and "/shims/" not in path)  # shims fail unless selected


@pytest.mark.parametrize("python", _older_pythons() or [pytest.param("", marks=pytest.mark.skip(
    reason="no Python 3.8-3.10 here; test_the_probe_parses_as_python_3_8 still checks the syntax"))])
def test_discover_runs_with_an_older_remote_python(python: str, remote_envs: RemoteEnvs, sshd: SSHServer) -> None:
    found = discover.discover(sshd.host_entry(), [str(remote_envs.search)], python=python)
    rows = {env.python: env for env in found.environments}
    assert rows[python_of(remote_envs.with_ipykernel)].usable
    assert rows[python_of(remote_envs.without_ipykernel)].ipykernel is None

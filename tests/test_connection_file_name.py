"""The name of the connection file `start` writes without -f (issue 12, item 11).

``kernel-<ssh user>@<host alias>.json``, as v1.1 named it: the SSH login user as ssh resolves it
(the host's ``user``, else ~/.ssh/config's User, else the local login name) and the host as the
user named it. Before: the local $USER (the literal ``user`` when unset) and the HostName.
README, examples/spyder.toml and `start --help` say the same.
"""

from __future__ import annotations

import getpass
import re
from pathlib import Path

import pytest
from conftest import IsolatedEnv
from launch_helpers import run_cli

from remote_kernel.config import load_config
from remote_kernel.connection import default_connection_file
from remote_kernel.entry import HostEntry

REPO = Path(__file__).resolve().parent.parent


def test_the_name_holds_the_configured_ssh_user_and_the_host_alias(tmp_path: Path) -> None:
    host = HostEntry(name="analysis", hostname="analysis.example.org", user="carol")
    assert default_connection_file(tmp_path, host).name == "kernel-carol@analysis.json"


def test_without_a_configured_user_the_name_holds_ssh_configs_user_not_the_local_one(
    tmp_path: Path, isolated_env: IsolatedEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    (isolated_env.ssh_dir / "config").write_text("Host lab\n  HostName lab.example.org\n  User dave\n")
    monkeypatch.setenv("USER", "somebody-else")
    assert default_connection_file(tmp_path, HostEntry(name="lab")).name == "kernel-dave@lab.json"


def test_with_no_user_anywhere_the_name_holds_the_local_login_name_even_without_user_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for variable in ("USER", "LOGNAME", "LNAME", "USERNAME"):
        monkeypatch.delenv(variable, raising=False)
    login = getpass.getuser()  # from the password database now
    assert default_connection_file(tmp_path, HostEntry(name="lab")).name == f"kernel-{login}@lab.json"


def test_a_v1_target_names_its_user_and_host_without_the_port(tmp_path: Path) -> None:
    host = HostEntry.from_target("erin@lab.example.org:2222")
    assert default_connection_file(tmp_path, host).name == "kernel-erin@lab.example.org.json"


def test_a_name_held_by_a_file_nobody_serves_is_reused_and_a_live_one_gets_a_suffix(tmp_path: Path) -> None:
    import socket

    host = HostEntry(name="lab", user="carol")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        (tmp_path / "kernel-carol@lab.json").write_text(f'{{"shell_port": {listener.getsockname()[1]}}}')
        assert default_connection_file(tmp_path, host).name == "kernel-carol@lab-2.json"
    assert default_connection_file(tmp_path, host).name == "kernel-carol@lab.json"


def test_the_spyder_example_names_the_file_start_writes_for_it(tmp_path: Path) -> None:
    example = REPO / "examples" / "spyder.toml"
    entry = load_config(example).entry("analysis-spyder")
    name = default_connection_file(tmp_path, entry.host).name
    assert name == "kernel-carol@analysis.json"
    assert re.search(rf"--existing \S*/{re.escape(name)}`", example.read_text()), "the comment names another file"


def test_readme_and_start_help_describe_the_same_name() -> None:
    readme = (REPO / "README.md").read_text()
    assert "kernel-<ssh user>@<host>.json" in readme
    help_text = " ".join(run_cli(["start", "--help"]).stdout.split())
    assert "kernel-<ssh user>@<host>.json" in help_text, help_text

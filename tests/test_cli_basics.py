"""The command line around the config: validate, list, global options, --help, --version."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from remote_kernel import __version__, cli

GOOD = """
[defaults]
python = "python3"

[hosts.lab]
hostname = "lab.example.org"
user = "alice"

[kernels.lab-py311]
host = "lab"
display_name = "Python 3.11 (lab)"

[kernels.v6]
host = "bob@[::1]:2222"
python = "/opt/py/bin/python"
"""

# The example: an unknown key, a port of 70000, a kernel pointing at an undefined host.
THREE_PROBLEMS = """
[hosts.lab]
hostname = "lab.example.org"
port = 70000

[kernels.lab-py311]
host = "nosuch"
colour = "blue"
"""


@pytest.fixture
def good(tmp_path: Path) -> Path:
    path = tmp_path / "good.toml"
    path.write_text(GOOD.lstrip(), encoding="utf-8")
    return path


@pytest.fixture
def bad(tmp_path: Path) -> Path:
    path = tmp_path / "bad.toml"
    path.write_text(THREE_PROBLEMS.lstrip(), encoding="utf-8")
    return path


def test_a_file_with_three_problems_prints_three_located_errors_and_exits_2(
        bad: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["validate", "--config", str(bad)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "Traceback" not in err
    located = [line.strip() for line in err.splitlines() if line.strip().startswith(f"{bad}:")]
    assert len(located) == 3, err
    assert located[0].startswith(f"{bad}:3: hosts.lab.port: expected an integer from 1 to 65535")
    assert located[1].startswith(f'{bad}:6: kernels.lab-py311.host: undefined host "nosuch"')
    assert located[2].startswith(f'{bad}:7: kernels.lab-py311.colour: unknown key "colour"')


def test_validate_says_ok_with_the_counts(good: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["validate", "--config", str(good)]) == 0
    assert capsys.readouterr().out == f"{good}: OK, 2 kernels, 1 host\n"


@pytest.mark.parametrize("where", ["before", "after"])
def test_global_options_work_before_or_after_the_command(
        good: Path, capsys: pytest.CaptureFixture[str], where: str) -> None:
    options = ["--config", str(good), "-q", "--json"]
    argv = [*options, "validate"] if where == "before" else ["validate", *options]
    assert cli.main(argv) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["ok"] is True
    assert document["path"] == str(good)
    assert document["kernels"] == ["lab-py311", "v6"]


def test_validate_json_on_a_bad_file_prints_one_error_document(
        bad: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--json", "validate", "--config", str(bad)]) == 2
    document = json.loads(capsys.readouterr().out)
    assert document["ok"] is False
    assert [(p["line"], p["key"]) for p in document["error"]["problems"]] == [
        (3, "hosts.lab.port"), (6, "kernels.lab-py311.host"), (7, "kernels.lab-py311.colour"),
    ]


def test_validate_finds_the_config_through_the_environment(
        good: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("REMOTE_KERNEL_CONFIG", str(good))
    assert cli.main(["validate"]) == 0
    assert capsys.readouterr().out.startswith(f"{good}: OK")


def test_validate_without_any_config_explains_where_it_looked(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("REMOTE_KERNEL_CONFIG", raising=False)
    assert cli.main(["validate"]) == 2
    err = capsys.readouterr().err
    assert "no config file found" in err
    assert str(tmp_path / "remote-kernels.toml") in err
    assert "Traceback" not in err


def test_list_json_is_one_document_with_one_object_per_kernel(
        good: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["list", "--json", "--config", str(good)]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["command"] == "list"
    assert document["config"] == str(good)
    assert [(k["name"], k["host"], k["display_name"]) for k in document["kernels"]] == [
        ("lab-py311", "alice@lab.example.org (lab)", "Python 3.11 (lab)"),
        ("v6", "bob@[::1]:2222", "v6"),
    ]


def test_list_prints_a_plain_table_when_stdout_is_not_a_terminal(
        good: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--config", str(good), "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split("\t") == ["name", "host", "display_name", "python", "sync"]
    assert lines[1].split("\t") == ["lab-py311", "alice@lab.example.org (lab)", "Python 3.11 (lab)",
                                    "python3", "missing"]
    assert len(lines) == 3


def test_list_on_a_bad_file_exits_2_without_a_traceback(
        bad: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["list", "--config", str(bad)]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_version_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"remote-kernel {__version__}"


def test_help_lists_every_command_but_not_the_hidden_v1_one(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    listed = set(re.findall(r"^\s{4}(\S+)\s", out, flags=re.MULTILINE))
    assert set(cli.COMMANDS) <= listed, out
    assert cli.ADHOC_COMMAND not in out
    for option in ("--config", "--json", "--verbose", "--quiet", "--version"):
        assert option in out


def test_an_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["frobnicate"]) == 2
    assert "invalid choice" in capsys.readouterr().err


"""The command line around the config: validate, list, global options, --help, --version."""

from __future__ import annotations

import json
import logging
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



def test_an_unknown_command_lists_the_commands_but_not_the_hidden_v1_one(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["frobnicate"]) == 2
    err = capsys.readouterr().err
    assert "'sync', 'start'" in err
    assert cli.ADHOC_COMMAND not in err


def test_a_v1_1_usage_error_names_the_program_not_the_hidden_command(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["-t"]) == 2
    err = capsys.readouterr().err
    assert "remote-kernel: error: argument -t/--target: expected one argument" in err
    assert cli.ADHOC_COMMAND not in err


def test_the_top_level_help_shows_the_v1_1_form_with_its_python_option(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "remote-kernel -t [user@]host[:port] [-J jump]... [-i key] [-c command] [--python P]" in out
    assert "REMOTE_KERNEL_LOG" in out


def test_start_with_a_mistyped_kernel_name_exits_2_and_suggests_the_close_one(
        good: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["start", "lab-py31", "--config", str(good)]) == 2
    err = capsys.readouterr().err
    assert "no kernel named 'lab-py31'" in err
    assert "did you mean 'lab-py311'?" in err
    assert "Traceback" not in err


def test_start_with_an_unrelated_name_lists_the_known_kernels_without_a_guess(
        good: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["start", "zzz", "--config", str(good)]) == 2
    err = capsys.readouterr().err
    assert "known kernels: lab-py311, v6" in err
    assert "did you mean" not in err


def test_from_spec_with_an_unknown_kernelspec_exits_2_and_suggests_an_installed_one(
        good: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["sync", "--config", str(good)]) == 0
    capsys.readouterr()
    assert cli.main(["from-spec", "lab-py31"]) == 2
    err = capsys.readouterr().err
    assert "no kernelspec 'lab-py31'" in err
    assert "did you mean 'lab-py311'?" in err
    assert cli.main(["from-spec", "nosuch"]) == 2
    assert "did you mean" not in capsys.readouterr().err


def test_from_spec_json_with_an_unknown_kernelspec_prints_one_error_document(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["from-spec", "nosuch", "--json"]) == 2
    document = json.loads(capsys.readouterr().out)
    assert (document["command"], document["ok"], document["error"]["type"]) == ("from-spec", False, "UsageError")


@pytest.mark.parametrize(("value", "level"), [("debug", logging.DEBUG), ("INFO", logging.INFO),
                                               ("Warning", logging.WARNING), ("error", logging.ERROR)])
def test_remote_kernel_log_sets_the_level_when_no_v_or_q_is_given(
        good: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], value: str, level: int,
) -> None:
    monkeypatch.setenv("REMOTE_KERNEL_LOG", value)
    assert cli.main(["validate", "--config", str(good)]) == 0
    assert logging.getLogger().level == level
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize(("flag", "level"), [("-q", logging.ERROR), ("-v", logging.INFO)])
def test_v_and_q_win_over_remote_kernel_log(
        good: Path, monkeypatch: pytest.MonkeyPatch, flag: str, level: int) -> None:
    monkeypatch.setenv("REMOTE_KERNEL_LOG", "debug")
    assert cli.main(["validate", flag, "--config", str(good)]) == 0
    assert logging.getLogger().level == level


def test_an_invalid_remote_kernel_log_gives_one_warning_line_and_is_ignored(
        good: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("REMOTE_KERNEL_LOG", "loud")
    assert cli.main(["validate", "--config", str(good)]) == 0
    assert logging.getLogger().level == logging.WARNING
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "REMOTE_KERNEL_LOG='loud' is not one of debug, info, warning, error; ignored" in err


def test_launcher_hints_for_the_v1_1_form_name_its_options_not_config_keys() -> None:
    from remote_kernel.commands.adhoc_cmd import in_option_words

    hint = "install ipykernel for the remote python (`python -m pip install ipykernel`) or set `python` to one"
    assert in_option_words(hint).endswith("or pass `--python` with one")
    assert in_option_words("check `python`, `setup` and `command`") == "check `--python`, `setup` and `-c`"


def test_list_without_any_config_says_where_one_goes_and_exits_0(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["list"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"No config file yet, so no remote kernels (looked at {tmp_path / 'remote-kernels.toml'}")
    assert "remote-kernel install -t" in out
    assert "then `remote-kernel sync`" in out
    assert err == ""


def test_list_json_without_any_config_is_an_empty_list_with_the_next_steps(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["list", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert (document["command"], document["config"], document["kernels"]) == ("list", None, [])
    assert len(document["looked_at"]) == 2


def test_list_with_a_missing_file_named_by_the_environment_is_still_an_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("REMOTE_KERNEL_CONFIG", str(tmp_path / "gone.toml"))
    assert cli.main(["list"]) == 2
    assert "named by $REMOTE_KERNEL_CONFIG does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["ps", "gc"])
def test_ps_and_gc_with_a_mistyped_host_exit_2_and_suggest_the_close_one(
        good: Path, capsys: pytest.CaptureFixture[str], command: str) -> None:
    assert cli.main([command, "--host", "lba", "--config", str(good)]) == 2
    err = capsys.readouterr().err
    assert "no host 'lba' in the config; did you mean 'lab'?" in err
    assert "Traceback" not in err

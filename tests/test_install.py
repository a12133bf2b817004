"""v1.1 `install -t`: append an entry to the config file (never rewriting a byte) and sync it."""

from __future__ import annotations

import json
import os
import stat
import tomllib
from pathlib import Path

import pytest

from remote_kernel import cli
from remote_kernel.config import load_config
from remote_kernel.install import derive_name, kernel_command
from remote_kernel.tomlappend import TableNotFoundError, joined, remove_table

COMMENTED = """\
# Team kernels -- keep this comment!
[defaults]
python = "python3"   # trailing comment
setup = [
    "module load cuda",  # inside an array
]

[hosts.lab]
hostname = "lab.example.org"
user = "alice"
# a dangling comment at the end, no newline after it"""


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def kernels_dir() -> Path:
    return Path(os.environ["JUPYTER_DATA_DIR"]) / "kernels"


@pytest.fixture
def commented(tmp_path: Path) -> Path:
    path = tmp_path / "remote-kernels.toml"
    path.write_bytes(COMMENTED.encode())
    return path


def test_install_on_a_commented_toml_keeps_every_byte_and_adds_a_valid_entry(
        commented: Path, kernels_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    original = commented.read_bytes()
    inode = commented.stat().st_ino
    code, out, err = run_cli(capsys, "install", "-t", "bob@gpu.example.org:2222", "-c",
                             "python -m spyder_kernels.console", "--config", str(commented))
    assert code == 0, err
    after = commented.read_bytes()
    assert after.startswith(original)
    assert commented.stat().st_ino == inode  # appended in place, not replaced
    entry = load_config(commented).entry("bob-gpu.example.org-2222")
    assert entry.host.label == "bob@gpu.example.org:2222"
    assert entry.command == ("{python}", "-m", "spyder_kernels.console")
    assert entry.python == "python3"  # [defaults] still applies
    spec = json.loads((kernels_dir / "bob-gpu.example.org-2222" / "kernel.json").read_text())
    assert spec["metadata"]["remote_kernel"]["config"] == str(commented)
    assert "1 created" in out


def test_install_with_key_and_jumps_writes_a_hosts_table(
        commented: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "install", "-t", "carol@hpc.example.org", "-i", "keys/id",
                           "-J", "lab", "-J", "bastion", "-n", "hpc", "-d", "HPC",
                           "--python", "/opt/py/bin/python", "--config", str(commented))
    assert code == 0, err
    data = tomllib.loads(commented.read_text())
    assert data["hosts"]["hpc"] == {
        "hostname": "hpc.example.org", "user": "carol",
        "identity_file": str(tmp_path / "keys" / "id"), "proxy_jump": ["lab", "bastion"],
    }
    assert data["hosts"]["bastion"] == {}  # a bare ~/.ssh/config alias gets an empty table
    assert data["kernels"]["hpc"] == {"host": "hpc", "display_name": "HPC",
                                      "python": "/opt/py/bin/python"}
    entry = load_config(commented).entry("hpc")
    assert [hop.name for hop in entry.host.proxy_jump] == ["lab", "bastion"]


def test_install_with_no_config_creates_the_user_file(
        tmp_path: Path, kernels_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    user_file = Path(os.environ["XDG_CONFIG_HOME"]) / "remote-kernel" / "remote-kernels.toml"
    assert not user_file.exists()
    code, _, err = run_cli(capsys, "install", "-t", "alice@lab")
    assert code == 0, err
    assert stat.S_IMODE(user_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(user_file.parent.stat().st_mode) == 0o700
    assert load_config(user_file).entry("alice-lab").host.label == "alice@lab"
    assert (kernels_dir / "alice-lab" / "kernel.json").exists()
    # The next install appends to that same file.
    assert run_cli(capsys, "install", "-t", "bob@lab")[0] == 0
    assert set(load_config(user_file).entries()) == {"alice-lab", "bob-lab"}


def test_install_of_an_existing_name_fails_without_force_and_changes_nothing(
        commented: Path, kernels_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(capsys, "install", "-t", "alice@lab", "-n", "mine",
                   "--config", str(commented))[0] == 0
    before = commented.read_bytes()
    code, _, err = run_cli(capsys, "install", "-t", "bob@lab", "-n", "mine",
                           "--config", str(commented))
    assert code == 2
    assert "already exists" in err
    assert "--force" in err
    assert commented.read_bytes() == before


def test_install_force_replaces_exactly_that_table(
        commented: Path, kernels_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(capsys, "install", "-t", "alice@lab", "-n", "mine",
                   "--config", str(commented))[0] == 0
    with commented.open("a") as handle:
        handle.write("\n# about the next one\n[kernels.other]\nhost = \"lab\"\n")
    code, out, err = run_cli(capsys, "install", "-t", "bob@gpu", "-n", "mine", "--force",
                             "--config", str(commented))
    assert code == 0, err
    text = commented.read_text()
    assert text.startswith(COMMENTED)
    assert "# about the next one\n[kernels.other]" in text
    assert load_config(commented).entry("mine").host.label == "bob@gpu"
    assert text.count("[kernels.mine]") == 1
    spec = json.loads((kernels_dir / "mine" / "kernel.json").read_text())
    assert spec["metadata"]["remote_kernel"]["entry"]["host"]["user"] == "bob"
    assert "1 updated" in out


def test_install_force_refuses_an_entry_it_cannot_cut_out_exactly(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "remote-kernels.toml"
    path.write_text('kernels.mine.host = "alice@lab"\n')
    code, _, err = run_cli(capsys, "install", "-t", "bob@lab", "-n", "mine", "--force",
                           "--config", str(path))
    assert code == 2
    assert "edit the file by hand" in err
    assert path.read_text() == 'kernels.mine.host = "alice@lab"\n'


def test_install_refuses_before_writing_when_a_foreign_spec_is_in_the_way(
        commented: Path, kernels_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (kernels_dir / "mine").mkdir(parents=True)
    (kernels_dir / "mine" / "kernel.json").write_text('{"argv": ["x"], "display_name": "x"}')
    code, _, err = run_cli(capsys, "install", "-t", "alice@lab", "-n", "mine",
                           "--config", str(commented))
    assert code == 1
    assert str(kernels_dir / "mine") in err
    assert commented.read_bytes() == COMMENTED.encode()


def test_install_on_an_invalid_config_reports_its_problems_and_writes_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "remote-kernels.toml"
    path.write_text('[kernels.bad]\nhost = "nowhere"\n')
    code, _, err = run_cli(capsys, "install", "-t", "alice@lab", "--config", str(path))
    assert code == 2
    assert "kernels.bad.host" in err
    assert path.read_text() == '[kernels.bad]\nhost = "nowhere"\n'


def test_install_json_prints_one_document(
        commented: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "install", "--json", "-t", "alice@lab", "--config",
                           str(commented))
    assert code == 0
    document = json.loads(out)
    assert document["command"] == "install"
    assert document["name"] == "alice-lab"
    assert document["config"] == str(commented)
    assert [a["action"] for a in document["plan"]["actions"]] == ["create"]


@pytest.mark.parametrize(("target", "name"), [
    ("alice@lab.example.org", "alice-lab.example.org"),
    ("lab", "lab"),
    ("Bob@Lab:2222", "bob-lab-2222"),
    ("alice@[::1]:22", "alice-1-22"),
    ("alice+x@lab", "alice-x-lab"),
    ("al_ice@lab.example.org", "al_ice-lab.example.org"),
])
def test_a_name_is_derived_from_the_target_by_the_kernel_name_rule(target: str, name: str) -> None:
    assert derive_name(target) == name


@pytest.mark.parametrize(("command", "words"), [
    ("python -m spyder_kernels.console", ["{python}", "-m", "spyder_kernels.console"]),
    ("python3.11 -m ipykernel_launcher", ["{python}", "-m", "ipykernel_launcher"]),
    ("/opt/py/bin/python -m x", ["/opt/py/bin/python", "-m", "x"]),
    ("ipython kernel --foo='a b'", ["ipython", "kernel", "--foo=a b"]),
])
def test_the_kernel_command_becomes_a_list_with_python_as_a_placeholder(
        command: str, words: list[str]) -> None:
    assert kernel_command(command) == words


# --- tomlappend ------------------------------------------------------------------------------------


def test_joined_keeps_the_original_as_an_exact_prefix() -> None:
    for original in ("", "a = 1", "a = 1\n", "a = 1\n\n", "# c\r\n"):
        assert joined(original, "[t]\n").startswith(original)
        tomllib.loads(joined(original, "[t]\n") if "c" not in original else "[t]\n")


def test_remove_table_cuts_the_table_and_its_subtables_but_keeps_the_next_comment() -> None:
    text = (
        '[kernels.a]\nhost = "x"\n\n[kernels.mine]\nhost = "y"\nsetup = """\n[not.a.header]\n"""\n'
        '[kernels.mine.env]\nA = "1"\n\n# describes b\n[kernels.b]\nhost = "z"\n'
    )
    result = remove_table(text, ("kernels", "mine"))
    assert result == '[kernels.a]\nhost = "x"\n\n# describes b\n[kernels.b]\nhost = "z"\n'


def test_remove_table_refuses_when_the_table_is_also_defined_elsewhere() -> None:
    text = '[kernels.mine]\nhost = "x"\n[other]\nk = 1\n[kernels.mine.env]\nA = "1"\n'
    with pytest.raises(TableNotFoundError):
        remove_table(text, ("kernels", "mine"))

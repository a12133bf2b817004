"""Every shipped example config validates, and each shows what it claims to show."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from remote_kernel import cli
from remote_kernel.config import load_config

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.toml"))


def test_the_promised_examples_exist() -> None:
    names = {path.name for path in EXAMPLES}
    assert {"minimal.toml", "lab-server.toml", "hpc-bastion.toml", "conda.toml", "spyder.toml",
            "ci-provision.toml", "forward.toml", "long-lived.toml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda path: path.name)
def test_every_example_passes_validate(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["validate", "--config", str(path)]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.startswith(f"{path}: OK")


def test_the_minimal_example_is_small_one_host_one_kernel() -> None:
    loaded = load_config(ROOT / "examples" / "minimal.toml")
    assert (len(loaded.entries()), len(loaded.host_entries())) == (1, 1)


def test_the_readme_set_up_command_in_the_source_tree_installs_no_kernel_and_says_what_next(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # Issue 12, item 9: it used to sync an example pointing at alice@lab.example.org into every
    # new user's Jupyter. The source tree must hold no config it would pick up.
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    first = next(line for line in readme.splitlines() if line.startswith("python3 -m venv"))
    assert first.endswith("&& .venv/bin/remote-kernel list"), first
    monkeypatch.chdir(ROOT)
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("No config file yet")
    assert "remote-kernel install -t" in out
    assert "examples/minimal.toml" in out
    kernels = Path(os.environ["JUPYTER_DATA_DIR"]) / "kernels"
    assert not kernels.exists() or not any(kernels.iterdir())


def test_the_hpc_example_jumps_through_a_bastion_and_loads_modules() -> None:
    entry = next(iter(load_config(ROOT / "examples" / "hpc-bastion.toml").entries().values()))
    assert [hop.name for hop in entry.host.proxy_jump] == ["bastion-hpc"]
    assert any(line.startswith("module load") for line in entry.setup)


def test_the_spyder_example_runs_spyder_kernels() -> None:
    entry = next(iter(load_config(ROOT / "examples" / "spyder.toml").entries().values()))
    assert entry.command == ("{python}", "-m", "spyder_kernels.console")


def test_the_ci_example_shows_how_to_check_for_drift() -> None:
    text = (ROOT / "examples" / "ci-provision.toml").read_text(encoding="utf-8")
    assert "remote-kernel sync" in text
    assert "--check" in text
    assert "--prefix" in text

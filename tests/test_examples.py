"""Every shipped example config validates, and each shows what it claims to show."""

from __future__ import annotations

from pathlib import Path

import pytest

from remote_kernel import cli
from remote_kernel.config import load_config

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.toml"))
ALL_CONFIGS = [ROOT / "remote-kernels.toml", *EXAMPLES]


def test_the_promised_examples_exist() -> None:
    names = {path.name for path in EXAMPLES}
    assert {"lab-server.toml", "hpc-bastion.toml", "conda.toml", "spyder.toml",
            "ci-provision.toml"} <= names


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda path: path.name)
def test_every_example_passes_validate(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["validate", "--config", str(path)]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.startswith(f"{path}: OK")


def test_the_root_example_is_small_one_host_one_kernel() -> None:
    loaded = load_config(ROOT / "remote-kernels.toml")
    assert (len(loaded.entries()), len(loaded.host_entries())) == (1, 1)


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

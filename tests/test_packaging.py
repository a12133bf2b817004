"""What a regular (non-editable) install ships: the wheel carries the kernelspec logos, and specs
written by the installed copy have them (issue 12, item 9: `pip install .` gave specs without
logos, because they were taken from ipykernel, which the local side does not install)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parent.parent
LOGOS = ("logo-32x32.png", "logo-64x64.png", "logo-svg.svg")
CONFIG = """
[kernels.packaged]
host = "alice@lab.example.org"
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from a copy of the source (a build in the shared tree would leave build/ there)."""
    root = tmp_path_factory.mktemp("packaging")
    source = root / "src"
    shutil.copytree(ROOT / "remote_kernel", source / "remote_kernel",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--disable-pip-version-check",
         "--wheel-dir", str(root / "dist"), str(source)],
        capture_output=True, text=True, timeout=240, check=False,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (found,) = (root / "dist").glob("remote_kernel-*.whl")
    return found


def test_the_wheel_carries_the_logos_and_the_typing_marker(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"remote_kernel/resources/{logo}" for logo in LOGOS} <= names
    assert "remote_kernel/py.typed" in names


def test_sync_from_an_installed_wheel_writes_specs_with_logos(
        wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--disable-pip-version-check",
         "--target", str(site), str(wheel)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr
    config = tmp_path / "remote-kernels.toml"
    config.write_text(CONFIG, encoding="utf-8")
    # PYTHONPATH puts the installed copy before the editable one of the test venv (whose finder
    # is last on sys.meta_path); cwd is tmp_path so `-m` does not find the source tree first.
    code = ("import sys, remote_kernel, remote_kernel.cli as c; print(remote_kernel.__file__); "
            f"sys.exit(c.main(['sync', '--config', {str(config)!r}]))")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60, check=False, env={**os.environ, "PYTHONPATH": str(site)})
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[0].startswith(str(site)), done.stdout
    spec_dir = Path(os.environ["JUPYTER_DATA_DIR"]) / "kernels" / "packaged"
    assert sorted(path.name for path in spec_dir.iterdir()) == ["kernel.json", *LOGOS]

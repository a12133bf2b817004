"""Shared fixtures: an isolated environment for every test, private sshd servers, remote Pythons.

No test may read or write the real HOME, ~/.ssh, ssh-agent or Jupyter directories: the autouse
``isolated_env`` moves all of them under the test's tmp_path. The "remote" side is a real OpenSSH
sshd on 127.0.0.1 (tests/sshd.py) whose logins get their own HOME too.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/sshd.py is a helper module, not a package

from slurm import SlurmCluster, require_slurm
from sshd import SSHD_BIN, SSHServer, sshd_available

_UNSET = (
    "JUPYTER_PATH",
    "JUPYTER_PREFER_ENV_PATH",
    "JUPYTER_PLATFORM_DIRS",
    "JUPYTER_ALLOW_INSECURE_WRITES",
    "SSH_AUTH_SOCK",
    "SSH_AGENT_PID",
    "SSH_ASKPASS",
)


@dataclass(frozen=True)
class IsolatedEnv:
    """Where this test's HOME and Jupyter/XDG directories are."""

    root: Path
    home: Path
    ssh_dir: Path
    jupyter_data: Path
    jupyter_runtime: Path
    jupyter_config: Path
    xdg_config: Path
    xdg_data: Path
    xdg_runtime: Path


@pytest.fixture(autouse=True)
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> IsolatedEnv:
    env = IsolatedEnv(
        root=tmp_path,
        home=tmp_path / "home",
        ssh_dir=tmp_path / "home" / ".ssh",
        jupyter_data=tmp_path / "jupyter" / "data",
        jupyter_runtime=tmp_path / "jupyter" / "runtime",
        jupyter_config=tmp_path / "jupyter" / "config",
        xdg_config=tmp_path / "xdg" / "config",
        xdg_data=tmp_path / "xdg" / "data",
        xdg_runtime=tmp_path / "xdg" / "runtime",
    )
    for path in (
        env.home,
        env.jupyter_data,
        env.jupyter_runtime,
        env.jupyter_config,
        env.xdg_config,
        env.xdg_data,
    ):
        path.mkdir(parents=True, exist_ok=True)
    env.ssh_dir.mkdir(mode=0o700)
    env.xdg_runtime.mkdir(mode=0o700, parents=True)
    settings = {
        "HOME": env.home,
        "JUPYTER_DATA_DIR": env.jupyter_data,
        "JUPYTER_RUNTIME_DIR": env.jupyter_runtime,
        "JUPYTER_CONFIG_DIR": env.jupyter_config,
        "IPYTHONDIR": env.home / ".ipython",
        "XDG_CONFIG_HOME": env.xdg_config,
        "XDG_DATA_HOME": env.xdg_data,
        "XDG_STATE_HOME": env.home / ".local" / "state",
        "XDG_RUNTIME_DIR": env.xdg_runtime,
    }
    for name, value in settings.items():
        monkeypatch.setenv(name, str(value))
    for name in [*_UNSET, *(n for n in os.environ if n.startswith("REMOTE_KERNEL_"))]:
        monkeypatch.delenv(name, raising=False)
    # Launches serve in-process unless the run asks for the per-user service (RK_TEST_SERVICE=on
    # runs the launch tests through it); tests of the service turn it on themselves.
    monkeypatch.setenv("REMOTE_KERNEL_SERVICE", _TEST_SERVICE)
    monkeypatch.chdir(tmp_path)
    return env


_TEST_SERVICE = "on" if os.environ.get("RK_TEST_SERVICE", "").lower() in ("1", "on", "yes") else "off"


@pytest.fixture(autouse=True)
def _stop_test_service(isolated_env: IsolatedEnv) -> Iterator[None]:
    """A per-user service started by a test (in its private XDG_RUNTIME_DIR) ends with the test."""
    yield
    from remote_kernel.service import testing

    testing.stop_service(isolated_env.xdg_runtime / "remote-kernel")


@pytest.fixture(autouse=True)
def restored_logging() -> Iterator[None]:
    """Commands run in-process (cli.main) set log levels, handlers and propagation for the rest of
    their process (doctor quiets loggers, ps silences paramiko, setup_logging replaces the root's
    handlers): put every logger back as it was, so no test's logging depends on an earlier one."""
    loggers = [logging.getLogger(), *(item for item in logging.root.manager.loggerDict.values()
                                       if isinstance(item, logging.Logger))]
    saved = {logger.name: (logger.level, logger.propagate, logger.disabled, list(logger.handlers))
             for logger in loggers}
    yield
    for item in [logging.getLogger(), *logging.root.manager.loggerDict.values()]:
        if isinstance(item, logging.Logger):
            # A logger first made during the test goes back to a fresh logger's state.
            level, propagate, disabled, handlers = saved.get(item.name, (logging.NOTSET, True, False, []))
            item.setLevel(level)
            item.propagate, item.disabled, item.handlers = propagate, disabled, handlers


def _require_sshd() -> None:
    if sshd_available():
        return
    message = f"{SSHD_BIN} not found (apt-get install -y openssh-server)"
    if os.environ.get("CI"):
        pytest.fail(message + "; CI is set, so the sshd tests must run", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SSHServer]:
    """One private sshd for the whole session (start it once: ~40 ms, but keys take longer)."""
    _require_sshd()
    server = SSHServer(tmp_path_factory.mktemp("sshd"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


SSHDFactory = Callable[..., SSHServer]


@pytest.fixture
def sshd_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SSHDFactory]:
    """``sshd_factory(extra_config="AllowTcpForwarding no")`` -> another started server."""
    _require_sshd()
    servers: list[SSHServer] = []

    def make(*, extra_config: str = "", isolated_home: bool = True) -> SSHServer:
        server = SSHServer(
            tmp_path_factory.mktemp("sshd-extra"),
            extra_config=extra_config,
            isolated_home=isolated_home,
        )
        servers.append(server)
        return server.start()

    try:
        yield make
    finally:
        for server in servers:
            server.stop()


def _has_ipykernel(python: Path) -> bool:
    probe = subprocess.run(
        [str(python), "-c", "import ipykernel"], capture_output=True, timeout=60, check=False
    )
    return probe.returncode == 0


@pytest.fixture(scope="session")
def remote_python() -> Path:
    """A Python with ipykernel, for the "remote" side (the venv's own interpreter, not resolved:
    resolving the symlink would leave the venv)."""
    python = Path(sys.executable).absolute()
    if not _has_ipykernel(python):
        pytest.fail(f"{python} cannot import ipykernel: pip install -e '.[test]'", pytrace=False)
    return python


@pytest.fixture(scope="session")
def python_without_ipykernel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bare venv's python: the remote launch must fail naming the missing ipykernel."""
    venv = tmp_path_factory.mktemp("bare-venv")
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    python = venv / "bin" / "python"
    assert not _has_ipykernel(python), f"{python} unexpectedly has ipykernel"
    return python


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """One single-node Slurm cluster (tests/slurm.py) for the whole session, whichever modules use
    it (defined here, not imported into each module: an imported session fixture is one per module),
    stopped by PID at its end."""
    require_slurm()
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        cluster.stop()
        pytest.fail(f"cannot start the test Slurm cluster: {exc}", pytrace=False)
    try:
        yield cluster
    finally:
        cluster.cancel_ours()
        cluster.stop()


@pytest.fixture
def slurm(slurm_cluster: SlurmCluster) -> Iterator[SlurmCluster]:
    """The session's cluster with no job of ours left over from another test."""
    slurm_cluster.cancel_ours()
    yield slurm_cluster
    slurm_cluster.cancel_ours()

"""Hostile config values (issue 7, item 4): data reaches the remote exactly as written, and runs nothing.

Every value goes through a real TOML file, ``load_config`` and a real launch over the sshd fixture.
``env`` values, ``cwd``, ``python``, ``kernel_args``/``command`` words and local key paths are
*data*: spaces, quotes, ``$()``, backticks, ``;``, ``|``, globs, newlines and non-ASCII must arrive
verbatim, and a ``$(touch ...)`` in them must never create the file. ``setup`` lines are shell *by
design* (``module load``, ``source venv/bin/activate``): the tests pin down that, too.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.blocking.client import BlockingKernelClient
from launch_helpers import (
    LauncherProcess,
    execute,
    host_table,
    kernel_table,
    launch_cli,
    wait_until,
    write_config,
)
from sshd import SSHServer
from test_security import ready_client

from remote_kernel.config import load_config

pytestmark = pytest.mark.timeout(180)

NAME = "hostile"

# What the kernel reports about itself (names of the env vars to read come in as JSON).
FACTS_CODE = """
import json as _j, os as _o, sys as _s
print(_j.dumps({"env": {_n: _o.environ.get(_n) for _n in _j.loads(%r)}, "cwd": _o.getcwd(),
                "executable": _s.executable, "argv": _s.argv[1:]}))
"""


@pytest.fixture
def pwned() -> Iterator[Path]:
    """A file that exists only if some value was run by a shell."""
    path = Path(f"/tmp/rk-pwned-{secrets.token_hex(4)}")
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def remote_home(sshd: SSHServer) -> Path:
    """The remote login's $HOME (what a leading ``~/`` means there)."""
    assert sshd.remote_home is not None
    return sshd.remote_home


@contextlib.contextmanager
def launched(tmp_path: Path, config: Path) -> Iterator[tuple[LauncherProcess, BlockingKernelClient]]:
    """`remote-kernel --config CONFIG start hostile -f FILE` and a ready client."""
    connection_file = tmp_path / f"kernel-{secrets.token_hex(3)}.json"
    launcher = launch_cli(["--config", str(config), "-v", "start", NAME, "-f", str(connection_file)],
                          stderr_path=tmp_path / f"launcher-{secrets.token_hex(3)}.log")
    try:
        wait_until(lambda: connection_file.exists() or launcher.proc.poll() is not None, timeout=30)
        assert connection_file.exists(), f"the launcher exited {launcher.proc.poll()}:\n{launcher.stderr}"
        client = ready_client(connection_file, launcher)
        try:
            yield launcher, client
        finally:
            client.stop_channels()
    finally:
        launcher.stop()


def kernel_facts(client: BlockingKernelClient, env_names: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    execution = execute(client, FACTS_CODE % json.dumps(list(env_names)))
    assert execution.status == "ok", execution
    facts: dict[str, Any] = json.loads(execution.stdout.strip().splitlines()[-1])
    return facts


def config_with(tmp_path: Path, sshd: SSHServer, python: Path | str, *, host: dict[str, Any] | None = None,
                **kernel_fields: Any) -> Path:
    """A real TOML file (tomli_w escapes every character correctly) with one kernel ``hostile``."""
    return write_config(tmp_path / "remote-kernels.toml", hosts={"h": host or host_table(sshd)},
                        kernels={NAME: kernel_table("h", python, **kernel_fields)})


def nested_dir(root: Path, *names: str) -> Path:
    """``root/names...`` created; a name holding "/" (e.g. "$(touch /tmp/x)") simply nests deeper."""
    path = root.joinpath(*names)
    path.mkdir(parents=True)
    return path


# ------------------------------------------------------------------------------------ env


def test_the_issue_example_env_value_reaches_the_kernel_literally_and_creates_no_file(
    tmp_path: Path, sshd: SSHServer, remote_python: Path, pwned: Path
) -> None:
    config = tmp_path / "remote-kernels.toml"
    config.write_text(
        f'[hosts.h]\nhostname = "{sshd.host}"\nport = {sshd.port}\nuser = "{sshd.user}"\n'
        f'identity_file = "{sshd.client_key}"\nknown_hosts = "{sshd.known_hosts}"\n\n'
        f'[kernels.{NAME}]\nhost = "h"\npython = "{remote_python}"\n'
        f'env = {{ X = "$(touch {pwned})" }}\n',
        encoding="utf-8",
    )
    assert load_config(config).entry(NAME).env == {"X": f"$(touch {pwned})"}
    with launched(tmp_path, config) as (_, client):
        assert kernel_facts(client, ["X"])["env"] == {"X": f"$(touch {pwned})"}
    assert not pwned.exists()


def hostile_env(pwned: Path) -> dict[str, str]:
    return {
        "SUBSTITUTION": f"$(touch {pwned})",
        "BACKTICKS": f"`touch {pwned}`",
        "SEMICOLON": f"x; touch {pwned}; y",
        "PIPE_AND_BACKGROUND": f"| touch {pwned} & && || >{pwned}",
        "QUOTES": "it's \"double\" and 'single' and \\'escaped\\'",
        "DOLLARS": "$HOME ${PATH} $$ $0 $1 $@ $(( 1 + 1 ))",
        "NEWLINES": f"line one\nline two\ntouch {pwned}\n",
        "TABS_AND_CR": "a\tb\rc",
        "BACKSLASHES": "C:\\new\\table \\\\ \\n",
        "GLOB": "* ? [a-z] ~ ~/x",
        "NON_ASCII": "héllo wörld 日本語 🚀 \u00a0nbsp",
        "PLACEHOLDERS": "{python} {connection_file} %s %(x)s {0}",
        "LEADING_DASH": "-rf --help",
        "EMPTY": "",
        "JSON_LIKE": '{"key": "value", "n": [1, 2]}',
        "name with spaces": "the name has spaces",
        "NÄME_ÜNICODE": "non-ASCII name",
        "LONG": "x" * 100_000,
    }


def test_hostile_env_values_and_names_reach_the_kernel_verbatim_and_run_nothing(
    tmp_path: Path, sshd: SSHServer, remote_python: Path, pwned: Path
) -> None:
    env = hostile_env(pwned)
    config = config_with(tmp_path, sshd, remote_python, env=env)
    assert dict(load_config(config).entry(NAME).env) == env
    with launched(tmp_path, config) as (_, client):
        seen = kernel_facts(client, list(env))["env"]
    assert seen == env
    assert not pwned.exists()


def test_env_from_defaults_and_the_kernel_merge_and_win_over_setup_exports(
    tmp_path: Path, sshd: SSHServer, remote_python: Path, pwned: Path
) -> None:
    """Order on the remote: setup lines (shell) first, then ``env`` applied on top, verbatim."""
    config = write_config(
        tmp_path / "remote-kernels.toml",
        defaults={"env": {"FROM_DEFAULTS": f"$(touch {pwned})", "OVERRIDDEN": "defaults"}},
        hosts={"h": host_table(sshd)},
        kernels={NAME: kernel_table("h", remote_python, env={"OVERRIDDEN": "kernel `x`"},
                                    setup=["export OVERRIDDEN=setup SETUP_ONLY=from-setup"])},
    )
    with launched(tmp_path, config) as (_, client):
        seen = kernel_facts(client, ["FROM_DEFAULTS", "OVERRIDDEN", "SETUP_ONLY"])["env"]
    assert seen == {"FROM_DEFAULTS": f"$(touch {pwned})", "OVERRIDDEN": "kernel `x`", "SETUP_ONLY": "from-setup"}
    assert not pwned.exists()


# ------------------------------------------------------------------------------------ cwd


def _absolute_everything(root: Path, home: Path, pwned: Path) -> tuple[str, Path]:
    path = nested_dir(root, "cwd", "dir with spaces", "it's \"quoted\"", f"$(touch {pwned})",
                      f"`touch {pwned}`; x | y &", "ünïcødé 日本 🚀", "*?[x] ~ $HOME {python}")
    return str(path), path


def _newline(root: Path, home: Path, pwned: Path) -> tuple[str, Path]:
    path = nested_dir(root, "cwd", f"new\nline\n$(touch {pwned})")
    return str(path), path


def _tilde_leading_dash(root: Path, home: Path, pwned: Path) -> tuple[str, Path]:
    name = f"-rk-{secrets.token_hex(3)} 'q' $(touch {pwned})"
    return f"~/{name}", nested_dir(home, name)


def _spaces_at_both_ends(root: Path, home: Path, pwned: Path) -> tuple[str, Path]:
    path = nested_dir(root, "cwd", "  two leading, one trailing ")
    return str(path), path


CWDS = {
    "absolute, every shell metacharacter": _absolute_everything,
    "a newline in the name": _newline,
    "~/ then a leading dash and $()": _tilde_leading_dash,
    "spaces at both ends": _spaces_at_both_ends,
}


@pytest.mark.parametrize("case", list(CWDS))
def test_a_hostile_cwd_is_entered_verbatim_and_runs_nothing(
    case: str, tmp_path: Path, sshd: SSHServer, remote_python: Path, pwned: Path
) -> None:
    home = remote_home(sshd)
    cwd, expected = CWDS[case](tmp_path, home, pwned)
    try:
        config = config_with(tmp_path, sshd, remote_python, cwd=cwd)
        assert load_config(config).entry(NAME).cwd == cwd
        with launched(tmp_path, config) as (_, client):
            assert kernel_facts(client)["cwd"] == str(expected)
    finally:
        if home in expected.parents:
            shutil.rmtree(home / expected.relative_to(home).parts[0], ignore_errors=True)
    assert not pwned.exists()


def test_a_missing_hostile_cwd_fails_naming_it_exactly_and_runs_nothing(
    tmp_path: Path, sshd: SSHServer, remote_python: Path, pwned: Path
) -> None:
    cwd = str(tmp_path / f"missing 'q' $(touch {pwned}) `x`\nnew line")
    config = config_with(tmp_path, sshd, remote_python, cwd=cwd)
    connection_file = tmp_path / "kernel.json"
    launcher = launch_cli(["--config", str(config), "start", NAME, "-f", str(connection_file)],
                          stderr_path=tmp_path / "launcher.log")
    try:
        code = launcher.wait(timeout=30)
    finally:
        launcher.stop()
    assert code == 1
    assert repr(cwd) in launcher.stderr and "does not exist" in launcher.stderr, launcher.stderr
    assert not pwned.exists()


# ------------------------------------------------------------------------------------ python path


def _venv_link(directory: Path, python: Path) -> Path:
    """``directory/venv`` -> the venv holding ``python`` (a venv is recognised by its pyvenv.cfg,
    which a symlink to the interpreter alone would lose)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "venv").symlink_to(python.parent.parent, target_is_directory=True)
    return directory / "venv" / "bin" / python.name


@pytest.mark.parametrize("where", ["absolute", "under ~/"])
def test_a_python_path_with_spaces_quotes_and_substitutions_is_run_verbatim(
    where: str, tmp_path: Path, sshd: SSHServer, remote_python: Path, pwned: Path
) -> None:
    home = remote_home(sshd)
    name = f"py dir 'q' \"dq\" $(touch {pwned}) ; `x` é"
    if where == "absolute":
        python = _venv_link(tmp_path.joinpath(name), remote_python)
        configured = str(python)
    else:
        top = f"rk py {secrets.token_hex(3)}"
        python = _venv_link(home.joinpath(top, name), remote_python)
        configured = "~/" + str(python.relative_to(home))
    try:
        config = config_with(tmp_path, sshd, configured)
        assert load_config(config).entry(NAME).python == configured
        with launched(tmp_path, config) as (_, client):
            assert kernel_facts(client)["executable"] == str(python)
    finally:
        if where != "absolute":
            shutil.rmtree(home / top, ignore_errors=True)
    assert not pwned.exists()


# ------------------------------------------------------------------------------------ argv words


def test_hostile_kernel_args_reach_the_kernel_argv_verbatim(
    tmp_path: Path, sshd: SSHServer, remote_python: Path, pwned: Path
) -> None:
    words = [f"$(touch {pwned})", f"`touch {pwned}`", "a b", "it's", '"dq"', f";touch {pwned}",
             "new\nline", "日本 🚀", "*", "~", "$HOME", "{python}x", ""]
    config = config_with(tmp_path, sshd, remote_python, kernel_args=words)
    assert list(load_config(config).entry(NAME).kernel_args) == words
    with launched(tmp_path, config) as (_, client):
        argv = kernel_facts(client)["argv"]
    assert argv[-len(words):] == words
    assert not pwned.exists()


def test_hostile_words_in_command_reach_the_kernel_argv_verbatim(
    tmp_path: Path, sshd: SSHServer, remote_python: Path, pwned: Path
) -> None:
    words = [f"$(touch {pwned})", "a b; c", "`id`", "ü"]
    command = ["{python}", "-m", "ipykernel_launcher", "-f", "{connection_file}", *words]
    config = config_with(tmp_path, sshd, remote_python, command=command)
    with launched(tmp_path, config) as (_, client):
        facts = kernel_facts(client)
    assert facts["argv"][-len(words):] == words
    assert facts["argv"][0] == "-f" and facts["argv"][1].endswith("/kernel.json")
    assert not pwned.exists()


# ------------------------------------------------------------------------------------ local paths


def test_key_and_known_hosts_paths_with_spaces_and_quotes_are_opened_as_written(
    tmp_path: Path, sshd: SSHServer, remote_python: Path, pwned: Path
) -> None:
    keys = nested_dir(tmp_path, f"keys 'q' \"dq\" $(touch {pwned}) `x` ; é")
    identity = keys / "id key"
    shutil.copy(sshd.client_key, identity)
    identity.chmod(0o600)
    known_hosts = keys / "known hosts"
    known_hosts.write_text(sshd.known_hosts_line())
    host = host_table(sshd, identity_file=str(identity), known_hosts=str(known_hosts))
    config = config_with(tmp_path, sshd, remote_python, host=host)
    with launched(tmp_path, config) as (_, client):
        assert execute(client, "print(1 + 1)").stdout.strip() == "2"
    assert not pwned.exists()


# ------------------------------------------------------------------------------------ setup (shell by design)


def test_setup_lines_are_shell_by_design_run_in_order_before_the_kernel(
    tmp_path: Path, sshd: SSHServer, remote_python: Path
) -> None:
    """README: ``setup`` lines are POSIX shell run by the remote login shell, in order, before the
    kernel starts (quote as in a terminal); everything else is data and is never run."""
    marker = tmp_path / "setup ran"
    setup = ["export A='x y'", 'export B="$A and more"', f"touch '{marker}'", "cd /",
             "export C=$(printf '%s' computed)"]
    config = config_with(tmp_path, sshd, remote_python, setup=setup, cwd=str(tmp_path))
    assert list(load_config(config).entry(NAME).setup) == setup
    with launched(tmp_path, config) as (_, client):
        facts = kernel_facts(client, ["A", "B", "C"])
    assert facts["env"] == {"A": "x y", "B": "x y and more", "C": "computed"}
    assert marker.exists()
    assert facts["cwd"] == "/", "setup runs after cd to cwd, so a setup `cd` wins"
    assert os.environ.get("A") is None

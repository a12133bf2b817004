"""The config model: inheritance, resolution, discovery, and errors that say where and what."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from pydantic import ValidationError

from remote_kernel.config import (
    default_user_config_path,
    discover_config_path,
    dotted_key,
    load_config,
)
from remote_kernel.entry import KERNEL_NAME_RULE, HostEntry, SlurmSettings
from remote_kernel.errors import ConfigError, ConfigProblem, UsageError


def write(directory: Path, text: str, name: str = "remote-kernels.toml") -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def problems_of(path: Path) -> list[ConfigProblem]:
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return caught.value.problems


def only_problem(path: Path) -> ConfigProblem:
    problems = problems_of(path)
    assert len(problems) == 1, problems
    return problems[0]


# --- resolution -----------------------------------------------------------------------------------


def test_a_kernel_inherits_every_default_it_does_not_set_itself(tmp_path: Path) -> None:
    path = write(tmp_path, """
        [defaults]
        python = "/opt/py/bin/python"
        startup_timeout = 120
        reconnect_grace = 30
        setup = ["module load python"]
        interrupt_mode = "message"

        [kernels.a]
        host = "alice@lab.example.org"

        [kernels.b]
        host = "alice@lab.example.org"
        python = "python3.12"
        startup_timeout = 5.5
        setup = []
        interrupt_mode = "signal"
    """)
    entries = load_config(path).entries()
    inherited, own = entries["a"], entries["b"]
    assert (inherited.python, inherited.startup_timeout, inherited.reconnect_grace) == (
        "/opt/py/bin/python", 120.0, 30.0)
    assert inherited.setup == ("module load python",)
    assert inherited.interrupt_mode == "message"
    assert (own.python, own.startup_timeout, own.setup, own.interrupt_mode) == (
        "python3.12", 5.5, (), "signal")


def test_env_tables_merge_and_the_kernel_keys_win(tmp_path: Path) -> None:
    path = write(tmp_path, """
        [defaults]
        env = { PYTHONUNBUFFERED = "1", OMP_NUM_THREADS = "1" }

        [kernels.k]
        host = "lab.example.org"
        env = { OMP_NUM_THREADS = "8", CUDA_VISIBLE_DEVICES = "0" }
    """)
    assert dict(load_config(path).entry("k").env) == {
        "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "8", "CUDA_VISIBLE_DEVICES": "0",
    }


def test_builtin_defaults_apply_when_neither_kernel_nor_defaults_set_a_field(
        tmp_path: Path) -> None:
    path = write(tmp_path, """
        [kernels.Plain-Kernel]
        host = "lab.example.org"
    """)
    entry = load_config(path).entry("plain-kernel")
    assert entry.name == "plain-kernel"  # Jupyter stores kernelspec names lower-case
    assert entry.display_name == "Plain-Kernel"
    assert (entry.python, entry.language, entry.interrupt_mode) == ("python3", "python", "signal")
    assert (entry.startup_timeout, entry.reconnect_grace) == (60.0, 300.0)
    assert (entry.command, entry.cwd, entry.setup, entry.kernel_args, dict(entry.env)) == (
        None, None, (), (), {})


def test_a_zero_reconnect_grace_is_kept_not_replaced_by_the_default(tmp_path: Path) -> None:
    path = write(tmp_path, """
        [defaults]
        reconnect_grace = 600
        [kernels.k]
        host = "h.example.org"
        reconnect_grace = 0
    """)
    assert load_config(path).entry("k").reconnect_grace == 0.0


def test_a_hosts_name_resolves_to_its_table_and_an_unset_hostname_means_ssh_config(
        tmp_path: Path) -> None:
    path = write(tmp_path, """
        [hosts.lab]
        user = "alice"
        port = 2222
        identity_file = "~/.ssh/id_ed25519"
        known_hosts = "~/.ssh/known_hosts_lab"
        host_key_policy = "accept-new"
        keepalive = 0

        [kernels.k]
        host = "lab"
        cwd = "~/project"
        command = ["{python}", "-m", "spyder_kernels.console"]
        kernel_args = ["--matplotlib=inline"]
    """)
    entry = load_config(path).entry("k")
    assert entry.host == HostEntry(
        name="lab", hostname=None, port=2222, user="alice", identity_file="~/.ssh/id_ed25519",
        known_hosts="~/.ssh/known_hosts_lab", host_key_policy="accept-new", keepalive=0.0,
    )
    # ~ is expanded where it is used (locally for keys, remotely for cwd), never here.
    assert entry.cwd == "~/project"
    assert entry.command == ("{python}", "-m", "spyder_kernels.console")
    assert entry.kernel_args == ("--matplotlib=inline",)


def test_proxy_jump_resolves_into_nested_host_entries(tmp_path: Path) -> None:
    path = write(tmp_path, """
        [hosts.outer]
        hostname = "outer.example.org"
        [hosts.inner]
        hostname = "inner.example.org"
        proxy_jump = ["outer"]
        [hosts.login]
        hostname = "login.example.org"
        proxy_jump = ["inner", "bob@relay.example.org:2022"]
        [kernels.k]
        host = "login"
    """)
    login = load_config(path).entry("k").host
    inner, relay = login.proxy_jump
    assert inner.name == "inner"
    assert [hop.name for hop in inner.proxy_jump] == ["outer"]
    assert (relay.hostname, relay.user, relay.port, relay.proxy_jump) == (
        "relay.example.org", "bob", 2022, ())


@pytest.mark.parametrize(("target", "hostname", "user", "port"), [
    ("alice@lab.example.org:2222", "lab.example.org", "alice", 2222),
    ("lab.example.org", "lab.example.org", None, None),
    ("alice@[::1]:2222", "::1", "alice", 2222),
    ("[2001:db8::7]", "2001:db8::7", None, None),
    ("10.0.0.5:22", "10.0.0.5", None, 22),
])
def test_an_ad_hoc_target_needs_no_hosts_table(
        tmp_path: Path, target: str, hostname: str, user: str | None, port: int | None) -> None:
    path = write(tmp_path, f"""
        [kernels.k]
        host = "{target}"
    """)
    host = load_config(path).entry("k").host
    assert (host.name, host.hostname, host.user, host.port) == (target, hostname, user, port)


def test_a_hosts_name_wins_over_reading_it_as_a_target(tmp_path: Path) -> None:
    path = write(tmp_path, """
        [hosts."lab.example.org"]
        port = 2200
        [kernels.k]
        host = "lab.example.org"
    """)
    assert load_config(path).entry("k").host.port == 2200


def test_entries_keep_file_order_and_hosts_are_listed(tmp_path: Path) -> None:
    path = write(tmp_path, """
        [hosts.b]
        [hosts.a]
        [kernels.zeta]
        host = "a"
        [kernels.alpha]
        host = "b"
        [kernels.mid]
        host = "a"
    """)
    loaded = load_config(path)
    assert list(loaded.entries()) == ["zeta", "alpha", "mid"]
    assert list(loaded.host_entries()) == ["b", "a"]
    assert loaded.path == path.resolve()


def test_asking_for_an_unknown_kernel_lists_the_known_ones(tmp_path: Path) -> None:
    path = write(tmp_path, """
        [kernels.one]
        host = "h.example.org"
        [kernels.two]
        host = "h.example.org"
    """)
    with pytest.raises(UsageError, match=r"no kernel named 'three'.*known kernels: one, two"):
        load_config(path).entry("three")


def test_an_empty_file_is_a_valid_config_without_kernels(tmp_path: Path) -> None:
    loaded = load_config(write(tmp_path, ""))
    assert loaded.entries() == {}
    assert loaded.host_entries() == {}


def test_the_model_is_frozen(tmp_path: Path) -> None:
    loaded = load_config(write(tmp_path, '[kernels.k]\nhost = "h.example.org"\n'))
    with pytest.raises(ValidationError):
        loaded.model.kernels["k"].host = "elsewhere"


# --- problems: each names its line and dotted key -----------------------------------------------

ERROR_CASES = [
    pytest.param("""
        [kernels.k]
        host = "h.example.org"
        pyhton = "python3"
    """, 3, "kernels.k.pyhton",
        ['unknown key "pyhton"', 'did you mean "python"', "expected one of:"],
        id="unknown-kernel-key"),
    pytest.param("""
        [defaults]
        python = "python3"
        [kernal.k]
        host = "h"
    """, 3, "kernal", ['unknown key "kernal"', "defaults, hosts, kernels"], id="unknown-section"),
    pytest.param("""
        [hosts.lab]
        hostname = "lab.example.org"
        port = 70000
    """, 3, "hosts.lab.port", ["expected an integer from 1 to 65535", "found integer 70000"],
        id="port-out-of-range"),
    pytest.param("""
        [hosts.lab]
        port = "22"
    """, 2, "hosts.lab.port", ['found string "22"'], id="port-as-string"),
    pytest.param("""
        [hosts.lab]
        port = 0
    """, 2, "hosts.lab.port", ["found integer 0"], id="port-zero"),
    pytest.param("""
        [defaults]
        startup_timeout = true
    """, 2, "defaults.startup_timeout", ["greater than 0", "found boolean true"],
        id="bool-as-number"),
    pytest.param("""
        [defaults]
        startup_timeout = -1.5
    """, 2, "defaults.startup_timeout", ["found float -1.5"], id="negative-timeout"),
    pytest.param("""
        [hosts.lab]
        host_key_policy = "auto-add"
    """, 2, "hosts.lab.host_key_policy",
        ['one of "strict", "accept-new"', 'found string "auto-add"'],
        id="host-key-policy"),
    pytest.param("""
        [kernels.k]
        host = "h.example.org"
        interrupt_mode = "kill"
    """, 3, "kernels.k.interrupt_mode", ['one of "message", "signal"'], id="interrupt-mode"),
    pytest.param("""
        [hosts.lab]
        [kernels.k]
        host = "lba"
    """, 3, "kernels.k.host", ['undefined host "lba"', "known: lab", "[hosts.lba]"],
        id="undefined-host"),
    pytest.param("""
        [hosts.login]
        proxy_jump = [
            "bastoin",
        ]
    """, 3, "hosts.login.proxy_jump[0]", ['undefined host "bastoin"'], id="undefined-jump-host"),
    pytest.param("""
        [hosts.a]
        proxy_jump = ["b"]
        [hosts.b]
        proxy_jump = ["a"]
    """, 2, "hosts.a.proxy_jump", ["proxy_jump cycle: a -> b -> a"], id="proxy-jump-cycle"),
    pytest.param("""
        [hosts.a]
        proxy_jump = ["a"]
    """, 2, "hosts.a.proxy_jump", ["proxy_jump cycle: a -> a"], id="proxy-jump-self"),
    pytest.param("""
        [kernels."my kernel"]
        host = "h.example.org"
    """, 1, 'kernels."my kernel"', ['invalid kernel name "my kernel"', KERNEL_NAME_RULE],
        id="kernel-name"),
    pytest.param("""
        [kernels.Lab]
        host = "h.example.org"
        [kernels.lab]
        host = "h.example.org"
    """, 3, "kernels.lab", ['clashes with "Lab"', "lower-case"], id="kernel-name-case-clash"),
    pytest.param("""
        [kernels.k]
        display_name = "K"
    """, 1, "kernels.k.host", ["missing required key", "[hosts] name or an ad-hoc target"],
        id="missing-host"),
    pytest.param("""
        [kernels.k]
        host = "h.example.org"
        env = { A = "1", B = 2 }
    """, 3, "kernels.k.env.B", ["table of string values", "found integer 2"], id="env-value"),
    pytest.param("""
        [kernels.k]
        host = "h.example.org"
        setup = [
            "module load x",
            ["nested"],
        ]
    """, 5, "kernels.k.setup[1]", ['found array ["nested"]'], id="setup-item"),
    pytest.param("""
        [kernels.k]
        host = "alice@lab:99999"
    """, 2, "kernels.k.host", ["invalid target", "between 1 and 65535"], id="target-port"),
    pytest.param("""
        [defaults]
        host = "lab"
    """, 2, "defaults.host", ["cannot be inherited"], id="host-in-defaults"),
    pytest.param("""
        [kernels.k]
        host = "h.example.org"
        command = []
    """, 3, "kernels.k.command", ["non-empty array of strings"], id="empty-command"),
    pytest.param("""
        hosts = 3
    """, 1, "hosts", ["table of [hosts.NAME] tables", "found integer 3"], id="hosts-not-a-table"),
    pytest.param("""
        [kernels]
        k = "h.example.org"
    """, 2, "kernels.k", ["a table [kernels.k]", 'found string "h.example.org"'],
        id="kernel-not-a-table"),
    pytest.param("""
        kernels.k.host = "h.example.org"
        kernels.k.startup_timeout = "slow"
    """, 2, "kernels.k.startup_timeout", ['found string "slow"'], id="dotted-keys"),
    pytest.param("""
        [hosts."lab.example.org"]
        keepalive = -1
    """, 2, 'hosts."lab.example.org".keepalive', ["0 or more"], id="quoted-table-name"),
    pytest.param('''
        [kernels.k]
        host = "h.example.org"
        display_name = """
        port = 1
        [hosts.x]
        """
        pyton = "x"
    ''', 7, "kernels.k.pyton", ['unknown key "pyton"'], id="multi-line-string-is-not-a-key"),
]


@pytest.mark.parametrize(("text", "line", "key", "fragments"), ERROR_CASES)
def test_every_problem_names_its_line_dotted_key_and_what_was_expected(
        tmp_path: Path, text: str, line: int, key: str, fragments: list[str]) -> None:
    path = write(tmp_path, text)
    problem = only_problem(path)
    assert (problem.path, problem.line, problem.key) == (str(path.resolve()), line, key), problem
    for fragment in fragments:
        assert fragment in problem.message, problem


def test_all_problems_are_reported_at_once_in_line_order(tmp_path: Path) -> None:
    path = write(tmp_path, """
        [hosts.lab]
        hostname = "lab.example.org"
        port = 70000

        [kernels.k1]
        host = "nosuch"
        colour = "blue"
    """)
    problems = problems_of(path)
    assert [(p.line, p.key) for p in problems] == [
        (3, "hosts.lab.port"), (6, "kernels.k1.host"), (7, "kernels.k1.colour"),
    ]
    text = str(ConfigError(problems))
    assert text.startswith("3 problems in config:")
    assert f"{path.resolve()}:3: hosts.lab.port: expected an integer" in text


def test_a_toml_syntax_error_shows_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, """
        [kernels.k]
        host = "h.example.org"
        python = python3
    """)
    problem = only_problem(path)
    assert (problem.line, problem.column) == (3, 10)
    assert problem.message.startswith("TOML syntax error: ")
    assert str(problem).startswith(f"{path.resolve()}:3:10: TOML syntax error")


def test_a_file_that_is_not_utf8_is_a_config_error_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[kernels.k]\nhost = "h\xe9.example.org"\n')
    problem = only_problem(path)
    assert problem.line == 2
    assert "not valid UTF-8" in problem.message


def test_a_missing_or_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    assert "cannot read" in only_problem(tmp_path / "absent.toml").message
    assert "cannot read" in only_problem(tmp_path).message  # a directory


def test_dotted_keys_quote_what_toml_would_quote() -> None:
    assert dotted_key(("kernels", "lab-py3.11", "setup", 2)) == 'kernels."lab-py3.11".setup[2]'
    assert dotted_key(("hosts", "my host", "port")) == 'hosts."my host".port'


# --- discovery ------------------------------------------------------------------------------------


@pytest.fixture
def places(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """A config in each place discovery looks, and a clean environment to choose between them."""
    work, xdg = tmp_path / "work", tmp_path / "xdg-config"
    (xdg / "remote-kernel").mkdir(parents=True)
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(xdg))
    monkeypatch.delenv("REMOTE_KERNEL_CONFIG", raising=False)
    return {
        "explicit": write(tmp_path, "", "explicit.toml"),
        "env": write(tmp_path, "", "from-env.toml"),
        "cwd": write(work, ""),
        "xdg": write(xdg / "remote-kernel", ""),
    }


def test_discovery_prefers_explicit_then_env_then_cwd_then_xdg(
        places: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REMOTE_KERNEL_CONFIG", str(places["env"]))
    assert discover_config_path(places["explicit"]) == places["explicit"].resolve()
    assert discover_config_path(None) == places["env"].resolve()
    monkeypatch.delenv("REMOTE_KERNEL_CONFIG")
    assert discover_config_path(None) == places["cwd"].resolve()
    places["cwd"].unlink()
    assert discover_config_path(None) == places["xdg"].resolve()
    assert default_user_config_path() == places["xdg"]


def test_an_explicit_path_that_does_not_exist_is_an_error_naming_it(
        places: dict[str, Path]) -> None:
    missing = places["explicit"].with_name("typo.toml")
    with pytest.raises(ConfigError, match=r"typo\.toml: config file given with --config does not"):
        discover_config_path(str(missing))


def test_an_env_path_that_does_not_exist_is_an_error_not_a_silent_fallback(
        places: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REMOTE_KERNEL_CONFIG", str(places["env"].with_name("gone.toml")))
    with pytest.raises(ConfigError, match=r"gone\.toml: config file named by \$REMOTE_KERNEL_"):
        discover_config_path(None)


def test_no_config_anywhere_names_every_place_looked_and_how_to_create_one(
        places: dict[str, Path]) -> None:
    places["cwd"].unlink()
    places["xdg"].unlink()
    with pytest.raises(ConfigError) as caught:
        discover_config_path(None)
    text = str(caught.value)
    for place in ("--config", "$REMOTE_KERNEL_CONFIG", str(places["cwd"]), str(places["xdg"])):
        assert place in text
    assert "remote-kernel install" in text
    assert "examples/" in text


def test_a_relative_xdg_config_home_is_ignored_as_the_spec_says(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", "relative/dir")
    monkeypatch.setenv("HOME", str(tmp_path))
    expected = tmp_path / ".config" / "remote-kernel" / "remote-kernels.toml"
    assert default_user_config_path() == expected


@pytest.mark.parametrize("depth", [50, 400, 5000])
def test_absurdly_deep_nesting_is_a_config_error_not_a_recursion_error(
        tmp_path: Path, depth: int) -> None:
    path = tmp_path / "deep.toml"
    path.write_text('[kernels.k]\nhost = "h.example.org"\nsetup = ' + "[" * depth + "]" * depth)
    assert problems_of(path)


# --- durations, sizes and the round-two keys -------------------------------------------------------


@pytest.mark.parametrize(("written", "seconds"), [
    ("45", 45.0), ("2.5", 2.5), ('"90s"', 90.0), ('"15m"', 900.0), ('"12h"', 43200.0), ('"3d"', 259200.0),
    ('"1.5h"', 5400.0), ('"30"', 30.0),
])
def test_durations_are_seconds_or_strings_with_a_unit(tmp_path: Path, written: str, seconds: float) -> None:
    path = write(tmp_path, f"""
        [kernels.k]
        host = "alice@lab"
        startup_timeout = {written}
        reconnect_grace = {written}
        """)
    entry = load_config(path).entry("k")
    assert (entry.startup_timeout, entry.reconnect_grace) == (seconds, seconds)


@pytest.mark.parametrize("written", ['"soon"', '"10 minutes"', '"-5s"', "true", '""'])
def test_a_bad_duration_names_the_key_and_the_accepted_forms(tmp_path: Path, written: str) -> None:
    path = write(tmp_path, f"""
        [defaults]
        startup_timeout = {written}
        """)
    problem = only_problem(path)
    assert (problem.key, problem.line) == ("defaults.startup_timeout", 2)
    assert '"15m"' in problem.message and "seconds" in problem.message


def test_runtime_dir_and_output_backlog_are_inherited_and_reach_the_entry(tmp_path: Path) -> None:
    path = write(tmp_path, """
        [defaults]
        runtime_dir = "$XDG_RUNTIME_DIR"
        output_backlog = "8MiB"

        [kernels.inherits]
        host = "alice@lab"

        [kernels.own]
        host = "alice@lab"
        runtime_dir = "/scratch/alice"
        output_backlog = 1000000
        """)
    entries = load_config(path).entries()
    assert (entries["inherits"].runtime_dir, entries["inherits"].output_backlog) == ("$XDG_RUNTIME_DIR", 8 << 20)
    assert (entries["own"].runtime_dir, entries["own"].output_backlog) == ("/scratch/alice", 1_000_000)


def test_unset_runtime_dir_and_output_backlog_take_the_builtin_defaults(tmp_path: Path) -> None:
    entry = load_config(write(tmp_path, '[kernels.k]\nhost = "alice@lab"\n')).entry("k")
    assert (entry.runtime_dir, entry.output_backlog) == (None, 64 << 20)
    assert type(entry).from_dict(entry.to_dict()) == entry


@pytest.mark.parametrize("written", ['"lots"', "0", '"0MiB"', "-1"])
def test_a_bad_output_backlog_names_the_key(tmp_path: Path, written: str) -> None:
    problem = only_problem(write(tmp_path, f'[kernels.k]\nhost = "alice@lab"\noutput_backlog = {written}\n'))
    assert problem.key == "kernels.k.output_backlog" and "MiB" in problem.message


@pytest.mark.parametrize(("written", "expected"),
                         [(None, "argv"), ('"argv"', "argv"), ('"provisioner"', "provisioner")])
def test_launcher_picks_argv_or_the_provisioner_and_defaults_to_argv(
    tmp_path: Path, written: str | None, expected: str
) -> None:
    line = f"launcher = {written}\n" if written else ""
    entry = load_config(write(tmp_path, f'[kernels.k]\nhost = "alice@lab"\n{line}')).entry("k")
    assert entry.launcher == expected


def test_an_unknown_launcher_lists_the_choices(tmp_path: Path) -> None:
    problem = only_problem(write(tmp_path, '[defaults]\nlauncher = "systemd"\n'))
    assert problem.key == "defaults.launcher" and '"argv", "provisioner"' in problem.message


# --- one schema: a kernel field is declared once on KernelSettings and once on KernelEntry ----------

# A value other than KernelEntry's default for every field [defaults] may set, as TOML and as resolved.
SAMPLE_SETTINGS: dict[str, tuple[str, object]] = {
    "python": ('"/opt/py/bin/python"', "/opt/py/bin/python"),
    "setup": ('["module load x"]', ("module load x",)),
    "env": ('{ A = "1" }', {"A": "1"}),
    "cwd": ('"~/project"', "~/project"),
    "command": ('["{python}", "-m", "spyder_kernels.console"]', ("{python}", "-m", "spyder_kernels.console")),
    "kernel_args": ('["--debug"]', ("--debug",)),
    "language": ('"julia"', "julia"),
    "interrupt_mode": ('"message"', "message"),
    "startup_timeout": ('"2m"', 120.0),
    "reconnect_grace": ("0", 0.0),
    "runtime_dir": ('"/scratch/alice"', "/scratch/alice"),
    "output_backlog": ('"8MiB"', 8 << 20),
    "detached_lease": ('"12h"', 43200.0),
    "spare_kernel": ("false", False),
    "launcher": ('"provisioner"', "provisioner"),
    "slurm": ('{ time = "1:00:00" }', SlurmSettings(time="1:00:00")),
    "forward": ('[8787, "6006:16006"]', ("8787", "6006:16006")),
}


def test_every_kernel_setting_is_an_entry_field_and_every_entry_field_is_a_setting() -> None:
    import dataclasses

    from remote_kernel.config import KernelSettings
    from remote_kernel.entry import KernelEntry

    entry_fields = {field.name for field in dataclasses.fields(KernelEntry)}
    assert set(KernelSettings.model_fields) == entry_fields - {"name", "host", "display_name"}
    assert set(SAMPLE_SETTINGS) == set(KernelSettings.model_fields)  # a new field needs a sample here


@pytest.mark.parametrize("field", sorted(SAMPLE_SETTINGS))
def test_each_setting_comes_from_the_kernel_else_the_defaults_else_the_entry_default(
        tmp_path: Path, field: str) -> None:
    from remote_kernel.entry import KernelEntry

    toml, resolved = SAMPLE_SETTINGS[field]
    path = write(tmp_path, f"""
        [defaults]
        {field} = {toml}
        [kernels.inherits]
        host = "alice@lab"
    """)
    entries = load_config(path).entries()
    builtin = getattr(KernelEntry(name="k", host=HostEntry(name="h"), display_name="k"), field)
    assert resolved != builtin
    assert getattr(entries["inherits"], field) == resolved
    no_defaults = write(tmp_path, '[kernels.plain]\nhost = "alice@lab"\n', name="plain.toml")
    assert getattr(load_config(no_defaults).entry("plain"), field) == builtin
    own = write(tmp_path, f'[kernels.own]\nhost = "alice@lab"\n{field} = {toml}\n', name="own.toml")
    assert getattr(load_config(own).entry("own"), field) == resolved

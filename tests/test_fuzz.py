"""Hostile input: generated TOML and argv reach only our own errors, never a traceback."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from remote_kernel import cli
from remote_kernel.config import HostTable, KernelTable, LoadedConfig, load_config
from remote_kernel.errors import ConfigError

# The autouse isolation fixture is function-scoped on purpose: every example of one test shares the
# same private HOME and tmp dir, and each example overwrites the one file it uses.
FUZZ = settings(max_examples=200, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

NAMES = ["lab", "bastion", "a", "b", "Lab", "my kernel", "x.y", "", "alice@lab:22", "[::1]:2222",
         "bob@[fe80::1%eth0]", "h:70000", "@", "[", "lab-py3.11"]
REFS = st.sampled_from(NAMES)
SCALARS = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1), st.floats(), st.booleans(),
    st.text(max_size=20), REFS, st.datetimes(), st.dates(), st.times(),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def tables(fields: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    """Tables whose keys are mostly real field names, with values of any TOML type."""
    keys = st.sampled_from(fields) | st.text(max_size=10)
    values = st.one_of(REFS, st.lists(REFS, max_size=4), VALUES)
    return st.dictionaries(keys, values, max_size=8)


KERNEL = tables(list(KernelTable.model_fields))
HOST = tables(list(HostTable.model_fields))
DOCUMENTS = st.fixed_dictionaries({}, optional={
    "defaults": KERNEL | VALUES,
    "hosts": st.dictionaries(REFS | st.text(max_size=8), HOST | VALUES, max_size=4) | VALUES,
    "kernels": st.dictionaries(REFS | st.text(max_size=8), KERNEL | VALUES, max_size=4) | VALUES,
    "extra": VALUES,
})

# Documents built from each field's valid domain, with some junk: these get past validation often,
# so resolution (defaults, proxy_jump chains, targets) is fuzzed too.
HOST_NAMES = st.sampled_from(["lab", "bastion", "login", "relay"])
TARGETS = st.sampled_from(["alice@lab.example.org", "10.0.0.1:2222", "bob@[::1]:22", "[fe80::1]"])
STRINGS = st.text(min_size=1, max_size=12)
WORDS = st.text(st.characters(blacklist_categories=["Z", "Cc", "Cs"]), min_size=1, max_size=12)
SECONDS = st.integers(0, 10**6) | st.floats(0, 1e6)
PLAUSIBLE_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "python": STRINGS, "setup": st.lists(STRINGS, max_size=3), "cwd": STRINGS,
    "env": st.dictionaries(st.from_regex(r"[A-Z_]{1,6}", fullmatch=True), STRINGS, max_size=3),
    "command": st.lists(STRINGS, min_size=1, max_size=3),
    "kernel_args": st.lists(STRINGS, max_size=3),
    "language": STRINGS, "interrupt_mode": st.sampled_from(["message", "signal"] * 4 + ["kill"]),
    "startup_timeout": SECONDS, "reconnect_grace": SECONDS, "display_name": STRINGS,
    "host": HOST_NAMES | TARGETS, "hostname": WORDS, "port": st.integers(0, 70000),
    "user": WORDS, "identity_file": STRINGS, "known_hosts": STRINGS,
    "proxy_jump": st.lists(HOST_NAMES | TARGETS, max_size=3),
    "host_key_policy": st.sampled_from(["strict", "accept-new"] * 4 + ["yes"]),
    "keepalive": SECONDS,
    "runtime_dir": STRINGS, "launcher": st.sampled_from(["argv", "provisioner"] * 4 + ["systemd"]),
    "output_backlog": st.integers(-1, 1 << 40) | st.sampled_from(["64MiB", "1G", "lots", "0"]),
}


def plausible(fields: list[str], required: tuple[str, ...] = ()) -> st.SearchStrategy[Any]:
    return st.fixed_dictionaries(
        {field: PLAUSIBLE_FIELDS.get(field, STRINGS) for field in required},
        # A field without its own strategy still gets plausible junk: the file must only ever fail
        # with config errors, whatever a new key holds.
        optional={field: PLAUSIBLE_FIELDS.get(field, STRINGS) for field in fields if field not in required},
    )


PLAUSIBLE_DOCUMENTS = st.fixed_dictionaries({}, optional={
    "defaults": plausible([f for f in KernelTable.model_fields if f not in ("host", "display_name")]),
    "hosts": st.dictionaries(HOST_NAMES, plausible(list(HostTable.model_fields)), max_size=4),
    "kernels": st.dictionaries(st.from_regex(r"[A-Za-z0-9._-]{1,8}", fullmatch=True),
                               plausible(list(KernelTable.model_fields), ("host",)), max_size=4),
})


def load_or_error(path: Path) -> LoadedConfig | ConfigError:
    try:
        return load_config(path)
    except ConfigError as exc:
        return exc


def assert_only_config_errors(path: Path, content: bytes) -> None:
    path.write_bytes(content)
    loaded = load_or_error(path)
    if isinstance(loaded, ConfigError):
        assert loaded.problems
        line_count = content.count(b"\n") + 1
        for problem in loaded.problems:
            assert problem.line is None or 1 <= problem.line <= line_count, problem
            assert str(problem)
        return
    for entry in loaded.entries().values():
        assert entry.fingerprint()
    assert isinstance(loaded.host_entries(), dict)


@FUZZ
@given(document=DOCUMENTS)
def test_generated_toml_documents_raise_only_config_errors(tmp_path: Path, document: dict[str, Any],
                                                           ) -> None:
    assert_only_config_errors(tmp_path / "doc.toml", tomli_w.dumps(document).encode())


@FUZZ
@given(document=PLAUSIBLE_DOCUMENTS)
def test_plausible_documents_load_or_raise_only_config_errors(
        tmp_path: Path, document: dict[str, Any]) -> None:
    assert_only_config_errors(tmp_path / "plausible.toml", tomli_w.dumps(document).encode())


@FUZZ
@given(document=DOCUMENTS, junk=st.text(max_size=12), where=st.floats(0, 1))
def test_toml_with_text_spliced_in_raises_only_config_errors(
        tmp_path: Path, document: dict[str, Any], junk: str, where: float) -> None:
    text = tomli_w.dumps(document)
    cut = int(len(text) * where)
    assert_only_config_errors(tmp_path / "spliced.toml", (text[:cut] + junk + text[cut:]).encode())


@FUZZ
@given(text=st.text(alphabet=st.sampled_from('[]{}.="\'#\n abc:@,123-_\\tu'), max_size=80))
def test_random_toml_like_text_raises_only_config_errors(tmp_path: Path, text: str) -> None:
    assert_only_config_errors(tmp_path / "text.toml", text.encode())


@FUZZ
@given(content=st.binary(max_size=60))
def test_random_bytes_raise_only_config_errors(tmp_path: Path, content: bytes) -> None:
    assert_only_config_errors(tmp_path / "bytes.toml", content)


# --- argv -----------------------------------------------------------------------------------------

# Only commands that touch nothing outside the config file: no network, no kernelspec writes.
SAFE_WORDS = ["validate", "list", "--config", "--config=", "-v", "-vvv", "-q", "--json", "--help",
              "-h", "--version", "--", "-", "--conf", "--js", "nosuch.toml", "/", ""]
_UNSAFE = {*cli.COMMANDS, cli.ADHOC_COMMAND} - {"validate", "list"}


def is_safe(token: str) -> bool:
    # -t / --target (and -tHOST, --target=HOST) select the v1.1 ad-hoc launch, which connects.
    return token not in _UNSAFE and not token.startswith(("-t", "--t"))


ARGV = st.lists(
    st.sampled_from(SAFE_WORDS) | st.text(max_size=10).filter(is_safe), max_size=6)

GOOD = '[hosts.lab]\nhostname = "lab.example.org"\n[kernels.k]\nhost = "lab"\n'


@pytest.fixture
def good_config(tmp_path: Path) -> Path:
    path = tmp_path / "good.toml"
    path.write_text(GOOD, encoding="utf-8")
    return path


@FUZZ
@given(argv=ARGV)
def test_parse_args_returns_a_namespace_or_a_usage_exit(good_config: Path, argv: list[str]) -> None:
    try:
        parsed: object = cli.parse_args(["--config", str(good_config), *argv])
    except cli._UsageExit as exc:  # help, version and usage errors: main() turns them into codes
        parsed = exc.status
    assert isinstance(parsed, argparse.Namespace | int)


@FUZZ
@given(argv=ARGV, config_last=st.booleans())
def test_main_with_random_argv_always_returns_an_exit_code(
        good_config: Path, capsys: pytest.CaptureFixture[str], argv: list[str],
        config_last: bool) -> None:
    config = ["--config", str(good_config)]
    code = cli.main([*argv, *config] if config_last else [*config, *argv])
    out, err = capsys.readouterr()
    assert code in (0, 2), (argv, out, err)
    assert "Traceback" not in err

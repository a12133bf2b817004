"""paramiko's private and undocumented names are used in one module, remote_kernel/ssh/_paramiko.py,
and the installed paramiko is one that module works with: an upgrade that renames one of them
fails here, not in a user's launch. Source checks read the code with ``ast``; the version and name
checks ask the installed paramiko. (CI runs the SSH tests on the lowest pinned paramiko too.)"""

from __future__ import annotations

import ast
import sys
import tomllib
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import paramiko
import pytest
from packaging.requirements import Requirement
from packaging.version import Version

import remote_kernel
from remote_kernel.ssh import _paramiko

PACKAGE = Path(remote_kernel.__file__).parent
SSH_PACKAGE = PACKAGE / "ssh"
SEAM = SSH_PACKAGE / "_paramiko.py"
PYPROJECT = PACKAGE.parent / "pyproject.toml"
RELIED_ON = (_paramiko.CHANNEL_NAMES + _paramiko.TRANSPORT_NAMES + _paramiko.BUFFER_NAMES
             + _paramiko.COMMON_NAMES + _paramiko.PACKAGE_NAMES + _paramiko.CONFIG_NAMES)


@cache
def _trees() -> dict[Path, ast.Module]:
    return {path: ast.parse(path.read_text(), str(path)) for path in sorted(PACKAGE.rglob("*.py"))}


def _outside_the_seam() -> Iterator[tuple[Path, ast.Module]]:
    return ((path, tree) for path, tree in _trees().items() if path != SEAM)


def _where(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(PACKAGE.parent)}:{getattr(node, 'lineno', 0)}"


def _is_paramiko(module: str) -> bool:
    return module == "paramiko" or module.startswith("paramiko.")


def _imported_modules(tree: ast.Module) -> Iterator[tuple[ast.AST, str, list[str]]]:
    """(node, module, names imported from it) for every import, and every import_module("...")."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node, alias.name, []
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node, node.module, [alias.name for alias in node.names]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute | ast.Name)
              and getattr(node.func, "attr", getattr(node.func, "id", "")) in ("import_module", "__import__")
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            yield node, node.args[0].value, []


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


@cache
def _names_remote_kernel_defines() -> frozenset[str]:
    """Every name our own code binds outside the seam: functions, classes, variables, attributes,
    arguments (the seam binds paramiko's: ``channel.in_buffer = tap``)."""
    names: set[str] = set()
    for _, tree in _outside_the_seam():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
    return frozenset(names)


def _stdlib_aliases(tree: ast.Module) -> set[str]:
    """Local names bound to standard-library modules (``os._exit`` is the stdlib's, not paramiko's)."""
    return {alias.asname or alias.name.partition(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
            for alias in node.names if alias.name.partition(".")[0] in sys.stdlib_module_names}


def _attribute_uses(tree: ast.Module) -> Iterator[tuple[ast.AST, str, ast.expr]]:
    """(node, name, owner) for ``owner.name`` and ``getattr/hasattr/setattr(owner, "name")``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            yield node, node.attr, node.value
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "hasattr", "setattr", "delattr") and len(node.args) >= 2
              and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)):
            yield node, node.args[1].value, node.args[0]


def test_only_the_ssh_package_imports_paramiko() -> None:
    found = [f"{_where(path, node)}: {module}" for path, tree in _trees().items() if SSH_PACKAGE not in path.parents
             for node, module, _ in _imported_modules(tree) if _is_paramiko(module)]
    assert found == [], "paramiko is imported outside remote_kernel/ssh/ (use remote_kernel.ssh's API)"


def test_no_module_but_the_seam_imports_a_private_name_of_paramiko() -> None:
    found = [f"{_where(path, node)}: {module} {names}" for path, tree in _outside_the_seam()
             for node, module, names in _imported_modules(tree)
             if _is_paramiko(module) and (any(map(_private, module.split("."))) or any(map(_private, names)))]
    assert found == [], "paramiko's private names belong in remote_kernel/ssh/_paramiko.py"


def test_no_module_but_the_seam_uses_an_underscore_name_it_does_not_define_itself() -> None:
    """paramiko objects cannot be told apart statically, so: an ``x._name`` outside the seam is one
    of our own names (or a standard-library module's, like ``os._exit``)."""
    ours = _names_remote_kernel_defines()
    found = []
    for path, tree in _outside_the_seam():
        stdlib = _stdlib_aliases(tree)
        for node, name, owner in _attribute_uses(tree):
            from_stdlib = isinstance(owner, ast.Name) and owner.id in stdlib
            if _private(name) and name not in ours and not from_stdlib:
                found.append(f"{_where(path, node)}: .{name}")
    assert found == [], "a private name that is not ours: move its use into remote_kernel/ssh/_paramiko.py"


def test_no_module_but_the_seam_uses_the_undocumented_names_it_lists() -> None:
    """Public-looking names of paramiko objects (``in_buffer``, ``remote_chanid``...) are checked
    by name, except those our own classes define too (``closed``: ExecChannel's property)."""
    watched = {name for name in RELIED_ON if not _private(name)} - _names_remote_kernel_defines()
    assert "in_buffer" in watched and "remote_chanid" in watched  # the check is not empty
    found = [f"{_where(path, node)}: .{name}" for path, tree in _outside_the_seam()
             for node, name, _ in _attribute_uses(tree) if name in watched]
    assert found == [], "paramiko's undocumented names belong in remote_kernel/ssh/_paramiko.py"


def test_the_seam_says_why_it_needs_each_name_it_relies_on() -> None:
    doc = _paramiko.__doc__ or ""
    assert [name for name in RELIED_ON if f"{name}" not in doc] == []


def _pinned_paramiko() -> Requirement:
    dependencies = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    return next(Requirement(text) for text in dependencies if Requirement(text).name == "paramiko")


def test_paramiko_is_pinned_with_a_lower_and_an_upper_bound() -> None:
    operators = {spec.operator for spec in _pinned_paramiko().specifier}
    assert ">=" in operators and "<" in operators, f"pyproject.toml: {_pinned_paramiko()}"


def test_the_installed_paramiko_is_inside_the_pinned_range() -> None:
    pinned = _pinned_paramiko()
    assert pinned.specifier.contains(Version(paramiko.__version__)), (
        f"paramiko {paramiko.__version__} is installed, pyproject.toml pins {pinned}: remote_kernel/ssh/_paramiko.py"
        " uses private names that are only checked inside that range")


def test_every_private_name_the_seam_relies_on_exists_in_the_installed_paramiko() -> None:
    assert _paramiko.missing_names() == [], f"paramiko {paramiko.__version__} lacks them"


def test_a_private_name_gone_from_paramiko_is_named_by_the_check(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(paramiko.Transport, "_send_user_message")
    monkeypatch.delattr(paramiko.common, "cMSG_CHANNEL_WINDOW_ADJUST")
    assert _paramiko.missing_names() == ["paramiko.Transport._send_user_message",
                                         "paramiko.common.cMSG_CHANNEL_WINDOW_ADJUST"]


def test_no_ssh_module_asks_the_terminal_itself_every_question_goes_to_a_prompter() -> None:
    """Passphrases and keyboard-interactive answers come from the injected Prompter (the terminal
    is one, in remote_kernel/service/prompts.py), never from the ssh package reading the TTY."""
    found = []
    for path, tree in _trees().items():
        if SSH_PACKAGE not in path.parents:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in ("isatty", "getpass", "ttyname"):
                found.append(f"{_where(path, node)}: .{node.attr}")
            elif isinstance(node, ast.Name) and node.id == "input":
                found.append(f"{_where(path, node)}: input")
            elif isinstance(node, ast.Constant) and node.value in ("/dev/tty", "CONIN$"):
                found.append(f"{_where(path, node)}: {node.value}")
    assert found == []

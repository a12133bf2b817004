"""v1.1 ``install -t TARGET``: turn target options into a new config entry, appended as text.

The user's file is never re-serialised: the new tables are rendered with tomli-w and appended
(comments and layout stay byte for byte). ``--force`` replaces an existing entry by cutting out
exactly that entry's ``[kernels.NAME]`` table text, proven exact by re-parsing (tomlappend); when
the entry is written any other way (dotted keys, inline table) it refuses and asks for a hand edit.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from remote_kernel import config
from remote_kernel.entry import KERNEL_NAME_RULE, is_valid_kernel_name, kernel_command, parse_target
from remote_kernel.errors import ConfigError, ConfigProblem, UsageError
from remote_kernel.tomlappend import TableNotFoundError, joined, remove_table, render_tables

log = logging.getLogger(__name__)

NEW_FILE_HEADER = (
    "# remote-kernel configuration. `remote-kernel sync` turns each [kernels.NAME] table into\n"
    "# a Jupyter kernelspec; see the README's config reference.\n"
    "# Created by `remote-kernel install`.\n"
)

HostTables = dict[str, dict[str, Any]]


@dataclass(frozen=True)
class InstallOptions:
    """The v1.1 command line: ``-t``, ``-J``..., ``-i``, ``-c``, ``--python``, ``-n``, ``-d``."""

    target: str
    jumps: tuple[str, ...] = ()
    identity: str | None = None
    kernel_command: str | None = None
    python: str | None = None
    name: str | None = None
    display_name: str | None = None
    force: bool = False


@dataclass(frozen=True)
class PreparedInstall:
    """The new file text, validated, not yet written. ``original`` None: the file is new."""

    path: Path
    original: str | None
    text: str
    name: str
    loaded: config.LoadedConfig
    replaced: bool = False
    new_hosts: tuple[str, ...] = field(default=())


def prepare_install(options: InstallOptions, explicit_config: str | None) -> PreparedInstall:
    """Find (or plan to create) the config file and build its new text; validate the result."""
    path, original = locate_config(explicit_config)
    before = config.parse_config(original, path) if original is not None else None
    name = entry_name(options)
    base, replaced = _base_text(original, before, name, path, force=options.force)
    hosts = {key: table.model_dump(exclude_none=True) for key, table in
             (before.model.hosts.items() if before else ())}
    new_hosts, host_ref = host_tables(options, name, hosts)
    addition = render_tables({"hosts": new_hosts, "kernels": {name: _kernel_table(options, host_ref)}})
    text = joined(base, addition)
    # Validate the whole file as it will be: an append must never leave the user a broken config.
    loaded = config.parse_config(text, path)
    return PreparedInstall(path=path, original=original, text=text, name=name, loaded=loaded,
                           replaced=replaced, new_hosts=tuple(new_hosts))


def locate_config(explicit: str | None) -> tuple[Path, str | None]:
    """The config path and its text (None: it does not exist yet and will be created).

    An explicit --config or $REMOTE_KERNEL_CONFIG naming a missing file means: create it there.
    Otherwise the discovery order applies and, when it finds nothing, the user file is created.
    """
    named = explicit or os.environ.get(config.CONFIG_ENV_VAR) or None
    if named is not None and not Path(named).expanduser().exists():
        path = Path(named).expanduser().absolute()
    else:
        try:
            path = config.discover_config_path(explicit)
        except ConfigError:
            path = config.default_user_config_path().absolute()
    path = path.resolve()
    if not path.exists():
        return path, None
    try:
        return path, path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        message = f"cannot read the config file: {exc}"
        raise ConfigError([ConfigProblem(path=str(path), key="", message=message)]) from exc


def _base_text(
    original: str | None, before: config.LoadedConfig | None, name: str, path: Path, *, force: bool,
) -> tuple[str, bool]:
    """The text to append to: the file as it is, or without the entry being replaced."""
    if original is None or before is None:
        return NEW_FILE_HEADER, False
    existing = next((key for key in before.model.kernels if key.lower() == name), None)
    if existing is None:
        return original, False
    if not force:
        raise UsageError(f"a kernel named {existing!r} already exists in {path}",
                         hint="choose another name with -n NAME, or pass --force to replace it")
    try:
        text = remove_table(original, ("kernels", existing))
    except TableNotFoundError as exc:
        raise UsageError(
            f"cannot replace [kernels.{existing}] in {path} automatically: {exc}",
            hint="edit the file by hand (remove or change that entry), then run `remote-kernel sync`",
        ) from exc
    return text, True


def _kernel_table(options: InstallOptions, host_ref: str) -> dict[str, Any]:
    table: dict[str, Any] = {
        "host": host_ref,
        "display_name": options.display_name or f"{options.target.strip()} (remote)",
    }
    if options.python:
        table["python"] = options.python
    if options.kernel_command:
        table["command"] = kernel_command(options.kernel_command)
    return table


# --- hosts ---------------------------------------------------------------------------------------


def host_tables(options: InstallOptions, name: str, hosts: HostTables) -> tuple[HostTables, str]:
    """New [hosts] tables to append, and what the kernel's ``host`` key should say.

    Without -i/-J the target is written as-is (``host = "alice@lab:2222"``). A bare word is an
    ~/.ssh/config alias, which the config reads as a [hosts] name: it gets an empty table.
    """
    new: HostTables = {}
    jumps = [_host_ref(jump.strip(), hosts, new) for jump in options.jumps]
    target_text = options.target.strip()
    if not options.identity and not jumps:
        return new, _host_ref(target_text, hosts, new)
    table = _host_table(options, jumps)
    if "hostname" not in table and hosts.get(target_text, table) != table:
        # The alias's own table name is taken by something else: name the host explicitly.
        table = {"hostname": target_text, **table}
    base = target_text if "hostname" not in table else name
    table_name = _unique_host_name(base, table, hosts)
    if hosts.get(table_name) != table:
        new[table_name] = table
    return new, table_name


def _host_table(options: InstallOptions, jumps: list[str]) -> dict[str, Any]:
    target = _parse_target(options.target)
    table: dict[str, Any] = {"user": target.user, "port": target.port}
    if config.looks_like_target(options.target.strip()) or target.user or target.port:
        table = {"hostname": target.host, **table}
    if options.identity:
        identity = options.identity
        # Relative to where the user typed it, not to wherever Jupyter later starts the kernel.
        table["identity_file"] = identity if identity.startswith("~") else os.path.abspath(identity)
    if jumps:
        table["proxy_jump"] = jumps
    return {key: value for key, value in table.items() if value is not None}


def _host_ref(ref: str, hosts: HostTables, new: HostTables) -> str:
    if not config.looks_like_target(ref) and ref not in hosts:
        new[ref] = {}
    return ref


def _unique_host_name(base: str, table: dict[str, Any], hosts: HostTables) -> str:
    """base, or base-2, base-3...: the first name that is free or already holds this very table."""
    candidate, number = base, 1
    while candidate in hosts and hosts[candidate] != table:
        number += 1
        candidate = f"{base}-{number}"
    return candidate


def _parse_target(text: str) -> Any:
    try:
        return parse_target(text)
    except ValueError as exc:
        raise UsageError(f"-t: {exc}") from exc


# --- names and commands --------------------------------------------------------------------------


def entry_name(options: InstallOptions) -> str:
    name = options.name if options.name else derive_name(options.target)
    if not is_valid_kernel_name(name):
        raise UsageError(f"invalid kernel name {name!r} (-n)", hint=KERNEL_NAME_RULE)
    return name.lower()


def derive_name(target: str) -> str:
    """``alice@lab.example.org:2222`` -> ``alice-lab.example.org-2222`` (the kernel-name rule)."""
    parsed = _parse_target(target)
    parts = [parsed.user, parsed.host, str(parsed.port) if parsed.port else None]
    text = "-".join(part for part in parts if part).lower()
    return re.sub(r"[^a-z0-9._]+", "-", text).strip("-.") or "remote"


# --- writing -------------------------------------------------------------------------------------


def write_config(prepared: PreparedInstall) -> None:
    """Append when the old text is a prefix (the normal case); replace atomically after --force."""
    path, original, text = prepared.path, prepared.original, prepared.text
    try:
        if original is None:
            _create_parents(path.parent)
            log.warning("creating the config file %s", path)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
        elif text.startswith(original):
            # Append mode: the user's bytes, inode, mode and symlinks stay exactly as they were.
            with path.open("a", encoding="utf-8") as handle:
                handle.write(text[len(original):])
        else:
            log.warning("--force: replacing the [kernels.%s] table in %s", prepared.name, path)
            _replace(path, text)
    except OSError as exc:
        message = f"cannot write the config file: {exc.strerror or exc}"
        raise ConfigError([ConfigProblem(path=str(path), key="", message=message)]) from exc


def _create_parents(directory: Path) -> None:
    """Create missing parents 0700: the config names hosts, users and key paths."""
    missing = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for item in reversed(missing):
        item.mkdir(mode=0o700)


def _replace(path: Path, text: str) -> None:
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        shutil.copymode(path, temp)
        os.replace(temp, path)
    except BaseException:
        os.unlink(temp)
        raise

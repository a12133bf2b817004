"""The ``remote-kernels.toml`` model: discovery, validation, and resolution into launchable entries.

Pure: reads one file, touches no network and no Jupyter directory. pydantic checks the shape and
types of every table; cross-references (undefined hosts, proxy_jump cycles, kernel names) are
checked on the raw TOML data so that *every* problem is reported in one go, even when the shape is
wrong elsewhere. Each problem carries the line of the offending key, found by a small scanner over
the TOML text (tomllib keeps no positions).
"""

from __future__ import annotations

import bisect
import contextlib
import difflib
import json
import os
import re
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from remote_kernel.entry import (
    HOST_KEY_POLICIES,
    INTERRUPT_MODES,
    KERNEL_NAME_RULE,
    LAUNCHERS,
    HostEntry,
    KernelEntry,
    is_valid_kernel_name,
    parse_byte_size,
    parse_duration,
    parse_target,
)
from remote_kernel.errors import ConfigError, ConfigProblem, UsageError
from remote_kernel.forward import format_forward, parse_forward

CONFIG_FILENAME = "remote-kernels.toml"
CONFIG_ENV_VAR = "REMOTE_KERNEL_CONFIG"

Loc = tuple[str | int, ...]


# --- the models ---------------------------------------------------------------------------------


def _one_of(choices: Sequence[str]) -> AfterValidator:
    def check(value: str) -> str:
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return value

    return AfterValidator(check)


def _duration(value: Any) -> Any:
    """``"90s"``, ``"15m"``, ``"12h"``, ``"3d"`` -> seconds; anything else is left to the type check."""
    return parse_duration(value) if isinstance(value, str) else value


def _byte_size(value: Any) -> Any:
    """``"64MiB"``, ``"512MB"`` -> bytes; anything else is left to the type check."""
    return parse_byte_size(value) if isinstance(value, str) else value


def _forward_item(value: Any) -> str:
    """``8787`` or ``"8787"`` -> ``"8787"``, ``"8888:9999"`` as written; ValueError for anything else."""
    return format_forward(*parse_forward(value))


_NonEmpty = Annotated[str, Field(min_length=1)]
_NoSpace = Annotated[str, Field(pattern=r"^\S+$")]
_EnvName = Annotated[str, Field(pattern=r"^[^=\x00]+$")]
_EnvValue = Annotated[str, Field(pattern=r"^[^\x00]*$")]
# A string with a unit is converted before the strict type check, so a bool is still refused.
_Seconds = Annotated[float, BeforeValidator(_duration), Field(gt=0)]
_SecondsOrZero = Annotated[float, BeforeValidator(_duration), Field(ge=0)]
_Bytes = Annotated[int, BeforeValidator(_byte_size), Field(gt=0)]
_Port = Annotated[int, Field(ge=1, le=65535)]
# A forward is stored as "REMOTE" or "REMOTE:LOCAL" (forward.parse_forward); a bad one is refused here.
_ForwardItem = Annotated[str, BeforeValidator(_forward_item)]
_HostKeyPolicy = Annotated[str, _one_of(HOST_KEY_POLICIES)]
_InterruptMode = Annotated[str, _one_of(INTERRUPT_MODES)]
_Launcher = Annotated[str, _one_of(LAUNCHERS)]

# strict: TOML already has types, so "22" is not silently a port and true is not 1.
_TABLE = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


def _described(description: str) -> Any:
    """An optional field whose description is the "expected ..." half of its error messages."""
    return Field(None, description=description)


# Slurm's --time forms: minutes, minutes:seconds, hours:minutes:seconds, days-hours,
# days-hours:minutes, days-hours:minutes:seconds; or UNLIMITED.
_SLURM_TIME = r"^(\d+(:\d{1,2}){0,2}|\d+-\d{1,2}(:\d{1,2}){0,2}|UNLIMITED|INFINITE)$"


class SlurmTable(BaseModel):
    """``[kernels.NAME.slurm]`` / ``[defaults.slurm]``: run the kernel in a Slurm job (sbatch options)."""

    model_config = _TABLE

    partition: _NoSpace | None = _described('a partition name without spaces (e.g. "gpu")')
    account: _NoSpace | None = _described('an account name without spaces (e.g. "proj42")')
    time: Annotated[str, Field(pattern=_SLURM_TIME)] | None = _described(
        'a Slurm time limit: "MM", "MM:SS", "HH:MM:SS", "D-HH", "D-HH:MM" or "D-HH:MM:SS" (e.g. "2:00:00")')
    cpus: Annotated[int, Field(ge=1)] | None = _described("an integer, 1 or more (sbatch --cpus-per-task)")
    mem: Annotated[str, Field(pattern=r"^\d+[KMGT]?$")] | None = _described(
        'a memory size as sbatch takes it (e.g. "16G", "4000M")')
    gpus: Annotated[str, Field(pattern=r"^\S+$")] | None = _described(
        'a --gpus value without spaces (e.g. "1" or "a100:2")')
    qos: _NoSpace | None = _described('a QOS name without spaces (e.g. "normal")')
    constraint: _NonEmpty | None = _described('a node feature expression (e.g. "intel&avx512")')
    reservation: _NoSpace | None = _described('a reservation name without spaces')
    extra_args: list[_NonEmpty] | None = _described(
        'an array of sbatch options, each one word (e.g. ["--exclusive", "--begin=now+60"])')
    queue_timeout: _Seconds | None = _described(
        'a duration greater than 0 that the job may wait in the queue: seconds, or a string like "15m", "2h"')


class KernelSettings(BaseModel):
    """The kernel fields that ``[defaults]`` may also set (a kernel's own value wins)."""

    model_config = _TABLE

    python: _NonEmpty | None = _described(
        'a non-empty string, the remote Python (e.g. "python3" or "/opt/conda/bin/python")')
    setup: list[str] | None = _described(
        'an array of strings, shell lines run first on the remote (e.g. ["module load cuda"])')
    env: dict[_EnvName, _EnvValue] | None = _described(
        'a table of string values, names without "=" (e.g. { OMP_NUM_THREADS = "4" })')
    cwd: _NonEmpty | None = _described('a non-empty string, a remote directory (e.g. "~/project")')
    command: Annotated[list[str], Field(min_length=1)] | None = _described(
        'a non-empty array of strings (e.g. ["{python}", "-m", "spyder_kernels.console"])')
    kernel_args: list[str] | None = _described('an array of strings (e.g. ["--matplotlib=inline"])')
    language: _NonEmpty | None = _described('a non-empty string (e.g. "python")')
    interrupt_mode: _InterruptMode | None = _described(
        f"one of {', '.join(map(json.dumps, INTERRUPT_MODES))}")
    startup_timeout: _Seconds | None = _described(
        'a duration greater than 0: seconds, or a string like "90s", "15m", "12h", "3d"')
    reconnect_grace: _SecondsOrZero | None = _described(
        'a duration, 0 or more: seconds, or a string like "90s", "15m", "12h", "3d"')
    runtime_dir: _NonEmpty | None = _described(
        'a non-empty string, a remote directory for the kernel\'s private files '
        '(e.g. "$XDG_RUNTIME_DIR" or "/scratch/$USER"; default: $TMPDIR or /tmp)')
    output_backlog: _Bytes | None = _described(
        'a size greater than 0: bytes, or a string like "64MiB", "512MB", "1GiB"')
    detached_lease: _Seconds | None = _described(
        'a duration greater than 0 (how long a detached kernel waits with nobody attached): seconds, or a '
        'string like "12h", "3d"')
    spare_kernel: bool | None = _described(
        "true or false: whether the per-user service keeps one kernel of this entry started ahead (its imports "
        "done, no code run) while it serves one, so the next start or restart skips them (default true)")
    launcher: _Launcher | None = _described(
        f"one of {', '.join(map(json.dumps, LAUNCHERS))} (how Jupyter starts the kernel)")
    forward: list[_ForwardItem] | None = _described(
        'an array of remote ports to reach locally, each an integer from 1 to 65535 or a string "REMOTE" or '
        '"REMOTE:LOCAL" (e.g. [8787, "6006:16006"])')
    slurm: SlurmTable | None = _described(
        "a table [kernels.NAME.slurm] (partition, account, time, cpus, mem, gpus, qos, constraint, reservation, "
        "extra_args, queue_timeout): run the kernel in a Slurm job")


class DefaultsTable(KernelSettings):
    """``[defaults]``: inherited by every kernel that does not set the field itself."""


class KernelTable(KernelSettings):
    """``[kernels.NAME]``: one kernelspec."""

    host: _NonEmpty = Field(description='a [hosts] name or an ad-hoc target "[user@]host[:port]"')
    display_name: _NonEmpty | None = _described("a non-empty string shown in Jupyter")


class HostTable(BaseModel):
    """``[hosts.NAME]``: how to reach one SSH host (unset fields come from ~/.ssh/config)."""

    model_config = _TABLE

    hostname: _NoSpace | None = _described(
        'a host name or address without spaces (e.g. "lab.example.org")')
    port: _Port | None = _described("an integer from 1 to 65535")
    user: _NoSpace | None = _described('a user name without spaces (e.g. "alice")')
    identity_file: _NonEmpty | None = _described(
        'a non-empty string, a private key path (e.g. "~/.ssh/id_ed25519")')
    proxy_jump: list[_NonEmpty] | None = _described(
        'an array of [hosts] names or "[user@]host[:port]" targets (e.g. ["bastion"])')
    known_hosts: _NonEmpty | None = _described("a non-empty string, a known_hosts path")
    host_key_policy: _HostKeyPolicy | None = _described(
        f"one of {', '.join(map(json.dumps, HOST_KEY_POLICIES))}")
    keepalive: _SecondsOrZero | None = _described(
        "a number of seconds, 0 or more (0 turns keepalives off)")


def _no_defaults() -> DefaultsTable:
    return DefaultsTable()


class ConfigFile(BaseModel):
    """The whole file."""

    model_config = _TABLE

    defaults: DefaultsTable = Field(default_factory=_no_defaults, description="a table [defaults]")
    hosts: dict[str, HostTable] = Field(
        default_factory=dict, description="a table of [hosts.NAME] tables")
    kernels: dict[str, KernelTable] = Field(
        default_factory=dict, description="a table of [kernels.NAME] tables")


# --- discovery ----------------------------------------------------------------------------------


def default_user_config_path() -> Path:
    """``$XDG_CONFIG_HOME/remote-kernel/remote-kernels.toml`` (``~/.config/...`` by default)."""
    xdg = os.environ.get("XDG_CONFIG_HOME", "")
    # The XDG spec says a relative XDG_CONFIG_HOME is invalid and must be ignored.
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".config"
    return base / "remote-kernel" / CONFIG_FILENAME


def discover_config_path(explicit: str | os.PathLike[str] | None) -> Path:
    """``--config``, else ``$REMOTE_KERNEL_CONFIG``, else ``./remote-kernels.toml``, else XDG."""
    if explicit is not None and str(explicit):
        return _existing(Path(explicit).expanduser(), "given with --config")
    from_env = os.environ.get(CONFIG_ENV_VAR, "")
    if from_env:
        return _existing(Path(from_env).expanduser(), f"named by ${CONFIG_ENV_VAR}")
    candidates = [Path.cwd() / CONFIG_FILENAME, default_user_config_path()]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    looked = ", ".join(str(c) for c in candidates)
    message = f"no config file found (looked at --config, ${CONFIG_ENV_VAR}, {looked})"
    raise ConfigError(
        [ConfigProblem(path=CONFIG_FILENAME, key="", message=message)],
        hint=f"create ./{CONFIG_FILENAME} (see examples/ and the README's config reference), "
             f"or run `remote-kernel install -t user@host`, or pass --config FILE",
    )


def _existing(path: Path, origin: str) -> Path:
    if path.is_file():
        return path.resolve()
    what = "is not a file" if path.exists() else "does not exist"
    message = f"config file {origin} {what}"
    raise ConfigError([ConfigProblem(path=str(path), key="", message=message)])


# --- loading ------------------------------------------------------------------------------------


def load_config(path: str | os.PathLike[str]) -> LoadedConfig:
    """Read and validate one config file; raise ConfigError carrying every problem found."""
    try:
        resolved = Path(path).expanduser().resolve()
        data = resolved.read_bytes()
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte or unencodable character
        reason = getattr(exc, "strerror", None) or str(exc)
        message = f"cannot read config file: {reason}"
        raise ConfigError([ConfigProblem(path=str(path), key="", message=message)]) from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        message = f"not valid UTF-8 (byte 0x{data[exc.start]:02x}); TOML files must be UTF-8"
        problem = ConfigProblem(path=str(resolved), key="", line=line, message=message)
        raise ConfigError([problem]) from exc
    return parse_config(text, resolved)


def parse_config(text: str, path: Path) -> LoadedConfig:
    """Validate TOML ``text`` as if read from ``path`` (used by load_config and by tests)."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([_syntax_problem(exc, text, path)]) from exc
    except RecursionError as exc:  # tomllib recurses per nesting level (a few hundred suffice)
        message = "TOML syntax error: arrays or inline tables nested too deeply"
        raise ConfigError([ConfigProblem(path=str(path), key="", message=message)]) from exc
    locator = _Locator(text)
    problems: list[tuple[Loc, str]] = list(_reference_problems(raw))
    model: ConfigFile | None = None
    try:
        model = ConfigFile.model_validate(raw)
    except ValidationError as exc:
        problems[:0] = [_shape_problem(error) for error in exc.errors()]
    if problems or model is None:
        raise ConfigError(_located(problems, locator, path),
                          hint="see the config reference in the README for every key")
    return LoadedConfig(path=path, model=model)


def _syntax_problem(exc: tomllib.TOMLDecodeError, text: str, path: Path) -> ConfigProblem:
    message = str(exc)
    match = re.search(r"\s*\(at line (\d+), column (\d+)\)$", message)
    if match:
        return ConfigProblem(path=str(path), key="", line=int(match[1]), column=int(match[2]),
                             message=f"TOML syntax error: {message[: match.start()]}")
    message = re.sub(r"\s*\(at end of document\)$", " at end of document", message)
    return ConfigProblem(path=str(path), key="", line=text.count("\n") + 1,
                         message=f"TOML syntax error: {message}")


def _located(problems: list[tuple[Loc, str]], locator: _Locator, path: Path) -> list[ConfigProblem]:
    located = [
        ConfigProblem(path=str(path), key=dotted_key(loc), message=text, line=locator.line_of(loc))
        for loc, text in problems
    ]
    return sorted(located, key=lambda p: (p.line is None, p.line or 0))


# --- the resolved view --------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadedConfig:
    """A validated config file and its resolved, launchable entries."""

    path: Path
    model: ConfigFile

    def entries(self) -> dict[str, KernelEntry]:
        """Every kernel, resolved (defaults applied, hosts looked up), in file order."""
        hosts = self.host_entries()
        return {
            name.lower(): _resolve_kernel(name, table, self.model.defaults, hosts)
            for name, table in self.model.kernels.items()
        }

    def entry(self, name: str) -> KernelEntry:
        entries = self.entries()
        found = entries.get(name.lower())
        if found is None:
            known = ", ".join(entries) or "none"
            raise UsageError(
                f"no kernel named {name!r} in {self.path} (known kernels: {known})",
                hint="add a [kernels.NAME] table to the file, or run `remote-kernel list`",
            )
        return found

    def host_entries(self) -> dict[str, HostEntry]:
        """Every [hosts] table resolved, proxy_jump chains included."""
        return {name: _resolve_host(name, self.model.hosts, ()) for name in self.model.hosts}


def _resolve_kernel(name: str, table: KernelTable, defaults: DefaultsTable,
                    hosts: Mapping[str, HostEntry]) -> KernelEntry:
    """Each KernelSettings field: the kernel's value, else [defaults]'s, else (left out here)
    KernelEntry's own default. ``env`` tables merge; name, host and display_name are the kernel's."""
    values: dict[str, Any] = {}
    for field in KernelSettings.model_fields:
        value = getattr(table, field)
        value = getattr(defaults, field) if value is None else value
        if value is not None:
            values[field] = value
    values["env"] = {**(defaults.env or {}), **(table.env or {})}
    values.pop("slurm", None)
    if table.slurm is not None or defaults.slurm is not None:  # the keys merge, the kernel's win
        values["slurm"] = {**_set_keys(defaults.slurm), **_set_keys(table.slurm)}
    host = hosts[table.host] if table.host in hosts else HostEntry.from_target(table.host)
    return KernelEntry.from_dict(
        {**values, "name": name.lower(), "host": host, "display_name": table.display_name or name})


def _set_keys(table: BaseModel | None) -> dict[str, Any]:
    return table.model_dump(exclude_none=True) if table is not None else {}


def _resolve_host(ref: str, tables: Mapping[str, HostTable], chain: tuple[str, ...]) -> HostEntry:
    table = tables.get(ref)
    if table is None:
        return HostEntry.from_target(ref)
    if ref in chain:  # validation rejects cycles; this guards models built by hand
        message = f"proxy_jump cycle: {' -> '.join((*chain, ref))}"
        raise ConfigError([ConfigProblem(path="", key=f"hosts.{ref}.proxy_jump", message=message)])
    options: dict[str, Any] = {}
    if table.host_key_policy is not None:
        options["host_key_policy"] = table.host_key_policy
    if table.keepalive is not None:
        options["keepalive"] = float(table.keepalive)
    hops = tuple(_resolve_host(hop, tables, (*chain, ref)) for hop in table.proxy_jump or ())
    return HostEntry(
        name=ref, hostname=table.hostname, port=table.port, user=table.user,
        identity_file=table.identity_file, known_hosts=table.known_hosts, proxy_jump=hops,
        **options,
    )


# --- cross-reference checks on the raw data -----------------------------------------------------


def looks_like_target(ref: str) -> bool:
    """An ad-hoc target says so by its shape; a bare word must be a [hosts] name (catches typos)."""
    return any(mark in ref for mark in "@:.[")


def _reference_problems(raw: Mapping[str, Any]) -> Iterator[tuple[Loc, str]]:
    hosts = _table(raw.get("hosts"))
    kernels = _table(raw.get("kernels"))
    for name, host in hosts.items():
        if not name or any(char.isspace() for char in name):
            yield ("hosts", name), f"invalid host name {json.dumps(name)}: expected no spaces"
        for index, hop in enumerate(_strings(_table(host).get("proxy_jump"))):
            if (message := _host_ref_problem(hop, hosts)) is not None:
                yield ("hosts", name, "proxy_jump", index), message
    yield from _cycle_problems(hosts)
    yield from _kernel_name_problems(kernels)
    for name, kernel in kernels.items():
        host = _table(kernel).get("host")
        if isinstance(host, str) and (message := _host_ref_problem(host, hosts)) is not None:
            yield ("kernels", name, "host"), message


def _table(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _strings(value: Any) -> list[str]:
    """The strings of an array (other items are reported by the model); a non-array gives none."""
    if not isinstance(value, list):
        return []
    return [item if isinstance(item, str) else "" for item in value]


def _host_ref_problem(ref: str, hosts: Mapping[str, Any]) -> str | None:
    if not ref or ref in hosts:
        return None
    if not looks_like_target(ref):
        known = ", ".join(hosts) or "none defined"
        return (
            f"undefined host {json.dumps(ref)}: expected a [hosts] name (known: {known}) or an "
            f'ad-hoc target "[user@]host[:port]"; add a [hosts.{_toml_key(ref)}] table (it may be '
            f'empty: ssh settings then come from ~/.ssh/config) or write e.g. "user@{ref}"'
        )
    try:
        parse_target(ref)
    except ValueError as exc:
        return f"invalid target: {exc}"
    return None


def _cycle_problems(hosts: Mapping[str, Any]) -> Iterator[tuple[Loc, str]]:
    edges = {name: [hop for hop in _strings(_table(table).get("proxy_jump")) if hop in hosts]
             for name, table in hosts.items()}
    reported: set[frozenset[str]] = set()
    for start in edges:
        for cycle in _cycles_from(start, edges):
            if frozenset(cycle) not in reported:
                reported.add(frozenset(cycle))
                yield (("hosts", cycle[0], "proxy_jump"),
                       f"proxy_jump cycle: {' -> '.join([*cycle, cycle[0]])}; expected a chain of "
                       "jump hosts that ends at a host reachable without a cycle")


def _cycles_from(start: str, edges: Mapping[str, list[str]]) -> Iterator[list[str]]:
    """Cycles through ``start`` (depth-first over the small proxy_jump graph)."""
    stack: list[tuple[str, list[str]]] = [(start, [start])]
    visited: set[str] = set()
    while stack:
        node, path = stack.pop()
        for hop in edges.get(node, []):
            if hop == start:
                yield path
            elif hop not in visited:
                visited.add(hop)
                stack.append((hop, [*path, hop]))


def _kernel_name_problems(kernels: Mapping[str, Any]) -> Iterator[tuple[Loc, str]]:
    seen: dict[str, str] = {}
    for name in kernels:
        if not is_valid_kernel_name(name):
            yield ("kernels", name), f"invalid kernel name {json.dumps(name)}. {KERNEL_NAME_RULE}"
        elif name.lower() in seen:
            yield (("kernels", name), f"kernel name {json.dumps(name)} clashes with "
                   f"{json.dumps(seen[name.lower()])}: kernelspec names are stored lower-case")
        seen.setdefault(name.lower(), name)


# --- turning pydantic errors into problems ------------------------------------------------------

_TABLE_MODELS: dict[str, type[BaseModel]] = {
    "defaults": DefaultsTable, "hosts": HostTable, "kernels": KernelTable,
}
_NOT_INHERITABLE = {"host", "display_name"}


def _shape_problem(error: Mapping[str, Any]) -> tuple[Loc, str]:
    loc: Loc = tuple(error["loc"])
    kind = error["type"]
    if kind == "extra_forbidden":
        return loc, _unknown_key_message(loc)
    if loc and loc[-1] == "[key]":
        loc = loc[:-1]
        return loc, f"invalid key {_found(error['input'])}: expected {_expected(loc[:-1])}"
    if kind == "missing":
        return loc, f"missing required key: expected {_expected(loc)}"
    return loc, f"expected {_expected(loc)}, found {_found(error['input'])}"


def _model_at(loc: Loc) -> type[BaseModel] | None:
    """The model that holds the table at ``loc`` (``()`` is the file itself)."""
    if not loc:
        return ConfigFile
    section = str(loc[0])
    if section == "defaults" and len(loc) == 1:
        return DefaultsTable
    if section in ("hosts", "kernels") and len(loc) == 2:
        return _TABLE_MODELS[section]
    if loc[-1] == "slurm" and len(loc) == {"defaults": 2, "kernels": 3}.get(section):
        return SlurmTable
    return None


def _unknown_key_message(loc: Loc) -> str:
    key = str(loc[-1])
    model = _model_at(loc[:-1])
    allowed = list(model.model_fields) if model else []
    message = f"unknown key {json.dumps(key)}"
    if close := difflib.get_close_matches(key, allowed, n=1):
        message += f" (did you mean {json.dumps(close[0])}?)"
    if model is DefaultsTable and key in _NOT_INHERITABLE:
        message += f"; {key} cannot be inherited, set it in each [kernels.NAME]"
    return message + f"; expected one of: {', '.join(allowed)}"


def _expected(loc: Loc) -> str:
    if len(loc) == 2 and str(loc[0]) in ("hosts", "kernels"):
        return f"a table [{loc[0]}.{_toml_key(str(loc[1]))}]"
    for depth in (3, 2, 1, 0):  # field of a [kernels.NAME.slurm], of a named table, of [defaults], top-level
        model = _model_at(loc[:depth])
        if model is not None and len(loc) > depth and str(loc[depth]) in model.model_fields:
            return model.model_fields[str(loc[depth])].description or "a valid value"
    return "a valid value"


_TOML_TYPES: tuple[tuple[type, str], ...] = (
    (bool, "boolean"), (int, "integer"), (float, "float"), (str, "string"),
    (list, "array"), (dict, "table"),
)


def _found(value: Any) -> str:
    kind = next((name for cls, name in _TOML_TYPES if isinstance(value, cls)), "date/time")
    if isinstance(value, dict):
        return f"a table with keys {', '.join(map(_toml_key, value)) or '(none)'}"
    text = _render(value)
    return f"{kind} {text if len(text) <= 60 else text[:57] + '...'}"


def _render(value: Any) -> str:
    """json writes strings in TOML's double quotes and booleans as true/false; floats as Python."""
    if isinstance(value, float):
        return repr(value)
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (RecursionError, ValueError):  # absurdly nested: the type alone says enough
        return "(deeply nested)"


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else json.dumps(key, ensure_ascii=False)


def dotted_key(loc: Loc) -> str:
    """``("kernels", "lab", "setup", 1)`` -> ``kernels.lab.setup[1]``, quoted where TOML needs."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += ("." if text else "") + _toml_key(part)
    return text


# --- where keys are in the text -----------------------------------------------------------------


class _Locator:
    """Maps key paths to the line that defines them, scanning TOML text that tomllib accepted.

    Best effort by design: on anything unexpected it stops and keeps what it found, and a path it
    does not know falls back to its closest known parent (a missing key -> its table header).
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.lines: dict[Loc, int] = {}
        self._newlines = [index for index, char in enumerate(text) if char == "\n"]
        self._table_arrays: dict[Loc, int] = {}
        with contextlib.suppress(IndexError, ValueError, RecursionError):
            self._document()

    def line_of(self, loc: Loc) -> int | None:
        for depth in range(len(loc), 0, -1):
            line = self.lines.get(loc[:depth])
            if line is not None:
                return line
        return None

    def _record(self, path: Loc, pos: int) -> None:
        line = bisect.bisect_left(self._newlines, pos) + 1
        for depth in range(1, len(path) + 1):
            self.lines.setdefault(path[:depth], line)

    def _document(self) -> None:
        table: Loc = ()
        while self._skip_blank() < len(self.text):
            start = self.pos
            if self.text.startswith("[[", self.pos):
                self.pos += 2
                path = self._key()
                self._expect("]]")
                index = self._table_arrays.get(path, 0)
                self._table_arrays[path] = index + 1
                table = (*path, index)
            elif self.text[self.pos] == "[":
                self.pos += 1
                table = self._key()
                self._expect("]")
            else:
                key = (*table, *self._key())
                self._expect("=")
                self._record(key, start)
                self._value(key)
                continue
            self._record(table, start)

    def _skip_ws(self) -> int:
        while self.pos < len(self.text) and self.text[self.pos] in " \t":
            self.pos += 1
        return self.pos

    def _skip_blank(self) -> int:
        """Whitespace, newlines and comments."""
        while self.pos < len(self.text):
            char = self.text[self.pos]
            if char in " \t\r\n":
                self.pos += 1
            elif char == "#":
                end = self.text.find("\n", self.pos)
                self.pos = len(self.text) if end < 0 else end
            else:
                break
        return self.pos

    def _expect(self, token: str) -> None:
        self._skip_ws()
        if not self.text.startswith(token, self.pos):
            raise ValueError(f"expected {token!r} at {self.pos}")
        self.pos += len(token)

    def _key(self) -> Loc:
        parts: list[str] = []
        while True:
            self._skip_ws()
            start = self.pos
            if self.text[self.pos] in "\"'":
                self._single_line_string()
                parts.append(tomllib.loads("k = " + self.text[start : self.pos])["k"])
            else:
                match = _BARE_KEY.match(self.text, self.pos)
                if not match:
                    raise ValueError(f"no key at {self.pos}")
                self.pos = match.end()
                parts.append(match[0])
            if self._skip_ws() < len(self.text) and self.text[self.pos] == ".":
                self.pos += 1
                continue
            return tuple(parts)

    def _value(self, path: Loc) -> None:
        self._skip_ws()
        rest = self.text[self.pos : self.pos + 3]
        if rest in ('"""', "'''"):
            self._multi_line_string(rest)
        elif rest[:1] in ('"', "'"):
            self._single_line_string()
        elif rest[:1] == "[":
            self._array(path)
        elif rest[:1] == "{":
            self._inline_table(path)
        else:  # number, bool, date/time (which may hold a space): up to the next delimiter
            while self.pos < len(self.text) and self.text[self.pos] not in ",]}\r\n#":
                self.pos += 1

    def _array(self, path: Loc) -> None:
        self.pos += 1
        index = 0
        while self._skip_blank() < len(self.text) and self.text[self.pos] != "]":
            self._record((*path, index), self.pos)
            self._value((*path, index))
            index += 1
            if self._skip_blank() < len(self.text) and self.text[self.pos] == ",":
                self.pos += 1
        self.pos += 1

    def _inline_table(self, path: Loc) -> None:
        self.pos += 1
        while self._skip_blank() < len(self.text) and self.text[self.pos] != "}":
            start = self.pos
            key = (*path, *self._key())
            self._expect("=")
            self._record(key, start)
            self._value(key)
            if self._skip_blank() < len(self.text) and self.text[self.pos] == ",":
                self.pos += 1
        self.pos += 1

    def _single_line_string(self) -> None:
        quote = self.text[self.pos]
        self.pos += 1
        while self.text[self.pos] != quote:
            self.pos += 2 if quote == '"' and self.text[self.pos] == "\\" else 1
        self.pos += 1

    def _multi_line_string(self, delimiter: str) -> None:
        self.pos += 3
        while not self.text.startswith(delimiter, self.pos):
            self.pos += 2 if delimiter == '"""' and self.text[self.pos] == "\\" else 1
        self.pos += 3
        # Up to two quotes may directly precede the closing delimiter: """a""""" is legal.
        for _ in range(2):
            if self.text.startswith(delimiter[0], self.pos):
                self.pos += 1


__all__ = [
    "CONFIG_ENV_VAR",
    "CONFIG_FILENAME",
    "ConfigFile",
    "DefaultsTable",
    "HostTable",
    "KernelSettings",
    "KernelTable",
    "LoadedConfig",
    "default_user_config_path",
    "discover_config_path",
    "dotted_key",
    "load_config",
    "looks_like_target",
    "parse_config",
]

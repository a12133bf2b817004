"""`discover HOST`: find the Python environments on a host, and turn those with ipykernel into entries.

One SSH connection, one remote command: remote/discover_probe.py runs through
bootstrap.run_program (the same dispatcher and python a kernel start uses), bounded in time, and
answers with one JSON document. ``--add`` appends one ``[kernels.NAME]`` table per environment
with ipykernel to the config file the way ``install -t`` does (the user's bytes untouched, the
whole file validated before anything is written). No printing here: commands/discover_cmd.py does
that through console.py.
"""

from __future__ import annotations

import json
import logging
import re
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from remote_kernel import bootstrap, config, install
from remote_kernel.entry import (
    DEFAULT_PYTHON,
    KERNEL_NAME_RULE,
    HostEntry,
    KernelEntry,
    is_valid_kernel_name,
)
from remote_kernel.errors import RemoteKernelError, SSHError, UsageError
from remote_kernel.tomlappend import joined, render_tables

log = logging.getLogger(__name__)

PROBE_SOURCE = Path(__file__).parent / "remote" / "discover_probe.py"
MARKER = "@@remote-kernel-discover@@"  # remote/discover_probe.MARKER
CONNECT_TIMEOUT = 15.0
PROBE_BUDGET = 45.0  # what the remote program allows itself (conda 20 s, search 10 s, each python 10 s)
PYTHON_TIMEOUT = 10.0  # remote/discover_probe.PYTHON_TIMEOUT: one environment's python answering
RUN_TIMEOUT = PROBE_BUDGET + 15.0  # plus the login shell and the program's start
MIN_PYTHON = (3, 8)  # the agent's floor (remote/*.py)
NEW_FILE_HEADER = (
    "# remote-kernel configuration. `remote-kernel sync` turns each [kernels.NAME] table into\n"
    "# a Jupyter kernelspec; see the README's config reference.\n"
    "# Created by `remote-kernel discover --add`.\n"
)


@dataclass(frozen=True)
class Environment:
    """One Python environment found on the host, and what its own python said about itself."""

    kind: str  # conda, pyenv, venv, path
    name: str
    prefix: str
    python: str
    version: str | None = None
    ipykernel: str | None = None  # its version; "" when installed without metadata; None: absent
    error: str | None = None

    @property
    def has_ipykernel(self) -> bool:
        return self.ipykernel is not None

    @property
    def python_too_old(self) -> bool:
        return self.version is not None and _version_tuple(self.version) < MIN_PYTHON

    @property
    def usable(self) -> bool:
        """Can run a kernel as it is: ipykernel, on a Python the agent runs on."""
        return self.error is None and self.has_ipykernel and not self.python_too_old

    @property
    def install_command(self) -> str:
        """What would give this environment ipykernel."""
        return f"{shlex.quote(self.python)} -m pip install ipykernel"

    @property
    def problem(self) -> str | None:
        if self.error is not None:
            return self.error
        if self.python_too_old:
            return f"Python {self.version} is older than {'.'.join(map(str, MIN_PYTHON))}, which remote-kernel needs"
        return None if self.has_ipykernel else "no ipykernel"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "prefix": self.prefix, "python": self.python,
                "version": self.version, "ipykernel": self.ipykernel, "usable": self.usable,
                "problem": self.problem,
                "install_command": None if self.has_ipykernel or self.error else self.install_command}


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:2])


@dataclass(frozen=True)
class Discovery:
    """What the host answered."""

    host: HostEntry
    environments: tuple[Environment, ...]
    notes: tuple[str, ...] = ()
    home: str = ""
    seconds: float = 0.0


# --- asking the host -----------------------------------------------------------------------------


def resolve_host(host: str, loaded: config.LoadedConfig | None) -> HostEntry:
    """A [hosts] name of the config, an ad-hoc ``[user@]host[:port]``, or an ~/.ssh/config alias."""
    text = host.strip()
    if not text:
        raise UsageError("HOST is empty", hint="give a [hosts] name or [user@]host[:port]")
    hosts = loaded.host_entries() if loaded is not None else {}
    if text in hosts:
        return hosts[text]
    try:
        return HostEntry.from_target(text) if config.looks_like_target(text) else HostEntry(name=text)
    except ValueError as exc:
        raise UsageError(f"HOST: {exc}", hint="give a [hosts] name or [user@]host[:port]") from exc


def discover(host: HostEntry, search: Sequence[str], *, python: str = DEFAULT_PYTHON,
             python_timeout: float = PYTHON_TIMEOUT) -> Discovery:
    """Connect once, run the probe once with ``python`` (after the login shell), parse its answer.
    ``python_timeout`` bounds each environment's python answering for itself."""
    from remote_kernel import inventory, ssh

    inventory.silence_paramiko()  # a refused handshake is our one-line SSHError, not 20 lines of log
    entry = KernelEntry(name="discover", host=host, display_name="", python=python)
    request = {"search": list(search), "budget": PROBE_BUDGET, "python_timeout": python_timeout}
    source = PROBE_SOURCE.read_text(encoding="utf-8")
    try:
        with ssh.connect(host, timeout=CONNECT_TIMEOUT) as conn:
            result = bootstrap.run_program(conn, entry, source, request=request, timeout=RUN_TIMEOUT)
    except SSHError as exc:
        raise one_line(exc) from exc
    return parse_answer(host, python, result)


def one_line(exc: SSHError) -> SSHError:
    """A host that cannot be reached is one line on stderr (with its hint), as in ps and gc."""
    text = "; ".join(line.strip() for line in exc.message.splitlines() if line.strip())
    return SSHError(f"{text} (hint: {exc.hint})" if exc.hint else text, host=exc.host)


def parse_answer(host: HostEntry, python: str, result: bootstrap.ProgramResult) -> Discovery:
    """The probe's JSON after its marker line; anything else is an error naming the host and why."""
    stdout = result.stdout.decode("utf-8", errors="replace")
    stderr = result.stderr.decode("utf-8", errors="replace").strip()
    if result.exit_status is None:
        raise RemoteKernelError(f"discover on {host.label} did not finish within {RUN_TIMEOUT:g} s",
                                hint="a login shell or a search directory that hangs (NFS)? try a narrower --search")
    _, marker, document = stdout.rpartition(MARKER)
    if not marker or result.exit_status != 0:
        raise RemoteKernelError(
            f"discover on {host.label} failed (exit {result.exit_status}) running {python!r}: "
            f"{_last_line(stderr) or 'no output'}",
            hint=f"the search runs with {python!r} from the login PATH and needs Python 3.8+; "
                 "name another with --python PATH")
    try:
        answer: dict[str, Any] = json.loads(document)
    except ValueError as exc:
        raise RemoteKernelError(f"discover on {host.label}: the answer was not valid JSON ({exc})") from exc
    return Discovery(host=host, environments=tuple(_environment(item) for item in answer.get("environments", ())),
                     notes=tuple(str(note) for note in answer.get("notes", ())), home=str(answer.get("home") or ""),
                     seconds=float(answer.get("seconds") or 0.0))


def _environment(item: Mapping[str, Any]) -> Environment:
    return Environment(kind=str(item["kind"]), name=str(item["name"]), prefix=str(item["prefix"]),
                       python=str(item["python"]), version=item.get("version"),
                       ipykernel=item.get("ipykernel"), error=item.get("error"))


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip() and "remote-kernel: setup done" not in line]
    return lines[-1].strip()[:300] if lines else ""


# --- entries -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedEntry:
    """The entry an environment gets (``existing``: already configured under that name)."""

    name: str
    environment: Environment
    python: str  # as written into the file: ``~/...`` under the remote home
    existing: bool = False


def host_prefix(host: str, prefix: str | None) -> str:
    """``--prefix`` as given, else the host made a valid kernel name (``alice@lab:22`` -> alice-lab-22)."""
    if prefix is not None:
        if not is_valid_kernel_name(prefix):
            raise UsageError(f"invalid --prefix {prefix!r}", hint=KERNEL_NAME_RULE)
        return prefix.lower()
    return install.derive_name(host) if config.looks_like_target(host.strip()) else valid_name(host)


def valid_name(text: str) -> str:
    """Anything -> a kernel name (the Jupyter rule): runs of other characters become one ``-``."""
    return re.sub(r"[^a-z0-9._]+", "-", text.lower()).strip("-.") or "env"


def plan_entries(discovery: Discovery, *, prefix: str, existing: Mapping[str, KernelEntry],
                 taken: Iterable[str] = ()) -> list[PlannedEntry]:
    """One entry per usable environment: a new name that clashes with nothing, or the existing
    entry that already runs this python on this host (so a second ``--add`` adds nothing)."""
    used = {name.lower() for name in (*existing, *taken)}
    configured = {(entry.host.label, _expanded(entry.python, discovery.home)): name
                  for name, entry in existing.items()}
    planned: list[PlannedEntry] = []
    for environment in discovery.environments:
        if not environment.usable:
            continue
        python = _in_home(environment.python, discovery.home)
        known = configured.get((discovery.host.label, environment.python))
        if known is not None:
            planned.append(PlannedEntry(known, environment, python, existing=True))
            continue
        name = _unique(valid_name(f"{prefix}-{environment.name}"), used)
        used.add(name)
        planned.append(PlannedEntry(name, environment, python))
    return planned


def _unique(base: str, used: set[str]) -> str:
    candidate, number = base, 1
    while candidate in used:
        number += 1
        candidate = f"{base}-{number}"
    return candidate


def _in_home(path: str, home: str) -> str:
    """``/home/alice/envs/ml/bin/python`` -> ``~/envs/ml/bin/python``: the entry keeps working if the
    home moves (``~/`` in ``python`` means the remote home)."""
    if home and home != "/" and path.startswith(home.rstrip("/") + "/"):
        return "~/" + path[len(home.rstrip("/")) + 1:]
    return path


def _expanded(python: str, home: str) -> str:
    return home.rstrip("/") + python[1:] if python.startswith("~/") and home else python


def display_name(planned: PlannedEntry, host: str) -> str:
    version = ".".join((planned.environment.version or "").split(".")[:2])
    name = f"{planned.environment.name} ({host})"
    return f"Python {version} {name}" if version else name


# --- --add ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Addition:
    """The config file's new text (validated, not yet written) and the entries it adds."""

    prepared: install.PreparedInstall
    names: tuple[str, ...]
    new_hosts: tuple[str, ...] = field(default=())


def load_existing(explicit_config: str | None) -> tuple[Path, str | None, config.LoadedConfig | None]:
    """The config file ``--add`` would write (install's rules: created when none exists) and its content."""
    path, original = install.locate_config(explicit_config)
    return path, original, config.parse_config(original, path) if original is not None else None


def prepare_addition(host: str, planned: Sequence[PlannedEntry], *, path: Path, original: str | None,
                     before: config.LoadedConfig | None) -> Addition:
    """Append ``[hosts]`` (an ~/.ssh/config alias gets an empty table, as with install) and one
    ``[kernels]`` table per new entry; validate the whole file as it will be."""
    new = [item for item in planned if not item.existing]
    hosts = {key: table.model_dump(exclude_none=True) for key, table in (before.model.hosts.items() if before else ())}
    new_hosts, host_ref = install.host_tables(install.InstallOptions(target=host), "discover", hosts)
    kernels = {item.name: {"host": host_ref, "display_name": display_name(item, host), "python": item.python}
               for item in new}
    addition = render_tables({"hosts": new_hosts, "kernels": kernels})
    text = joined(original if original is not None else NEW_FILE_HEADER, addition)
    loaded = config.parse_config(text, path)
    prepared = install.PreparedInstall(path=path, original=original, text=text, name=new[0].name if new else "",
                                       loaded=loaded, new_hosts=tuple(new_hosts))
    return Addition(prepared=prepared, names=tuple(item.name for item in new), new_hosts=tuple(new_hosts))


def write_addition(addition: Addition) -> None:
    """Append (or create the file 0600), exactly as ``install -t`` writes."""
    install.write_config(addition.prepared)

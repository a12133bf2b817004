"""Pure kernelspec logic: entries -> desired kernel.json documents; installed state -> SyncPlan.

No I/O here: sync.py scans the kernels directory and applies the plan. Keeping this pure makes the
planner easy to test exhaustively and lets ``--dry-run``/``--check`` share the exact code path of a
real sync.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from remote_kernel.entry import KERNEL_NAME_RULE, PROVISIONER_NAME, KernelEntry, is_valid_kernel_name
from remote_kernel.errors import KernelspecError

# Version of the ``metadata.remote_kernel`` marker. A spec carrying another schema is treated as
# foreign: an older remote-kernel must never prune or rewrite what a newer one wrote.
MARKER_SCHEMA = 1
MARKER_KEY = "remote_kernel"
# Names sync uses for its own scratch space inside a kernels dir; never valid entry names.
RESERVED_PREFIX = ".remote-kernel"

CREATE = "create"
UPDATE = "update"
UNCHANGED = "unchanged"
PRUNE = "prune"
CONFLICT = "conflict"
ACTIONS = (CREATE, UPDATE, UNCHANGED, PRUNE, CONFLICT)
CHANGES = (CREATE, UPDATE, PRUNE)


@dataclass(frozen=True)
class DesiredSpec:
    """One kernelspec as the config wants it."""

    name: str
    kernel_json: dict[str, Any]
    display_name: str
    host: str
    fingerprint: str


@dataclass(frozen=True)
class InstalledSpec:
    """One directory found in the target kernels dir, classified by sync.scan_installed.

    ``owner_config`` is the config path recorded in our marker (None: not ours, i.e. foreign, a
    symlink, unreadable, or another marker schema). ``owner_config_exists`` lets the planner adopt
    specs whose config file has moved away without doing I/O itself.
    """

    name: str
    path: Path
    kernel_json: dict[str, Any] | None = None
    owner_config: str | None = None
    owner_config_exists: bool = True
    is_symlink: bool = False

    @property
    def is_owned(self) -> bool:
        return self.owner_config is not None and not self.is_symlink

    @property
    def display_name(self) -> str:
        if self.kernel_json is not None:
            return str(self.kernel_json.get("display_name", ""))
        return ""

    @property
    def host(self) -> str:
        if not self.is_owned or self.kernel_json is None:
            return ""
        entry = marker_of(self.kernel_json).get("entry", {})
        host = entry.get("host", {}) if isinstance(entry, dict) else {}
        return str(host.get("hostname") or host.get("name") or "") if isinstance(host, dict) else ""


@dataclass(frozen=True)
class PlannedAction:
    name: str
    action: str
    path: Path
    display_name: str = ""
    host: str = ""
    reason: str = ""
    spec: DesiredSpec | None = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "action": self.action,
            "path": str(self.path),
            "display_name": self.display_name,
            "host": self.host,
            "reason": self.reason or None,
        }


@dataclass(frozen=True)
class SyncPlan:
    kernels_dir: Path
    config_path: Path
    actions: tuple[PlannedAction, ...]
    prune: bool = True

    def of(self, *actions: str) -> list[PlannedAction]:
        return [item for item in self.actions if item.action in actions]

    @property
    def has_changes(self) -> bool:
        return bool(self.of(*CHANGES))

    @property
    def conflicts(self) -> list[PlannedAction]:
        return self.of(CONFLICT)

    def counts(self) -> dict[str, int]:
        return {action: len(self.of(action)) for action in ACTIONS}

    def to_dict(self) -> dict[str, Any]:
        return {
            "kernels_dir": str(self.kernels_dir),
            "config": str(self.config_path),
            "prune": self.prune,
            "counts": self.counts(),
            "actions": [item.to_dict() for item in self.actions],
        }


def marker_of(kernel_json: Mapping[str, Any]) -> dict[str, Any]:
    """The ``metadata.remote_kernel`` marker of a kernel.json, or {} when absent or malformed."""
    metadata = kernel_json.get("metadata")
    marker = metadata.get(MARKER_KEY) if isinstance(metadata, dict) else None
    return marker if isinstance(marker, dict) else {}


def owner_config_of(kernel_json: Mapping[str, Any]) -> str | None:
    """The config path that owns this spec; None if remote-kernel (this schema) did not write it."""
    marker = marker_of(kernel_json)
    config = marker.get("config")
    if marker.get("schema") != MARKER_SCHEMA or not isinstance(config, str):
        return None
    return config


def check_spec_name(name: str) -> None:
    """Refuse names that are not plain kernel names: they could escape the kernels dir."""
    if not is_valid_kernel_name(name) or "/" in name or "\\" in name:
        raise KernelspecError(f"invalid kernel name {name!r}", hint=KERNEL_NAME_RULE)
    if name.startswith(RESERVED_PREFIX):
        raise KernelspecError(
            f"invalid kernel name {name!r}: names starting with {RESERVED_PREFIX!r} are "
            "reserved for remote-kernel's scratch space", hint="rename the entry",
        )


def render_kernel_json(
    entry: KernelEntry, *, spec_dir: Path, config_path: Path, python: str,
) -> dict[str, Any]:
    """The self-contained kernel.json for one entry (see PRODUCT.md "Kernelspecs written by sync").

    argv uses the real spec directory, not ``{resource_dir}``: VS Code substituted it only from 2025
    and launches python specs only in the ``[python, -m, module, ...]`` form.
    """
    argv = [python, "-m", "remote_kernel", "from-spec", str(spec_dir), "-f", "{connection_file}"]
    metadata: dict[str, Any] = {
        MARKER_KEY: {
            "schema": MARKER_SCHEMA,
            "config": str(config_path),
            "fingerprint": entry.fingerprint(),
            "entry": entry.to_dict(),
        },
    }
    if entry.launcher == "provisioner":
        # jupyter_client >= 7 starts the kernel through our provisioner, in the server's process;
        # argv stays the working from-spec form for clients that do not know provisioners.
        metadata["kernel_provisioner"] = {"provisioner_name": PROVISIONER_NAME, "config": {}}
    return {
        "argv": argv,
        "display_name": entry.display_name,
        "language": entry.language,
        "interrupt_mode": entry.interrupt_mode,
        "env": {},
        "metadata": metadata,
    }


def desired_specs(
    entries: Iterable[KernelEntry], *, kernels_dir: Path, config_path: Path, python: str,
) -> dict[str, DesiredSpec]:
    """Render every entry; keys are the spec directory names (= entry names)."""
    desired: dict[str, DesiredSpec] = {}
    seen: dict[str, str] = {}
    for entry in entries:
        check_spec_name(entry.name)
        # Jupyter lower-cases kernel names, so "Lab" and "lab" would be the same kernel.
        if entry.name.lower() in seen:
            raise KernelspecError(
                f"kernel entries {seen[entry.name.lower()]!r} and {entry.name!r} differ only in "
                "case; Jupyter would see one kernel", hint="rename one of them",
            )
        seen[entry.name.lower()] = entry.name
        spec_json = render_kernel_json(
            entry, spec_dir=kernels_dir / entry.name, config_path=config_path, python=python,
        )
        desired[entry.name] = DesiredSpec(
            name=entry.name, kernel_json=spec_json, display_name=entry.display_name,
            host=entry.host.label, fingerprint=spec_json["metadata"][MARKER_KEY]["fingerprint"],
        )
    return desired


def plan_sync(
    desired: Mapping[str, DesiredSpec],
    installed: Mapping[str, InstalledSpec],
    config_path: Path,
    prune: bool,
    *,
    kernels_dir: Path,
) -> SyncPlan:
    """Compare desired with installed specs. Pure: the same inputs always give the same plan.

    ``installed`` is keyed by directory name. Names are matched case-insensitively because Jupyter
    lower-cases them: a foreign ``Lab`` shadows our ``lab``.
    """
    by_lower = {name.lower(): spec for name, spec in installed.items()}
    actions = [
        _plan_one(spec, by_lower.get(name.lower()), str(config_path), kernels_dir)
        for name, spec in sorted(desired.items())
    ]
    if prune:
        wanted = {name.lower() for name in desired}
        actions += [
            PlannedAction(name=spec.name, action=PRUNE, path=spec.path,
                          display_name=spec.display_name, host=spec.host,
                          reason="its entry is no longer in the config")
            for name, spec in sorted(installed.items())
            if name.lower() not in wanted and spec.owner_config == str(config_path)
            and spec.is_owned
        ]
    return SyncPlan(kernels_dir=kernels_dir, config_path=config_path, actions=tuple(actions),
                    prune=prune)


def _plan_one(
    spec: DesiredSpec, current: InstalledSpec | None, config: str, kernels_dir: Path,
) -> PlannedAction:
    def action(kind: str, reason: str = "", path: Path | None = None) -> PlannedAction:
        return PlannedAction(
            name=spec.name, action=kind, path=path or kernels_dir / spec.name,
            display_name=spec.display_name, host=spec.host, reason=reason, spec=spec,
        )

    if current is None:
        return action(CREATE)
    conflict = _conflict_reason(current, config)
    if conflict:
        return action(CONFLICT, conflict, current.path)
    if current.name != spec.name:
        # Same name in another case: ours, but the directory must be renamed -> treat as foreign.
        reason = f"an existing kernelspec {current.path} differs only in case"
        return action(CONFLICT, reason, current.path)
    if current.kernel_json == spec.kernel_json:
        return action(UNCHANGED)
    if current.owner_config != config:
        gone = current.owner_config
        return action(UPDATE, f"adopted: it was written from {gone}, which no longer exists")
    return action(UPDATE, _update_reason(current, spec))


def _conflict_reason(current: InstalledSpec, config: str) -> str:
    if current.is_symlink:
        return f"{current.path} is a symlink; remote-kernel never writes through symlinks"
    if current.kernel_json is None:
        return f"{current.path} exists but has no readable kernel.json written by remote-kernel"
    if current.owner_config is None:
        return f"{current.path} is a kernelspec remote-kernel did not write"
    if current.owner_config != config and current.owner_config_exists:
        return f"{current.path} belongs to another config file, {current.owner_config}"
    return ""


def _update_reason(current: InstalledSpec, spec: DesiredSpec) -> str:
    if marker_of(current.kernel_json or {}).get("fingerprint") != spec.fingerprint:
        return "the entry changed"
    return "the launcher (argv) or display fields changed"

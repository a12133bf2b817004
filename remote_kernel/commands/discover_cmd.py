"""remote-kernel discover HOST: list the Python environments on a host; --add makes kernels of them."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from remote_kernel.discover import Addition, Discovery, Environment, PlannedEntry
    from remote_kernel.kernelspec import SyncPlan
    from remote_kernel.sync import SyncResult


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "discover", parents=[common],
        help="find Python environments on a host (conda, pyenv, venvs, python3) and add kernels for them",
        description="Find the Python environments on HOST that could run a kernel: conda/mamba "
                    "environments, pyenv versions, venvs under --search directories and python3 on "
                    "the login PATH, each with its Python version and ipykernel version. One SSH "
                    "connection, one remote command, bounded in time. --add appends a [kernels.NAME] "
                    "entry per environment that has ipykernel (never rewriting the file) and syncs them.",
    )
    parser.add_argument("host", metavar="HOST", help="a [hosts] name, an ~/.ssh/config alias or [user@]host[:port]")
    parser.add_argument("--search", action="append", default=[], metavar="DIR",
                        help="also look for venvs and conda envs up to 3 levels below DIR on the host "
                             "(repeatable; ~ is the remote home)")
    parser.add_argument("--add", action="store_true",
                        help="append an entry per environment with ipykernel to the config file, then sync them")
    parser.add_argument("--prefix", metavar="NAME",
                        help="entry names are NAME-<env> (default: the host, e.g. lab-ml)")
    parser.add_argument("--python", default="python3", metavar="PYTHON",
                        help="the remote Python 3.8+ that runs the search (default: python3 on the login PATH)")


def run(args: argparse.Namespace) -> int:
    from remote_kernel import discover
    from remote_kernel.sync import scan_installed, user_kernels_dir

    prefix = discover.host_prefix(args.host, args.prefix)  # a bad --prefix fails before connecting
    path, original, before = discover.load_existing(args.config)
    found = discover.discover(discover.resolve_host(args.host, before), args.search, python=args.python)
    existing = before.entries() if before is not None else {}
    planned = discover.plan_entries(found, prefix=prefix, existing=existing,
                                    taken=scan_installed(user_kernels_dir()))
    if not args.add:
        _report(args, found, planned)
        return 0
    addition = discover.prepare_addition(args.host, planned, path=path, original=original, before=before)
    return _add(args, found, planned, addition)


def _add(args: argparse.Namespace, found: Discovery, planned: list[PlannedEntry], addition: Addition) -> int:
    from remote_kernel import console
    from remote_kernel.commands import sync_cmd

    extra = {**_document(found, planned), "config": str(addition.prepared.path), "added": list(addition.names)}
    if not addition.names:
        if args.json:
            console.emit_json("discover", {"ok": True, **extra})
        else:
            _print(found, planned)
            console.emit_line("nothing to add: " + ("every environment with ipykernel is already configured"
                                                   if planned else "no environment with ipykernel was found"))
        return 0
    plan, result, written = _write_and_sync(addition)
    if not args.json:
        _print(found, planned)
        if written:
            names = ", ".join(f"[kernels.{name}]" for name in addition.names)
            console.emit_line(f"added to {addition.prepared.path}: {names}")
    return sync_cmd.report(args, plan, result, mode="apply", command="discover", extra=extra)


def _write_and_sync(addition: Addition) -> tuple[SyncPlan, SyncResult | None, bool]:
    """Write the entries and sync them, as `install -t` does: nothing is written to the config
    file (False) when their kernelspecs could not be written anyway (the plan's conflicts)."""
    from remote_kernel import discover
    from remote_kernel.kernelspec import desired_specs
    from remote_kernel.sync import launcher_python, sync_kernelspecs, user_kernels_dir

    path, loaded, kernels_dir = addition.prepared.path, addition.prepared.loaded, user_kernels_dir()
    desired = desired_specs([loaded.entry(name) for name in addition.names], kernels_dir=kernels_dir,
                            config_path=path, python=launcher_python(None))
    plan, _ = sync_kernelspecs(desired, kernels_dir=kernels_dir, config_path=path, prune=False, dry_run=True)
    if plan.conflicts:
        return plan, None, False
    discover.write_addition(addition)
    plan, result = sync_kernelspecs(desired, kernels_dir=kernels_dir, config_path=path, prune=False)
    return plan, result, True


def _report(args: argparse.Namespace, found: Discovery, planned: list[PlannedEntry]) -> None:
    from remote_kernel import console

    if args.json:
        console.emit_json("discover", {"ok": True, **_document(found, planned)})
        return
    _print(found, planned)
    new = [item for item in planned if not item.existing]
    if new:
        console.emit_line(f"`remote-kernel discover {args.host} --add` adds {len(new)} kernel entr"
                          f"{'y' if len(new) == 1 else 'ies'}: {', '.join(item.name for item in new)}")


def _print(found: Discovery, planned: list[PlannedEntry]) -> None:
    from remote_kernel import console

    names = {id(item.environment): item for item in planned}
    rows = [_row(environment, names.get(id(environment))) for environment in found.environments]
    console.emit_table(f"Python environments on {found.host.label} ({found.seconds:.1f} s)",
                       ["env", "kind", "python", "version", "ipykernel", "kernel entry"], rows)
    for note in found.notes:
        console.emit_line(f"note: {note}")
    missing = [environment for environment in found.environments
               if environment.error is None and not environment.has_ipykernel]
    if missing:
        console.emit_line("without ipykernel (to use one as a kernel, install it there):")
        for environment in missing:
            console.emit_line(f"  {environment.install_command}")


def _row(environment: Environment, planned: PlannedEntry | None) -> list[str]:
    if environment.error is not None:
        ipykernel = f"? ({environment.error})"
    elif environment.has_ipykernel:
        ipykernel = environment.ipykernel or "yes"
        ipykernel += " (Python too old)" if environment.python_too_old else ""
    else:
        ipykernel = "no"
    entry = "-" if planned is None else planned.name + (" (exists)" if planned.existing else "")
    return [environment.name, environment.kind, environment.python, environment.version or "?", ipykernel, entry]


def _document(found: Discovery, planned: list[PlannedEntry]) -> dict[str, Any]:
    entries = {id(item.environment): item for item in planned}
    environments = []
    for environment in found.environments:
        item = entries.get(id(environment))
        environments.append({**environment.to_dict(), "entry": item.name if item else None,
                             "entry_exists": bool(item and item.existing)})
    return {"host": found.host.label, "environments": environments, "notes": list(found.notes),
            "seconds": found.seconds}

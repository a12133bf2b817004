"""remote-kernel sync: make the installed kernelspecs match the config file."""

from __future__ import annotations

import argparse
import dataclasses
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathlib import Path

    from remote_kernel.errors import RemoteKernelError
    from remote_kernel.kernelspec import PlannedAction, SyncPlan
    from remote_kernel.sync import SyncResult


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "sync", parents=[common], help="make installed kernelspecs match the config file",
        description="Create, update and prune the Jupyter kernelspecs declared in the config "
                    "file. Only kernelspecs written by remote-kernel from this config file are "
                    "ever modified or removed.",
    )
    parser.add_argument("--dry-run", action="store_true", help="show the plan, write nothing")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if anything would change (for CI)")
    parser.add_argument("--no-prune", action="store_true",
                        help="keep kernelspecs whose entries were removed")
    add_kernelspec_options(parser)


def add_kernelspec_options(parser: argparse.ArgumentParser) -> None:
    """Where kernelspecs go and which local python launches them (shared with `install`)."""
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--user", action="store_true",
                        help="install for the current user (default)")
    target.add_argument("--sys-prefix", action="store_true",
                        help="install into sys.prefix (the active venv/conda env)")
    target.add_argument("--prefix", metavar="DIR",
                        help="install into DIR/share/jupyter/kernels (e.g. for building images)")
    parser.add_argument(
        "--provisioner", action="store_true",
        help="write kernelspecs that Jupyter starts through remote-kernel's jupyter_client provisioner "
             "(in the server's process) for every entry, as `launcher = \"provisioner\"` does for one; "
             "argv stays the working fallback for clients without provisioners",
    )
    parser.add_argument(
        "--launcher-python", metavar="PATH",
        help="the local python that has remote_kernel installed, written into kernel.json argv "
             "(default: the one running this command; set it when building images)",
    )


def run(args: argparse.Namespace) -> int:
    # Lazy: keeps --help fast (pydantic, jupyter_core).
    from remote_kernel import config
    from remote_kernel.kernelspec import desired_specs
    from remote_kernel.sync import launcher_python, sync_kernelspecs

    loaded = config.load_config(config.discover_config_path(args.config))
    kernels_dir = target_kernels_dir(args)
    entries = list(loaded.entries().values())
    if args.provisioner:
        entries = [dataclasses.replace(entry, launcher="provisioner") for entry in entries]
    desired = desired_specs(
        entries, kernels_dir=kernels_dir, config_path=loaded.path,
        python=launcher_python(args.launcher_python),
    )
    mode = "check" if args.check else "dry-run" if args.dry_run else "apply"
    plan, result = sync_kernelspecs(
        desired, kernels_dir=kernels_dir, config_path=loaded.path, prune=not args.no_prune,
        dry_run=mode != "apply",
    )
    return report(args, plan, result, mode=mode)


def target_kernels_dir(args: argparse.Namespace) -> Path:
    """The dir chosen by --user/--sys-prefix/--prefix; warns when Jupyter will not look there."""
    import logging

    from remote_kernel.sync import is_on_jupyter_path, kernels_dir_for

    kernels_dir = kernels_dir_for(sys_prefix=args.sys_prefix, prefix=args.prefix)
    if not is_on_jupyter_path(kernels_dir):
        # Expected when building an image with --prefix; a surprise otherwise.
        level = logging.INFO if args.prefix else logging.WARNING
        logging.getLogger(__name__).log(
            level, "Jupyter does not look in %s (not on JUPYTER_PATH or the data dirs); "
            "the kernels may not be found there", kernels_dir,
        )
    return kernels_dir


# --- output --------------------------------------------------------------------------------------

_PAST = {"create": "created", "update": "updated", "unchanged": "unchanged", "prune": "pruned",
         "conflict": "conflicts"}


def report(
    args: argparse.Namespace, plan: SyncPlan, result: SyncResult | None, *, mode: str,
    command: str = "sync", extra: dict[str, Any] | None = None,
) -> int:
    """Print the plan and result (a table, or one JSON document); return the exit code."""
    from remote_kernel import console

    problem = _problem(plan, result)
    in_sync = not plan.has_changes and not plan.conflicts
    if args.json:
        payload: dict[str, Any] = {
            "ok": problem is None and (in_sync or mode != "check"), "mode": mode,
            "in_sync": in_sync, **(extra or {}), "plan": plan.to_dict(),
            "result": result.to_dict() if result else None,
        }
        if problem is not None:
            payload["error"] = {"type": type(problem).__name__, "message": problem.message,
                                "hint": problem.hint}
        console.emit_json(command, payload)
    else:
        console.emit_table(f"remote-kernel {command} ({plan.kernels_dir})",
                           ["name", "action", "display name", "host"],
                           [_row(item, result) for item in plan.actions])
        console.emit_line(_summary(plan, result, mode))
    if problem is None:
        return 1 if mode == "check" and not in_sync else 0
    if args.json:  # the JSON document is out; cli.py would print a second one
        console.emit_error(str(problem))
        return problem.exit_code
    raise problem


def _row(item: PlannedAction, result: SyncResult | None) -> list[str]:
    action = item.action
    if result is not None:
        if any(failed is item for failed, _ in result.failed):
            action += " (failed)"
        elif item.action == "prune" and result.prune_skipped:
            action += " (skipped)"
    return [item.name, action, item.display_name, item.host]


def _summary(plan: SyncPlan, result: SyncResult | None, mode: str) -> str:
    counts = plan.counts()
    text = ", ".join(f"{counts[action]} {_PAST[action]}" for action in _PAST if counts[action])
    text = text or "no kernels declared and none to prune"
    if mode == "apply":
        return f"{text}." if not result or result.ok else f"{text}; {len(result.failed)} failed."
    if mode == "dry-run":
        return f"dry run, nothing written: {text}."
    in_sync = not plan.has_changes and not plan.conflicts
    return f"{'in sync' if in_sync else 'out of sync (run `remote-kernel sync`)'}: {text}."


def _problem(plan: SyncPlan, result: SyncResult | None) -> RemoteKernelError | None:
    """The error to report, or None: conflicts first (they need the user), then failed writes."""
    from remote_kernel.errors import KernelspecError, SyncConflict

    if plan.conflicts:
        lines = "\n".join(f"  {item.name}: {item.reason}" for item in plan.conflicts)
        return SyncConflict(
            f"{len(plan.conflicts)} kernelspec(s) in the way, nothing written for them:\n{lines}",
            hint="rename the entry in the config file, or remove the other kernelspec "
                 "(`jupyter kernelspec remove NAME`) if you no longer need it",
        )
    if result is not None and result.failed:
        lines = "\n".join(f"  {item.name} ({item.action}): {error}"
                          for item, error in result.failed)
        skipped = f"\n  pruning skipped: {result.prune_skipped}" if result.prune_skipped else ""
        return KernelspecError(
            f"{len(result.failed)} kernelspec(s) could not be written:\n{lines}{skipped}",
            hint=f"check the permissions of {plan.kernels_dir}, then run sync again",
        )
    return None

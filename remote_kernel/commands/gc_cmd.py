"""remote-kernel gc: reap orphaned remote kernels whose lease ran out, and stale files."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "gc", parents=[common], help="remove orphaned remote kernels and stale files",
        description="Stop orphaned remote kernels whose lease ran out, remove stale remote directories "
                    "and stale local connection files. A remote PID is checked to still be ours first. "
                    "Slurm kernels: cancel (scancel) our jobs whose kernel's lease ended or whose main "
                    "process is gone, and queued jobs whose launcher died, and remove their directories. "
                    "All hosts are asked at once; a host that cannot be reached gets one line on stderr.",
    )
    parser.add_argument("--host", help="only this [hosts] name or target")
    parser.add_argument("--dry-run", action="store_true", help="show what would be removed, change nothing")


def run(args: argparse.Namespace) -> int:
    import dataclasses
    from pathlib import Path

    from jupyter_core.paths import jupyter_runtime_dir

    from remote_kernel import console, inventory
    from remote_kernel.backends import slurm
    from remote_kernel.commands.ps_cmd import host_targets, report_failures
    from remote_kernel.errors import EXIT_FAILED, EXIT_OK

    runtime_dir = Path(jupyter_runtime_dir())
    abandoned = slurm.abandoned_jobs(runtime_dir)
    targets = [dataclasses.replace(t, abandoned_jobs=tuple(job for job, _ in abandoned.get(t.host.label, [])))
               for t in host_targets(args)]
    answers = inventory.ask_hosts(targets, {"mode": "gc", "dry_run": args.dry_run})
    failures = report_failures(answers, inventory.slurm_failures(answers))
    actions = inventory.gc_actions(answers)
    if not args.dry_run:
        forget_told_records(answers, abandoned)
    actions += [{"host": "local", **a} for a in inventory.local_garbage(runtime_dir, args.dry_run)]
    actions += _detached_garbage(targets, args.dry_run)
    if args.json:
        console.emit_json("gc", {"ok": not failures, "dry_run": args.dry_run, "actions": actions, "failures": failures})
    else:
        verb = "would" if args.dry_run else "did"
        console.emit_table(f"gc ({verb})", ["host", "action", "entry", "where"], [_row(a) for a in actions])
        if not actions:
            console.emit_line("nothing to clean up")
    return EXIT_FAILED if failures else EXIT_OK


def _detached_garbage(targets: list[Any], dry_run: bool) -> list[dict[str, Any]]:
    """Records of detached kernels whose kernel is gone from its host (its lease ended)."""
    from remote_kernel import detached
    from remote_kernel.commands.ps_cmd import service_status

    return detached.collect_garbage(service_status(), targets, dry_run=dry_run)


def forget_told_records(answers: list[Any], abandoned: dict[str, list[tuple[str, Any]]]) -> None:
    """The records of queued jobs whose launcher died, once their host was told (it cancelled
    those still PENDING; the others started and end by themselves)."""
    import contextlib

    for answer in answers:
        if answer.error is None and "slurm" in (answer.answer or {}):
            for _job, path in abandoned.get(answer.target.host.label, []):
                with contextlib.suppress(OSError):
                    path.unlink()


def _row(action: dict[str, Any]) -> list[str]:
    where = str(action.get("dir") or action.get("path") or "")
    if action["action"] == "cancel-job":
        node = f" on {action['node']}" if action.get("node") else ""
        where = f"job {action['job_id']} ({action['state']}{node}): {action['why']}"
        where += f"; failed: {action['error']}" if action.get("error") else ""
    return [action["host"], action["action"], str(action.get("name") or ""), where]

"""remote-kernel gc: reap orphaned remote kernels whose lease ran out, and stale files."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "gc", parents=[common], help="remove orphaned remote kernels and stale files",
        description="Stop orphaned remote kernels whose lease ran out, remove stale remote directories "
                    "and stale local connection files. A remote PID is checked to still be ours first. "
                    "All hosts are asked at once; a host that cannot be reached gets one line on stderr.",
    )
    parser.add_argument("--host", help="only this [hosts] name or target")
    parser.add_argument("--dry-run", action="store_true", help="show what would be removed, change nothing")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from jupyter_core.paths import jupyter_runtime_dir

    from remote_kernel import console, inventory
    from remote_kernel.commands.ps_cmd import host_targets, report_failures
    from remote_kernel.errors import EXIT_FAILED, EXIT_OK

    answers = inventory.ask_hosts(host_targets(args), {"mode": "gc", "dry_run": args.dry_run})
    failures = report_failures(answers)
    actions = inventory.gc_actions(answers)
    actions += [{"host": "local", **a} for a in inventory.local_garbage(Path(jupyter_runtime_dir()), args.dry_run)]
    if args.json:
        console.emit_json("gc", {"ok": not failures, "dry_run": args.dry_run, "actions": actions, "failures": failures})
    else:
        verb = "would" if args.dry_run else "did"
        rows = [[a["host"], a["action"], str(a.get("name") or ""), str(a.get("dir") or a.get("path") or "")]
                for a in actions]
        console.emit_table(f"gc ({verb})", ["host", "action", "entry", "where"], rows)
        if not actions:
            console.emit_line("nothing to clean up")
    return EXIT_FAILED if failures else EXIT_OK

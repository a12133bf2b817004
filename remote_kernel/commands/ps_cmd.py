"""remote-kernel ps: our kernels on the configured hosts."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "ps", parents=[common], help="list remote kernels started by remote-kernel on the configured hosts",
        description="List remote kernels on every configured host (entry, remote PIDs, age, attached or "
                    "orphaned, lease left). Connects to each host once.",
    )
    parser.add_argument("--host", help="only this [hosts] name or target")


def run(args: argparse.Namespace) -> int:
    from remote_kernel import console, inventory
    from remote_kernel.errors import EXIT_FAILED, EXIT_OK, RemoteKernelError

    rows: list[dict[str, Any]] = []
    failures: list[dict[str, str]] = []
    for target in host_targets(args):
        try:
            rows += inventory.describe_agents(target, inventory.ask_host(target, {"mode": "list"}))
        except RemoteKernelError as exc:
            failures.append({"host": target.host.label, "error": exc.message})
            console.emit_error(f"{target.host.label}: {exc}")
    if args.json:
        console.emit_json("ps", {"ok": not failures, "kernels": rows, "failures": failures})
    else:
        console.emit_table("remote kernels", ["host", "entry", "agent pid", "kernel pid", "age", "state", "lease left"],
                           [_row(r) for r in rows])
    return EXIT_FAILED if failures else EXIT_OK


def host_targets(args: argparse.Namespace) -> list[Any]:
    from remote_kernel import inventory
    from remote_kernel.config import discover_config_path, load_config

    loaded = load_config(discover_config_path(args.config))
    return inventory.targets_from_entries(list(loaded.entries().values()), list(loaded.host_entries().values()),
                                          args.host)


def _row(row: dict[str, Any]) -> list[str]:
    return [row["host"], str(row["name"] or "?"), str(row["agent_pid"] or "-"), str(row["kernel_pid"] or "-"),
            _seconds(row["age"]), row["state"], _seconds(row["lease_left"])]


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 120:
        return f"{value:.0f}s"
    return f"{value / 60:.0f}m" if value < 7200 else f"{value / 3600:.1f}h"

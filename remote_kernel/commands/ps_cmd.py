"""remote-kernel ps: our kernels on the configured hosts."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "ps", parents=[common], help="list remote kernels started by remote-kernel on the configured hosts",
        description="List remote kernels on every configured host (entry, remote PIDs, age, attached or "
                    "orphaned, lease left). Connects to all hosts at once; a host that cannot be reached "
                    "gets one line on stderr. A kernel reached through several configured hosts (aliases "
                    "of one account) is shown once, with all of them.",
    )
    parser.add_argument("--host", help="only this [hosts] name or target")


def run(args: argparse.Namespace) -> int:
    from remote_kernel import console, inventory
    from remote_kernel.errors import EXIT_FAILED, EXIT_OK

    answers = inventory.ask_hosts(host_targets(args), {"mode": "list"})
    failures = report_failures(answers)
    rows = inventory.describe_agents(answers)
    service = _service_status()
    if args.json:
        console.emit_json("ps", {"ok": not failures, "kernels": rows, "failures": failures,
                                 "service": service})
    else:
        if service is not None:
            from remote_kernel.commands.service_cmd import connection_rows

            console.emit_table(f"service connections (pid {service.get('pid')})",
                               ["host", "since", "kernels", "auth"], connection_rows(service))
        console.emit_table("remote kernels", ["host", "entry", "agent pid", "kernel pid", "age", "state", "lease left"],
                           [_row(r) for r in rows])
    return EXIT_FAILED if failures else EXIT_OK


def _service_status() -> dict[str, Any] | None:
    """The per-user service's connections and kernels, if it runs (ps never starts it)."""
    from remote_kernel.service import client

    try:
        return client.request("status")
    except client.ServiceUnavailable:
        return None


def report_failures(answers: list[Any]) -> list[dict[str, str]]:
    """One line on stderr per host that could not be asked (also for gc); the --json failures."""
    from remote_kernel import console

    failures = [{"host": a.target.host.label, "error": a.error} for a in answers if a.error is not None]
    for failure in failures:
        console.emit_error(f"{failure['host']}: {failure['error']}")
    return failures


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

"""remote-kernel ps: our kernels on the configured hosts."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "ps", parents=[common], help="list remote kernels started by remote-kernel on the configured hosts",
        description="List remote kernels on every configured host (entry, remote PIDs, age, attached or "
                    "orphaned, lease left; for Slurm kernels the job id, state, node and time left, and "
                    "queued jobs). Connects to all hosts at once (over the per-user service's connection "
                    "to a host when it holds one); a host that cannot be reached gets one line on stderr. "
                    "A kernel reached through several configured hosts (aliases of one account) is shown "
                    "once, with all of them.",
    )
    parser.add_argument("--host", help="only this [hosts] name or target")


def run(args: argparse.Namespace) -> int:
    from remote_kernel import console, inventory
    from remote_kernel.errors import EXIT_FAILED, EXIT_OK

    targets = _targets_if_configured(args)
    answers = inventory.ask_hosts(targets, {"mode": "list"}) if targets else []
    failures = report_failures(answers, inventory.slurm_failures(answers))
    rows = inventory.describe_agents(answers)
    service = service_status()
    detached_rows = _detached(service, rows)
    if args.json:
        console.emit_json("ps", {"ok": not failures, "kernels": rows, "failures": failures,
                                 "service": service, "detached": detached_rows})
    else:
        if service is not None:
            from remote_kernel.commands.service_cmd import connection_rows

            console.emit_table(f"service connections (pid {service.get('pid')})",
                               ["host", "since", "kernels", "auth"], connection_rows(service))
        _show_kernels(rows)
        if detached_rows:
            console.emit_table("detached kernels (remote-kernel attach|interrupt|stop ID)",
                               ["id", "entry", "host", "state", "clients", "lease left", "connection file"],
                               [_detached_row(r) for r in detached_rows])
    return EXIT_FAILED if failures else EXIT_OK


def service_status() -> dict[str, Any] | None:
    """The per-user service's connections and kernels, if it runs (ps never starts it)."""
    from remote_kernel.service import client

    try:
        return client.request("status")
    except client.ServiceUnavailable:
        return None


def _detached(service: dict[str, Any] | None, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from remote_kernel import detached

    return detached.describe(service, rows)


def _detached_row(row: dict[str, Any]) -> list[str]:
    lease = "(attached)" if row["state"] == "attached" else _seconds(row["lease_left"])
    return [row["id"], row["entry"], row["host"], row["state"], str(row["clients"]), lease, row["connection_file"]]


KERNEL_COLUMNS = ["host", "entry", "agent pid", "kernel pid", "age", "state", "lease left"]
JOB_COLUMNS = ["job", "job state", "node", "time left"]


def _show_kernels(rows: list[dict[str, Any]]) -> None:
    """The kernels' table; the job columns only when a row is a Slurm kernel's."""
    from remote_kernel import console

    jobs = any(row.get("job") for row in rows)
    console.emit_table("remote kernels", KERNEL_COLUMNS + (JOB_COLUMNS if jobs else []),
                       [_row(r) + (_job_cells(r.get("job")) if jobs else []) for r in rows])


def report_failures(answers: list[Any], more: list[dict[str, str]] | None = None) -> list[dict[str, str]]:
    """One line on stderr per host that could not be asked (also for gc), and per problem in
    ``more``; the --json failures."""
    from remote_kernel import console

    failures = [{"host": a.target.host.label, "error": a.error} for a in answers if a.error is not None]
    failures += more or []
    for failure in failures:
        console.emit_error(f"{failure['host']}: {failure['error']}")
    return failures


def _targets_if_configured(args: argparse.Namespace) -> list[Any]:
    """The configured hosts; none (said on stderr) when no config file is found and none was
    named: the service and the detached kernels need no config file."""
    import logging

    from remote_kernel.config import discover_config_path
    from remote_kernel.errors import ConfigError

    if not getattr(args, "config", None) and not args.host:
        try:
            discover_config_path(None)
        except ConfigError:
            logging.getLogger(__name__).warning(
                "no config file found: listing only the per-user service and detached kernels")
            return []
    return host_targets(args)


def host_targets(args: argparse.Namespace) -> list[Any]:
    from remote_kernel import inventory
    from remote_kernel.config import discover_config_path, load_config

    loaded = load_config(discover_config_path(args.config))
    return inventory.targets_from_entries(list(loaded.entries().values()), list(loaded.host_entries().values()),
                                          args.host)


def _row(row: dict[str, Any]) -> list[str]:
    return [row["host"], str(row["name"] or "?"), str(row["agent_pid"] or "-"), str(row["kernel_pid"] or "-"),
            _seconds(row["age"]), row["state"], _seconds(row["lease_left"])]


def _job_cells(job: dict[str, Any] | None) -> list[str]:
    if job is None:
        return ["-", "-", "-", "-"]
    state = job["state"] + (f" ({job['reason']})" if job.get("reason") and job["reason"] != "None" else "")
    return [job["id"], state, job.get("node") or "-", job.get("time_left") or "-"]


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 120:
        return f"{value:.0f}s"
    return f"{value / 60:.0f}m" if value < 7200 else f"{value / 3600:.1f}h"

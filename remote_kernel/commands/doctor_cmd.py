"""remote-kernel doctor [KERNEL | HOST]: what is wrong on the way to a kernel, step by step."""

from __future__ import annotations

import argparse
import logging
from typing import Any

# Loggers whose lines would repeat what a step says (a changed host key, the remote stderr of a
# failed round trip, the launch's progress line): quiet below -v, the steps carry the facts.
_REPEATING_LOGGERS = ("remote_kernel.ssh", "remote_kernel.launcher", "remote_kernel.remote",
                      "remote_kernel.progress", "remote_kernel.tunnel", "remote_kernel.bootstrap")
_MARK = {"ok": "ok", "warn": "warn", "fail": "FAIL", "skip": "skip"}
_STYLE = {"ok": "green", "warn": "yellow", "fail": "bold red", "skip": "dim"}


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "doctor", parents=[common], help="check every step a launch takes and say how to fix what fails",
        description="Walk the path a kernel launch takes: the config file, ~/.ssh/config resolution, DNS, TCP, "
                    "the SSH handshake, host key and authentication, the login shell, the remote python, "
                    "ipykernel and pyzmq, the private directory, the clock, and for a KERNEL a full round trip "
                    "(start, 1+1, shutdown). Each step is ok, warn or fail with its figure and, when not ok, the "
                    "fix. Without an argument every configured host is checked at once, one line each. Exit 0 "
                    "when nothing failed (warnings included), 1 otherwise, 2 for a bad config or usage.",
    )
    parser.add_argument("target", nargs="?", metavar="KERNEL | HOST",
                        help="a kernel name (every step, with a round trip), or a [hosts] name or "
                             "[user@]host[:port] (the host's steps)")
    parser.add_argument("--timeout", type=float, default=15.0, metavar="SECONDS",
                        help="bound of each connection step (default 15)")


def run(args: argparse.Namespace) -> int:
    from remote_kernel import doctor
    from remote_kernel.errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE, UsageError

    if args.timeout <= 0:
        raise UsageError(f"--timeout must be a positive number of seconds, found {args.timeout:g}")
    _quiet_repeating_logs(args)
    config, loaded = doctor.config_step(args.config, required=args.target is None)
    if config.status == "fail":
        _emit_config_failure(args, config)
        return EXIT_USAGE
    if args.target is None:
        plans = _plans(loaded)
        if not plans and not args.json:
            _print_step(config)
            _line("nothing else to check: the config has no hosts or kernels")
            return EXIT_OK
        reports = doctor.check_all(plans, config, timeout=args.timeout)
        _emit_all(args, reports)
        return EXIT_OK if all(report.ok for report in reports) else EXIT_FAILED
    report = _check_target(args, loaded, config)
    return EXIT_OK if report.ok else EXIT_FAILED


def _quiet_repeating_logs(args: argparse.Namespace) -> None:
    from remote_kernel import inventory

    inventory.silence_paramiko()
    if args.verbose <= 0:
        for name in _REPEATING_LOGGERS:
            logging.getLogger(name).setLevel(logging.CRITICAL)


def _plans(loaded: Any) -> list[tuple[Any, list[Any]]]:
    """One plan per distinct host (by label): its kernels, in file order; [hosts] tables no kernel
    uses (jump hosts too) get the host's steps only."""
    plans: dict[str, tuple[Any, list[Any]]] = {}
    for entry in loaded.entries().values():
        plans.setdefault(entry.host.label, (entry.host, []))[1].append(entry)
    for host in loaded.host_entries().values():
        plans.setdefault(host.label, (host, []))
    return list(plans.values())


def _check_target(args: argparse.Namespace, loaded: Any, config: Any) -> Any:
    from remote_kernel import doctor

    entries = loaded.entries() if loaded is not None else {}
    names = [*entries, *(loaded.host_entries() if loaded is not None else {})]
    entry = entries.get(args.target.lower())
    host = entry.host if entry is not None else _host(args.target, loaded)
    on_step = None if args.json else _print_step
    if not args.json:
        what = f"kernel {entry.name} on {host.label}" if entry is not None else f"host {host.label}"
        _line(f"remote-kernel doctor: {what}")
    report = doctor.check(host, [entry] if entry is not None else [], config, timeout=args.timeout,
                          round_trip=entry is not None, names=names, on_step=on_step)
    _emit_result(args, report)
    return report


def _host(target: str, loaded: Any) -> Any:
    """A [hosts] name, the hostname of a configured host, or an ad-hoc [user@]host[:port]."""
    from remote_kernel.entry import HostEntry
    from remote_kernel.errors import UsageError

    hosts = loaded.host_entries() if loaded is not None else {}
    if target in hosts:
        return hosts[target]
    if loaded is not None:
        for entry in [*hosts.values(), *(e.host for e in loaded.entries().values())]:
            if target in (entry.hostname, entry.label):
                return entry
    try:
        return HostEntry.from_target(target)
    except ValueError as exc:
        raise UsageError(f"{target!r} is neither a kernel nor a host in the config, nor a target: {exc}") from exc


# -- output ------------------------------------------------------------------------------------


def _line(text: str, style: str | None = None) -> None:
    from remote_kernel import console

    if style and console.stdout_is_terminal():
        from rich.markup import escape

        console.stdout_console().print(f"[{style}]{escape(text)}[/]", highlight=False, soft_wrap=True)
    else:
        console.emit_line(text)


def _print_step(step: Any) -> None:
    mark = _MARK.get(step.status, step.status)
    _line(f"  {mark:<5} {step.name:<18} {step.figure}", _STYLE.get(step.status))
    for detail in step.details:
        _line(f"{'':27}{detail}")
    if step.fix and step.status in ("fail", "warn"):
        _line(f"{'':27}fix: {step.fix}", _STYLE.get(step.status))


def _emit_result(args: argparse.Namespace, report: Any) -> None:
    from remote_kernel import console

    if args.json:
        console.emit_json("doctor", {"ok": report.ok, **report.to_dict()})
        return
    counts = {status: sum(1 for s in report.steps if s.status == status) for status in ("fail", "warn")}
    tally = ", ".join(f"{n} {'failed' if status == 'fail' else 'warning' + 's' * (n != 1)}"
                      for status, n in counts.items() if n)
    _line(f"{report.status}{': ' + tally if tally else ''} ({report.seconds:.1f} s)", _STYLE.get(report.status))


def _emit_config_failure(args: argparse.Namespace, config: Any) -> None:
    """Only the config step (a config that does not load stops everything: exit 2)."""
    from remote_kernel import console

    if args.json:
        console.emit_json("doctor", {"ok": False, "status": "fail", "steps": [config.to_dict()]})
    else:
        _print_step(config)


def _emit_all(args: argparse.Namespace, reports: list[Any]) -> None:
    from remote_kernel import console

    if args.json:
        console.emit_json("doctor", {"ok": all(r.ok for r in reports), "hosts": [r.to_dict() for r in reports]})
        return
    console.emit_table("remote-kernel doctor", ["host", "status", "kernels", "summary"],
                       [[r.host, r.status, ", ".join(r.kernels) or "-", _summary(r)] for r in reports])
    if not all(r.ok for r in reports):
        _line("every step of one host: remote-kernel doctor HOST (or KERNEL, with a round trip)")


def _summary(report: Any) -> str:
    problem = report.first_problem()
    if problem is None:
        taken = sum(1 for s in report.steps if s.status == "ok")
        return f"{taken} steps ok in {report.seconds:.1f} s"
    return f"{problem.name}: {problem.figure}" + (f" (fix: {problem.fix})" if problem.fix else "")

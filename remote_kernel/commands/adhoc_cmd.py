"""The v1.1 form: `remote-kernel -t [user@]host[:port] ...` starts an ad-hoc kernel."""

from __future__ import annotations

import argparse
from typing import Any

from remote_kernel.commands.install_cmd import add_target_options
from remote_kernel.commands.start_cmd import add_connection_file_option


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    """Registered as a hidden subcommand: cli.py inserts its name when argv starts with -t."""
    parser = subparsers.add_parser(
        "run-target", parents=[common],
        description="(v1.1) start an ad-hoc kernel on a target without a config entry.",
    )
    add_target_options(parser)
    add_connection_file_option(parser)


def run(args: argparse.Namespace) -> int:
    from remote_kernel.commands.start_cmd import launch

    return launch(entry_from_target_args(args), args.connection_file)


def entry_from_target_args(args: argparse.Namespace) -> Any:
    """A KernelEntry from v1.1 options (-t, -J, -i, -c, --python)."""
    from remote_kernel.entry import DEFAULT_PYTHON, HostEntry, KernelEntry, kernel_command
    from remote_kernel.errors import UsageError

    try:
        jumps = tuple(HostEntry.from_target(jump) for jump in args.jump)
        host = HostEntry.from_target(args.target, identity_file=args.identity, proxy_jump=jumps)
    except ValueError as exc:
        raise UsageError(f"-t/-J: {exc}") from exc
    command = tuple(kernel_command(args.kernel_command)) if args.kernel_command else None
    return KernelEntry(name=f"adhoc-{host.hostname}", host=host, display_name=args.target,
                       python=args.python or DEFAULT_PYTHON, command=command)

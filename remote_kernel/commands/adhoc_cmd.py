"""The v1.1 form: `remote-kernel -t [user@]host[:port] ...` starts an ad-hoc kernel."""

from __future__ import annotations

import argparse
from typing import Any

from remote_kernel.commands.install_cmd import add_target_options


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    """Registered as a hidden subcommand: cli.py inserts its name when argv starts with -t."""
    parser = subparsers.add_parser(
        "run-target", parents=[common],
        description="(v1.1) start an ad-hoc kernel on a target without a config entry.",
    )
    add_target_options(parser)
    parser.add_argument("-f", "--connection-file", metavar="FILE", help="the connection file to serve")


def run(args: argparse.Namespace) -> int:
    from remote_kernel.errors import RemoteKernelError

    raise RemoteKernelError("the -t form is not implemented yet")

"""remote-kernel ps: our kernels on the configured hosts."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "ps", parents=[common], help="list remote kernels started by remote-kernel on the configured hosts",
        description="List remote kernels (entry, remote PID, age, attached or orphaned, lease left).",
    )
    parser.add_argument("--host", help="only this [hosts] name or target")


def run(args: argparse.Namespace) -> int:
    from remote_kernel.errors import RemoteKernelError

    raise RemoteKernelError("ps is not implemented yet")

"""remote-kernel list: the config's kernel entries, their hosts, and whether each is in sync."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    subparsers.add_parser(
        "list", parents=[common], help="list kernel entries, their hosts and sync state",
        description="List the kernels declared in the config file.",
    )


def run(args: argparse.Namespace) -> int:
    from remote_kernel.errors import RemoteKernelError

    raise RemoteKernelError("list is not implemented yet")

"""remote-kernel gc: reap orphaned remote kernels whose lease ran out, and stale files."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "gc", parents=[common], help="remove orphaned remote kernels and stale files",
        description="Kill orphaned remote kernels whose lease ran out, remove stale remote directories "
                    "and stale local connection files.",
    )
    parser.add_argument("--host", help="only this [hosts] name or target")
    parser.add_argument("--dry-run", action="store_true", help="show what would be removed")


def run(args: argparse.Namespace) -> int:
    from remote_kernel.errors import RemoteKernelError

    raise RemoteKernelError("gc is not implemented yet")

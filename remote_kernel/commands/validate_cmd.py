"""remote-kernel validate: check the config file; exit 0 or 2."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    subparsers.add_parser(
        "validate", parents=[common], help="check the config file (exit 0 when valid, 2 when not)",
        description="Check the config file and report every problem at once.",
    )


def run(args: argparse.Namespace) -> int:
    from remote_kernel.errors import RemoteKernelError

    raise RemoteKernelError("validate is not implemented yet")

"""remote-kernel sync: make the installed kernelspecs match the config file."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "sync", parents=[common], help="make installed kernelspecs match the config file",
        description="Create, update and prune the Jupyter kernelspecs declared in the config file. "
                    "Only kernelspecs written by remote-kernel from this config file are ever modified or removed.",
    )
    parser.add_argument("--dry-run", action="store_true", help="show the plan, write nothing")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if anything would change (for CI)")
    parser.add_argument("--no-prune", action="store_true", help="keep kernelspecs whose entries were removed")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--user", action="store_true", help="install for the current user (default)")
    target.add_argument("--sys-prefix", action="store_true", help="install into sys.prefix (the active venv/conda env)")
    target.add_argument("--prefix", metavar="DIR", help="install into DIR/share/jupyter/kernels (e.g. for building images)")


def run(args: argparse.Namespace) -> int:
    from remote_kernel.errors import RemoteKernelError

    raise RemoteKernelError("sync is not implemented yet")

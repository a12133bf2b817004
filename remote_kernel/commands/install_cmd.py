"""remote-kernel install -t TARGET (v1.1): append an entry to the config file and sync it."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "install", parents=[common], help="(v1.1) add a kernel entry for a target to the config file and sync it",
        description="Append a [kernels.NAME] entry (and its host) to the config file, never rewriting "
                    "what is there, then sync that entry.",
    )
    add_target_options(parser)
    parser.add_argument("-n", "--name", help="kernel entry name (default: derived from the target)")
    parser.add_argument("-d", "--display-name", help="display name in Jupyter")
    parser.add_argument("--force", action="store_true", help="replace an existing entry with that name")


def add_target_options(parser: argparse.ArgumentParser) -> None:
    """The v1.1 target options shared by `install` and the ad-hoc `-t` launch."""
    parser.add_argument("-t", "--target", required=True, metavar="[USER@]HOST[:PORT]", help="the SSH target")
    parser.add_argument("-J", "--jump", action="append", default=[], metavar="JUMP", help="a ProxyJump hop; repeat for a chain")
    parser.add_argument("-i", "--identity", metavar="KEY", help="private key file")
    parser.add_argument("-c", "--command", dest="kernel_command", metavar="COMMAND", help="kernel command, e.g. 'python -m spyder_kernels.console'")
    parser.add_argument("--python", metavar="PYTHON", help="remote python (default: python3)")


def run(args: argparse.Namespace) -> int:
    from remote_kernel.errors import RemoteKernelError

    raise RemoteKernelError("install is not implemented yet")

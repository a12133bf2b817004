"""remote-kernel start NAME: launch a kernel entry from the config file."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "start", parents=[common], help="launch the kernel entry NAME from the config file",
        description="Start the remote kernel NAME and keep it alive until it is shut down. Without -f, "
                    "writes a connection file in the Jupyter runtime dir and prints how to attach to it.",
    )
    parser.add_argument("name", metavar="NAME", help="a [kernels.NAME] entry of the config file")
    parser.add_argument("-f", "--connection-file", metavar="FILE", help="the connection file to serve (Jupyter passes {connection_file})")


def run(args: argparse.Namespace) -> int:
    from remote_kernel.errors import RemoteKernelError

    raise RemoteKernelError("start is not implemented yet")

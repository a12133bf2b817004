"""remote-kernel from-spec KERNEL: launch from an installed kernelspec (what kernel.json runs)."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "from-spec", parents=[common], help="launch from an installed kernelspec (name or directory)",
        description="Launch the remote kernel described by a kernelspec written by `remote-kernel sync`. "
                    "Works without the config file.",
    )
    parser.add_argument("kernel", metavar="KERNEL", help="a kernelspec name on JUPYTER_PATH, or a directory holding kernel.json")
    parser.add_argument("-f", "--connection-file", metavar="FILE", help="the connection file to serve (Jupyter passes {connection_file})")


def run(args: argparse.Namespace) -> int:
    from remote_kernel.errors import RemoteKernelError

    raise RemoteKernelError("from-spec is not implemented yet")

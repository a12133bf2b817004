"""remote-kernel interrupt ID|NAME: interrupt the running cell of a detached kernel."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "interrupt", parents=[common], help="interrupt a detached kernel's running cell (SIGINT to it)",
        description="Send SIGINT to the detached kernel ID (KeyboardInterrupt in the running cell; the kernel "
                    "lives). Clients that attach with --existing, and JupyterLab for a kernel it adopted, cannot "
                    "interrupt a kernel they did not start: this can.",
    )
    from remote_kernel.commands.attach_cmd import add_kernel_argument

    add_kernel_argument(parser)


def run(args: argparse.Namespace) -> int:
    from remote_kernel import console
    from remote_kernel.commands.attach_cmd import runtime_dir
    from remote_kernel.service import client

    answer = client.converse("signal_kernel", kernel=args.kernel, signum=2, runtime_dir=runtime_dir())
    if args.json:
        console.emit_json("interrupt", {"ok": True, "id": answer.get("id"), "kernel": answer.get("name")})
    else:
        console.emit_line(f"interrupted kernel {answer.get('id')} ({answer.get('name')})")
    return 0

"""remote-kernel stop ID|NAME: shut a detached kernel down; nothing is left on its host or here."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "stop", parents=[common], help="shut a detached kernel down (nothing left remote, no local record)",
        description="Shut the detached kernel ID (or the only detached kernel of entry NAME) down: the remote "
                    "kernel gets SIGTERM, then SIGKILL after 3 s; its record and connection file are removed. A "
                    "kernel that is no longer on its host (its lease ended) is just forgotten.",
    )
    from remote_kernel.commands.attach_cmd import add_kernel_argument

    add_kernel_argument(parser)


def run(args: argparse.Namespace) -> int:
    from remote_kernel import console
    from remote_kernel.commands.attach_cmd import runtime_dir
    from remote_kernel.service import client

    answer = client.converse("stop_kernel", kernel=args.kernel, runtime_dir=runtime_dir())
    gone = bool(answer.get("gone"))
    if args.json:
        console.emit_json("stop", {"ok": True, "id": answer.get("id"), "kernel": answer.get("name"),
                                   "was_gone": gone})
    elif gone:
        console.emit_line(f"kernel {answer.get('id')} was no longer on its host (its lease ended, or it exited); "
                          "its record is removed")
    else:
        console.emit_line(f"kernel {answer.get('id')} ({answer.get('name')}) is shut down; nothing is left of it")
    return 0

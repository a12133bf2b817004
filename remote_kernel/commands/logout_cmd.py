"""remote-kernel logout HOST: close the service's connection to HOST (kernels on it keep it until they end)."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "logout", parents=[common], help="close the per-user service's connection to HOST",
        description="Forget the login to HOST: the service closes its connection now, or, when kernels use "
                    "it, as soon as the last of them ends. The next start on HOST authenticates again.",
    )
    parser.add_argument("host", metavar="HOST", help="a [hosts] name, a kernel name (its host), or [user@]host[:port]")


def run(args: argparse.Namespace) -> int:
    from remote_kernel import console
    from remote_kernel.commands.login_cmd import resolve_host
    from remote_kernel.errors import EXIT_OK
    from remote_kernel.service import client

    host = resolve_host(args.host, args.config)
    try:
        answer = client.request("logout", host=host.to_dict())
    except client.ServiceUnavailable:
        answer = {"kernels": 0, "running": False}
    kernels = int(answer.get("kernels") or 0)
    if args.json:
        console.emit_json("logout", {"ok": True, "host": host.name, "kernels_still_using": kernels})
    elif kernels:
        console.emit_line(f"logged out of {host.label}; {kernels} kernel(s) still use the connection: it closes "
                          "when the last one ends")
    else:
        console.emit_line(f"logged out of {host.label}: the connection is closed")
    return EXIT_OK

"""remote-kernel forward KERNEL REMOTE_PORT [LOCAL_PORT]: reach a port on a running kernel's host."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "forward", parents=[common], help="reach a port on a running kernel's host (a Dask dashboard, TensorBoard)",
        description="Serve 127.0.0.1:LOCAL_PORT (default: REMOTE_PORT, or a free port when that is taken) reaching "
                    "127.0.0.1:REMOTE_PORT on the host where KERNEL runs (the compute node of a Slurm kernel), "
                    "through the kernel's own connection: no SSH port forwarding, no second login. Returns at "
                    "once; the forward lasts as long as the kernel. Works for kernels run by the per-user "
                    "service (the default); for one served in-process, list the port in its entry's `forward`.",
    )
    parser.add_argument("kernel", metavar="KERNEL", help="the kernel: its entry's name, its detached id, or its "
                                                         "connection file")
    parser.add_argument("remote", metavar="REMOTE_PORT", type=_port, help="the port on the kernel's host")
    parser.add_argument("local", metavar="LOCAL_PORT", type=_port, nargs="?", help="the port here")


def _port(text: str) -> int:
    if text.isascii() and text.isdigit() and 1 <= int(text) <= 65535:
        return int(text)
    raise argparse.ArgumentTypeError(f"expected a port from 1 to 65535, found {text!r}")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from remote_kernel import console
    from remote_kernel.errors import EXIT_OK, UsageError
    from remote_kernel.service import client

    kernel = args.kernel
    if Path(kernel).expanduser().is_file():  # the service compares resolved paths
        kernel = str(Path(kernel).expanduser().resolve())
    try:
        answer = client.request("forward", kernel=kernel, remote=args.remote, local=args.local)
    except client.ServiceUnavailable as exc:
        raise UsageError(
            f"no per-user service runs, so no kernel can take an ad hoc forward ({exc.message})",
            hint="a kernel served in-process (REMOTE_KERNEL_SERVICE=off) cannot: add forward = "
                 f"[{args.remote}] to its entry and restart it") from exc
    if answer.get("event") == "error":
        client.raise_error(answer)
    if args.json:
        console.emit_json("forward", {"ok": True, **{key: answer.get(key) for key in (
            "name", "host", "remote", "local", "requested", "url", "connection_file")}})
        return EXIT_OK
    note = f" (port {answer.get('requested')} is taken here)" if answer.get("local") != answer.get("requested") else ""
    console.emit_line(f"{answer.get('url')} -> port {answer.get('remote')} on {answer.get('host')}{note}; "
                      f"kept while kernel {answer.get('name')} runs")
    return EXIT_OK

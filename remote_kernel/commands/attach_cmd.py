"""remote-kernel attach ID|NAME: serve a detached kernel's connection file again (after the
per-user service or this machine went down); and `start --detach`, which makes one."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "attach", parents=[common], help="serve a detached kernel here again (after a crash or a reboot)",
        description="Take a detached kernel (`start --detach`) over again in the per-user service: the same "
                    "connection file, key and ports where the ports are free (new ports and a rewritten file "
                    "where not, said below), so `jupyter console --existing`, Spyder and JupyterLab reconnect and "
                    "find every variable. Needed after the service was killed or this machine rebooted; while the "
                    "service runs the kernel is attached already. Output printed while nothing was attached is "
                    "not replayed.",
    )
    add_kernel_argument(parser)


def add_kernel_argument(parser: argparse.ArgumentParser) -> None:
    """ID|NAME, shared by attach, stop and interrupt."""
    parser.add_argument("kernel", metavar="ID|NAME", help="a detached kernel's id (`remote-kernel ps`), or its "
                                                          "entry's name when only one of that entry is detached")


def run(args: argparse.Namespace) -> int:
    from remote_kernel.service import client

    answer = client.converse("attach", kernel=args.kernel, runtime_dir=runtime_dir())
    _announce(answer, json_output=args.json, verb="attached")
    return 0


def start_detached(entry: Any, lease: str | None, *, json_output: bool) -> int:
    """`start NAME --detach`: the service starts and keeps the kernel; we return once it is ready."""
    from remote_kernel.entry import parse_duration
    from remote_kernel.errors import UsageError
    from remote_kernel.service import client

    seconds = None
    if lease is not None:
        try:
            seconds = parse_duration(lease)
        except ValueError as exc:
            raise UsageError(f"--lease: {exc}") from None
        if seconds <= 0:
            raise UsageError("--lease must be greater than 0")
    answer = client.converse("detach", entry=entry.to_dict(), lease=seconds, runtime_dir=runtime_dir())
    _announce(answer, json_output=json_output, verb="started")
    return 0


def runtime_dir() -> str:
    from jupyter_core.paths import jupyter_runtime_dir

    return str(jupyter_runtime_dir())


def _announce(answer: dict[str, Any], *, json_output: bool, verb: str) -> None:
    from remote_kernel import console

    path, kernel_id, name = answer["connection_file"], answer["id"], answer["name"]
    if json_output:
        console.emit_json(verb if verb == "attached" else "start", {
            "ok": True, "id": kernel_id, "kernel": name, "host": answer.get("host"), "connection_file": path,
            "existing": f"jupyter console --existing {path}", "detached": True,
            "already_attached": bool(answer.get("already")), "new_ports": bool(answer.get("rebound")),
            "stop": f"remote-kernel stop {kernel_id}"}, one_line=True)
        return
    if answer.get("already"):
        console.emit_line(f"Kernel {kernel_id} ({name}) is attached already: the per-user service serves it.")
    else:
        console.emit_line(f"Kernel {kernel_id} ({name}) {verb} on {answer.get('host')}, detached: it runs until "
                          f"`remote-kernel stop {kernel_id}`.")
    if answer.get("rebound"):
        console.emit_line("Its old ports were taken: it is served on new ports, and the connection file was "
                          "rewritten; clients must connect again with it.")
    console.emit_line("To connect a client:")
    console.emit_line(f"    jupyter console --existing {path}")
    console.emit_line("JupyterLab lists it among its running kernels when started with "
                      "--ServerApp.allow_external_kernels=True.")
    console.emit_line(f"Interrupt a running cell: `remote-kernel interrupt {kernel_id}`. Stop the kernel: "
                      f"`remote-kernel stop {kernel_id}`.")

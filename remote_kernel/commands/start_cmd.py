"""remote-kernel start NAME: launch a kernel entry from the config file."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "start", parents=[common], help="launch the kernel entry NAME from the config file",
        description="Start the remote kernel NAME and keep it alive until it is shut down. Without -f, "
                    "writes a connection file in the Jupyter runtime dir and prints how to attach to it. "
                    "Ctrl-C interrupts the running cell; Ctrl-\\ or SIGTERM stops the kernel.",
    )
    parser.add_argument("name", metavar="NAME", help="a [kernels.NAME] entry of the config file")
    add_connection_file_option(parser)


def add_connection_file_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-f", "--connection-file", metavar="FILE", type=Path,
                        help="the connection file to serve (Jupyter passes {connection_file}); "
                             "default: a new one in the Jupyter runtime dir")


def run(args: argparse.Namespace) -> int:
    from remote_kernel.config import discover_config_path, load_config

    loaded = load_config(discover_config_path(args.config))
    return launch(loaded.entry(args.name), args.connection_file)


def launch(entry: Any, connection_file: Path | None) -> int:
    """Serve ``entry`` (shared by start, from-spec and the v1.1 -t form)."""
    from remote_kernel import console
    from remote_kernel.launcher import Launcher

    console.set_log_entry(entry.name)
    announce = _announce if connection_file is None else None
    return Launcher(entry, connection_file, announce=announce).run()


def _announce(path: Path, entry: Any) -> None:
    from remote_kernel import console

    console.emit_line(f"Kernel {entry.name!r} is running on {entry.host.label}.")
    console.emit_line("To connect a client (Ctrl-C interrupts, Ctrl-\\ stops the kernel):")
    console.emit_line(f"    jupyter console --existing {path}")

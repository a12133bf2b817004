"""remote-kernel start NAME: launch a kernel entry from the config file."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from remote_kernel.config import LoadedConfig
    from remote_kernel.entry import KernelEntry


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "start", parents=[common], help="launch the kernel entry NAME from the config file",
        description="Start the remote kernel NAME and keep it alive until it is shut down. Without -f, "
                    "writes a connection file in the Jupyter runtime dir and prints how to attach to it "
                    "(with --json: one JSON document once the kernel is ready). Interrupt a running cell "
                    "with Ctrl-C here or `kill -INT <launcher pid>`: clients attached with --existing "
                    "cannot interrupt it. Ctrl-\\ or SIGTERM stops the kernel.",
    )
    parser.add_argument("name", metavar="NAME", help="a [kernels.NAME] entry of the config file")
    add_connection_file_option(parser)
    parser.add_argument("--detach", action="store_true",
                        help="hand the kernel to the per-user service and return once it is ready: it outlives "
                             "this terminal, Jupyter and (for its lease) the service and this machine; prints its "
                             "id for `attach` and `stop`")
    parser.add_argument("--lease", metavar="DURATION",
                        help="with --detach: how long the remote host keeps the kernel while nothing is attached "
                             "(seconds, or \"90m\", \"12h\", \"3d\"; default: the entry's detached_lease, 3d)")


def add_connection_file_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-f", "--connection-file", metavar="FILE", type=Path,
                        help="the connection file to serve (Jupyter passes {connection_file}); "
                             "default: kernel-<ssh user>@<host>.json in the Jupyter runtime dir (the SSH "
                             "login user and the host as the config or -t names it; -2, -3... if that "
                             "one is in use)")


def run(args: argparse.Namespace) -> int:
    from remote_kernel.config import discover_config_path, load_config
    from remote_kernel.errors import UsageError

    loaded = load_config(discover_config_path(args.config))
    entry = find_entry(loaded, args.name)
    if args.detach:
        from remote_kernel.commands.attach_cmd import start_detached

        if args.connection_file is not None:
            raise UsageError("--detach chooses its connection file (in Jupyter's external_kernels directory): "
                             "leave out -f")
        return start_detached(entry, args.lease, json_output=args.json)
    if args.lease is not None:
        raise UsageError("--lease goes with --detach", hint=f"remote-kernel start {entry.name} --detach --lease 12h")
    return launch(entry, args.connection_file, json_output=args.json)


def find_entry(loaded: LoadedConfig, name: str) -> KernelEntry:
    """The entry ``name``; a usage error with "did you mean" when there is none."""
    from remote_kernel.errors import UsageError
    from remote_kernel.suggest import did_you_mean

    try:
        return loaded.entry(name)
    except UsageError as exc:
        suggestion = did_you_mean(name, loaded.entries())
        if not suggestion:
            raise
        raise UsageError(f"{exc.message}; {suggestion}", hint=exc.hint) from None


def launch(entry: Any, connection_file: Path | None, *, json_output: bool = False) -> int:
    """Serve ``entry`` (shared by start, from-spec and the v1.1 -t form).

    The "how to connect" text is printed only for a connection file we chose (under Jupyter, -f is
    given and stdout is not the user's); with --json, one document is printed in every case.
    """
    from remote_kernel import console
    from remote_kernel.errors import RemoteKernelError

    console.set_log_entry(entry.name)
    announcer = _Announcer(json_output=json_output)
    announce = announcer if json_output or connection_file is None else None
    try:
        return _serve(entry, connection_file, announce)
    except RemoteKernelError as exc:
        if not announcer.done or not json_output:
            raise
        # The ready document is out: a second one (cli.py's error document) would break readers.
        console.emit_error(str(exc))
        return exc.exit_code


def _serve(entry: Any, connection_file: Path | None, announce: Any) -> int:
    """Through the per-user service (it holds the host's authenticated connection and serves the
    ports; this process relays the kernel's lifecycle), else in this process as before
    (REMOTE_KERNEL_SERVICE=off, or no service could be reached or started)."""
    import logging

    from remote_kernel import service

    if service.enabled():
        from jupyter_core.paths import jupyter_runtime_dir

        from remote_kernel.service.client import HostedLaunch, ServiceUnavailable

        try:
            runtime_dir = Path(jupyter_runtime_dir())
            return HostedLaunch(entry, connection_file, runtime_dir=runtime_dir, announce=announce).run()
        except ServiceUnavailable as exc:
            logging.getLogger(__name__).info("serving kernel %s in this process: the per-user service is not "
                                             "available (%s)", entry.name, exc.message)
    from remote_kernel.launcher import Launcher  # the data path's modules: only when served here

    return Launcher(entry, connection_file, announce=announce).run()


class _Announcer:
    """Says once, when the kernel is first ready, how to connect, interrupt and stop it."""

    def __init__(self, *, json_output: bool) -> None:
        self.json_output = json_output
        self.done = False

    def __call__(self, path: Path, entry: Any) -> None:
        if self.done:  # a reattach reports ready again; the user was told already
            return
        self.done = True
        if self.json_output:
            _announce_json(path, entry)
        else:
            _announce_text(path, entry)


def _announce_text(path: Path, entry: Any) -> None:
    import os

    from remote_kernel import console

    pid = os.getpid()
    console.emit_line(f"Kernel {entry.name!r} is running on {entry.host.label}. To connect a client:")
    console.emit_line(f"    jupyter console --existing {path}")
    # jupyter console / qtconsole refuse to interrupt a kernel they did not start (issue 12, item 12).
    console.emit_line(f"Interrupt a running cell: Ctrl-C in this terminal, or `kill -INT {pid}` (this launcher); "
                      "clients attached with --existing cannot interrupt it.")
    console.emit_line(f"Stop the kernel: Ctrl-\\ in this terminal, or `kill {pid}`.")


def _announce_json(path: Path, entry: Any) -> None:
    import os

    from remote_kernel import console

    pid = os.getpid()
    console.emit_json("start", {
        "ok": True, "kernel": entry.name, "display_name": entry.display_name, "host": entry.host.label,
        "connection_file": str(path), "existing": f"jupyter console --existing {path}",
        "launcher_pid": pid, "interrupt": f"kill -INT {pid}", "stop": f"kill {pid}",
        "interrupt_mode": entry.interrupt_mode,
    }, one_line=True)

"""The v1.1 form: `remote-kernel -t [user@]host[:port] ...` starts an ad-hoc kernel."""

from __future__ import annotations

import argparse
from typing import Any

from remote_kernel.commands.install_cmd import add_target_options
from remote_kernel.commands.start_cmd import add_connection_file_option


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    """Registered as a hidden subcommand: cli.py inserts its name when argv starts with -t."""
    parser = subparsers.add_parser(
        "run-target", parents=[common], prog="remote-kernel",  # the user typed no command name
        description="(v1.1) start an ad-hoc kernel on a target without a config entry.",
    )
    add_target_options(parser)
    add_connection_file_option(parser)


def run(args: argparse.Namespace) -> int:
    from remote_kernel.commands.start_cmd import launch
    from remote_kernel.errors import LaunchError

    try:
        return launch(entry_from_target_args(args), args.connection_file, json_output=args.json)
    except LaunchError as exc:
        exc.hint = exc.hint and in_option_words(exc.hint)
        raise


# The launcher's hints name config keys; the -t form sets the same things with options.
_KEY_TO_OPTION = (("set `python` to", "pass `--python` with"), ("`python`", "`--python`"), ("`command`", "`-c`"))


def in_option_words(hint: str) -> str:
    """A launcher hint for the -t form: `--python` and `-c` instead of the config keys."""
    for key, option in _KEY_TO_OPTION:
        hint = hint.replace(key, option)
    return hint


def entry_from_target_args(args: argparse.Namespace) -> Any:
    """A KernelEntry from v1.1 options (-t, -J, -i, -c, --python)."""
    from remote_kernel.entry import DEFAULT_PYTHON, HostEntry, KernelEntry, kernel_command
    from remote_kernel.errors import UsageError

    try:
        jumps = tuple(HostEntry.from_target(jump) for jump in args.jump)
        host = HostEntry.from_target(args.target, identity_file=args.identity, proxy_jump=jumps)
    except ValueError as exc:
        raise UsageError(f"-t/-J: {exc}") from exc
    command = tuple(kernel_command(args.kernel_command)) if args.kernel_command else None
    return KernelEntry(name=f"adhoc-{host.hostname}", host=host, display_name=args.target,
                       python=args.python or DEFAULT_PYTHON, command=command)

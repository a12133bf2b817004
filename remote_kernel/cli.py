"""The command line: argument parsing, dispatch, and the one place errors become exit codes.

Each command lives in ``remote_kernel/commands/<name>.py`` with ``register(subparsers, common)``
and ``run(args) -> int``. Command modules import only argparse at module level and defer heavy
imports (pydantic, paramiko, jupyter_client, rich) to ``run`` so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from remote_kernel import __version__
from remote_kernel.errors import EXIT_INTERRUPTED, EXIT_USAGE, RemoteKernelError

log = logging.getLogger(__name__)

# Command name -> module in remote_kernel.commands (order = order in --help).
COMMANDS: dict[str, str] = {
    "sync": "sync_cmd",
    "start": "start_cmd",
    "from-spec": "from_spec_cmd",
    "list": "list_cmd",
    "validate": "validate_cmd",
    "install": "install_cmd",
    "ps": "ps_cmd",
    "gc": "gc_cmd",
    "doctor": "doctor_cmd",
    "discover": "discover_cmd",
    "login": "login_cmd",
    "logout": "logout_cmd",
    "service": "service_cmd",
    "attach": "attach_cmd",
    "stop": "stop_cmd",
    "interrupt": "interrupt_cmd",
    "forward": "forward_cmd",
}
# The v1.1 form `python -m remote_kernel -t host ...` runs this hidden command.
ADHOC_COMMAND = "run-target"
LAUNCH_COMMANDS = frozenset(("start", "from-spec", ADHOC_COMMAND))
ADHOC_MODULE = "adhoc_cmd"
_ADHOC_FLAGS = ("-t", "--target")


class CommandModule(Protocol):
    def register(self, subparsers: Any, common: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace) -> int: ...


class _UsageExit(Exception):  # noqa: N818 - a control-flow signal, not an error
    def __init__(self, status: int, message: str | None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors through our handler (exit 2, no SystemExit mid-flight)."""

    def exit(self, status: int = 0, message: str | None = None) -> Any:
        raise _UsageExit(status, message)

    def error(self, message: str) -> Any:
        raise _UsageExit(EXIT_USAGE, f"{self.format_usage()}{self.prog}: error: {message}\n")


def global_options(*, suppress: bool) -> argparse.ArgumentParser:
    """Options accepted before or after the command. Subparsers use SUPPRESS defaults so a
    value given before the command is not reset by the subparser."""
    default: Any = argparse.SUPPRESS if suppress else None
    common = _Parser(add_help=False)
    group = common.add_argument_group("global options")
    group.add_argument("--config", metavar="FILE", default=default,
                       help="config file (default: $REMOTE_KERNEL_CONFIG, ./remote-kernels.toml, "
                            "then ~/.config/remote-kernel/remote-kernels.toml)")
    group.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS if suppress else 0,
                       help="more log output (-vv debug, -vvv includes paramiko)")
    group.add_argument("-q", "--quiet", action="count", default=argparse.SUPPRESS if suppress else 0,
                       help="only errors")
    group.add_argument("--json", action="store_true", default=argparse.SUPPRESS if suppress else False,
                       help="print one JSON document on stdout and nothing else")
    return common


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser, or with ``only`` one command's subparser: importing and registering all
    nine costs ~5 ms, on every kernel start (from-spec)."""
    parser = _Parser(
        prog="remote-kernel",
        description="Run Jupyter kernels on remote machines over SSH, declared in remote-kernels.toml.",
        parents=[global_options(suppress=False)],
        epilog="v1.1 form: remote-kernel -t [user@]host[:port] [-J jump]... [-i key] [-c command] "
               "[--python P] [-f file].  Log level without -v/-q: $REMOTE_KERNEL_LOG "
               "(debug, info, warning, error).",
    )
    parser.add_argument("--version", action="version", version=f"remote-kernel {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    common = global_options(suppress=True)
    names = [*COMMANDS.values(), ADHOC_MODULE] if only is None else [_module_of(only)]
    for module_name in names:
        _command_module(module_name).register(subparsers, common)
    # argparse has no hidden subcommands: drop the v1.1 one from the listing in --help, and from
    # the "invalid choice ... (choose from ...)" list, which argparse builds by iterating choices.
    subparsers._choices_actions = [
        action for action in subparsers._choices_actions if action.dest != ADHOC_COMMAND
    ]
    subparsers.choices = subparsers._name_parser_map = _HiddenChoices(subparsers.choices)
    return parser


class _HiddenChoices(dict[str, Any]):
    """The subcommand map: lookups find every command, iteration (listings) skips the hidden one."""

    def __iter__(self) -> Iterator[str]:
        return (name for name in super().__iter__() if name != ADHOC_COMMAND)


def _module_of(command: str) -> str:
    return ADHOC_MODULE if command == ADHOC_COMMAND else COMMANDS[command]


def _command_module(module_name: str) -> CommandModule:
    module: Any = importlib.import_module(f"remote_kernel.commands.{module_name}")
    return module  # type: ignore[no-any-return]


def _insert_adhoc_command(argv: list[str]) -> list[str]:
    """`remote-kernel [-v] -t host ...` (v1.1) means the hidden ad-hoc command."""
    for index, arg in enumerate(argv):
        if arg in COMMANDS or arg == ADHOC_COMMAND or arg in ("-h", "--help", "--version"):
            return argv
        if arg in _ADHOC_FLAGS or arg.startswith("--target=") or (arg.startswith("-t") and len(arg) > 2):
            return [*argv[:index], ADHOC_COMMAND, *argv[index:]]
    return argv


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    args_list = _insert_adhoc_command(list(sys.argv[1:] if argv is None else argv))
    command = next((arg for arg in args_list if arg in COMMANDS or arg == ADHOC_COMMAND), None)
    if command is not None:
        try:
            return build_parser(only=command).parse_args(args_list)
        except _UsageExit as exc:
            if exc.status == 0:  # the command's --help: the same from either parser
                raise
    # No command, or a usage error (said with the whole command list), or the guess was wrong
    # (a value such as `--config list`): the full parser decides.
    return build_parser().parse_args(args_list)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the program; return the exit code (0 ok, 1 failed or drift, 2 usage/config, 130 interrupted)."""
    try:
        args = parse_args(argv)
    except _UsageExit as exc:
        if exc.message:
            (sys.stderr if exc.status else sys.stdout).write(exc.message)
        return exc.status
    if not args.command:
        build_parser().print_help()
        return EXIT_USAGE
    from remote_kernel import console

    explicit = bool(args.verbose or args.quiet)
    default_level = None if explicit else console.level_from_environment()
    if default_level is None and not explicit and args.command in LAUNCH_COMMANDS:
        # A launch says what it does by default: connected, kernel pid, ready in N s (under Jupyter
        # these lines land in the server log with the time and the kernel's name).
        default_level = logging.INFO
    console.setup_logging(args.verbose - args.quiet, default_level=default_level)
    return _run_command(args)


def _run_command(args: argparse.Namespace) -> int:
    from remote_kernel import console

    try:
        return _command_module(_module_of(args.command)).run(args)
    except RemoteKernelError as exc:
        log.debug("%s failed: %s", args.command, type(exc).__name__)
        if getattr(args, "json", False):
            console.emit_json(args.command, {"ok": False, "error": _error_document(exc)})
        console.emit_error(str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        console.emit_error("interrupted")
        return EXIT_INTERRUPTED


def _error_document(exc: RemoteKernelError) -> dict[str, Any]:
    document: dict[str, Any] = {"type": type(exc).__name__, "message": exc.message, "hint": exc.hint}
    problems = getattr(exc, "problems", None)
    if problems:
        document["problems"] = [
            {"file": p.path, "line": p.line, "column": p.column, "key": p.key, "message": p.message}
            for p in problems
        ]
    return document

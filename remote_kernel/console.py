"""All terminal output: logging setup, result printing, the --json envelope.

rich is imported lazily: ``remote-kernel --help`` and the ``from-spec`` launch path must stay fast,
and under Jupyter (stderr not a TTY) plain log lines are all we need.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

JSON_SCHEMA_VERSION = 1
LOG_FORMAT_PLAIN = "%(asctime)s %(levelname)-7s [%(rk_entry)s] %(message)s"

LOG_ENV_VAR = "REMOTE_KERNEL_LOG"
_LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}

_entry_name = "remote-kernel"


class _EntryFilter(logging.Filter):
    """Stamps every record with the kernel entry it belongs to (one launcher = one entry)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.rk_entry = _entry_name
        return True


def set_log_entry(name: str) -> None:
    """Name the kernel entry this process serves; every log line carries it."""
    global _entry_name  # noqa: PLW0603 - one process serves one entry; a module value is simplest
    _entry_name = name


def verbosity_to_level(verbosity: int) -> int:
    """-q -> ERROR, default WARNING... -v INFO, -vv DEBUG, -vvv DEBUG incl. third-party."""
    if verbosity <= -1:
        return logging.ERROR
    if verbosity == 0:
        return logging.WARNING
    if verbosity == 1:
        return logging.INFO
    return logging.DEBUG


def level_from_environment() -> int | None:
    """The level named by ``$REMOTE_KERNEL_LOG`` (debug, info, warning, error), or None.

    The way to raise a launcher's log level without editing kernel.json: Jupyter passes its own
    environment to the kernelspec's argv. An invalid value is reported once and ignored.
    """
    value = os.environ.get(LOG_ENV_VAR, "").strip()
    if not value:
        return None
    level = _LOG_LEVELS.get(value.lower())
    if level is None:
        sys.stderr.write(f"remote-kernel: warning: ${LOG_ENV_VAR}={value!r} is not one of "
                         f"{', '.join(_LOG_LEVELS)}; ignored\n")
    return level


def setup_logging(verbosity: int, *, default_level: int | None = None) -> None:
    """Rich on a terminal, plain lines when stderr is not a TTY (e.g. under Jupyter)."""
    level = verbosity_to_level(verbosity) if default_level is None or verbosity != 0 else default_level
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    handler: logging.Handler
    if _stderr_is_terminal():
        from rich.logging import RichHandler

        handler = RichHandler(console=stderr_console(), show_path=False, markup=False)
        handler.setFormatter(logging.Formatter("[%(rk_entry)s] %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(LOG_FORMAT_PLAIN, datefmt="%H:%M:%S"))
    handler.addFilter(_EntryFilter())
    root.addHandler(handler)
    root.setLevel(level)
    # Third-party debug logs stay quiet below -vvv (paramiko's transport log is very chatty).
    third_party = logging.DEBUG if verbosity >= 3 else max(level, logging.WARNING)
    for name in ("paramiko", "asyncio", "traitlets"):
        logging.getLogger(name).setLevel(third_party)


def _stderr_is_terminal() -> bool:
    return sys.stderr.isatty() and os.environ.get("TERM") != "dumb"


def stdout_is_terminal() -> bool:
    return sys.stdout.isatty() and os.environ.get("TERM") != "dumb"


def stderr_console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


def stdout_console() -> Any:
    from rich.console import Console

    return Console()


def emit_json(command: str, payload: dict[str, Any], *, one_line: bool = False) -> None:
    """The only thing a --json run writes on stdout: one versioned document.

    ``one_line`` for a process that keeps running after it (start): a reader can take the first
    line (`| head -n 1`) instead of parsing a stream that never ends.
    """
    document = {"remote_kernel_json": JSON_SCHEMA_VERSION, "command": command, **payload}
    sys.stdout.write(json.dumps(document, indent=None if one_line else 2, sort_keys=False) + "\n")
    sys.stdout.flush()


def emit_line(text: str = "") -> None:
    """A plain line of human output on stdout."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def emit_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """A table on stdout: rich on a terminal, tab-separated plain text otherwise."""
    if stdout_is_terminal():
        from rich.table import Table

        table = Table(title=title)
        for column in columns:
            table.add_column(column)
        for row in rows:
            table.add_row(*row)
        stdout_console().print(table)
        return
    emit_line("\t".join(columns))
    for row in rows:
        emit_line("\t".join(row))


def emit_error(message: str) -> None:
    """A user-facing error on stderr (never a traceback)."""
    if _stderr_is_terminal():
        from rich.markup import escape

        stderr_console().print(f"[bold red]error:[/] {escape(message)}")
    else:
        sys.stderr.write(f"remote-kernel: error: {message}\n")
    sys.stderr.flush()

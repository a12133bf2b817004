"""All terminal output: logging setup, result printing, the --json envelope.

rich is imported lazily: ``remote-kernel --help`` and the ``from-spec`` launch path must stay fast,
and under Jupyter (stderr not a TTY) plain log lines are all we need.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

JSON_SCHEMA_VERSION = 1
LOG_FORMAT_PLAIN = "%(asctime)s %(levelname)-7s [%(rk_entry)s] %(message)s"

LOG_ENV_VAR = "REMOTE_KERNEL_LOG"
# The steps of a launch (connecting, setup, starting, ready): plain INFO lines under Jupyter, one
# live status line on a terminal. A record with ``extra={"final": True}`` ends the status line.
PROGRESS_LOGGER = "remote_kernel.progress"
STATUS_TICK = 0.5  # seconds between updates of the status line's timer
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
    _setup_progress(level, terminal=_stderr_is_terminal())
    # Third-party debug logs stay quiet below -vvv (paramiko's transport log is very chatty).
    third_party = logging.DEBUG if verbosity >= 3 else max(level, logging.WARNING)
    for name in ("paramiko", "asyncio", "traitlets"):
        logging.getLogger(name).setLevel(third_party)


def _setup_progress(level: int, *, terminal: bool) -> None:
    """On a terminal, a status line (unless -q); otherwise INFO log lines at the log level."""
    progress = logging.getLogger(PROGRESS_LOGGER)
    for old in list(progress.handlers):
        progress.removeHandler(old)
    progress.setLevel(logging.INFO if terminal and level <= logging.WARNING else level)
    progress.propagate = not terminal
    if terminal:
        handler = _StatusHandler()
        handler.addFilter(_EntryFilter())
        progress.addHandler(handler)


class _StatusHandler(logging.Handler):
    """Drives one transient rich status line from progress records, with the seconds spent in the
    current step; the final record ("ready in 3.4 s") is printed for good and ends the line."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self._status: Any = None
        self._text = ""
        self._since = 0.0
        self._guard = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        from rich.markup import escape  # the entry name in brackets is not markup

        message = escape(f"[{getattr(record, 'rk_entry', '')}] {record.getMessage()}")
        with self._guard:
            if getattr(record, "final", False):
                self._stop()
                stderr_console().print(message, highlight=False)
                return
            self._text, self._since = message, time.monotonic()
            if self._status is None:
                self._status = stderr_console().status(message)
                self._status.start()
                threading.Thread(target=self._tick, name="rk-status", daemon=True).start()
            else:
                self._status.update(message)

    def _tick(self) -> None:
        while True:
            time.sleep(STATUS_TICK)
            with self._guard:
                if self._status is None:
                    return
                elapsed = time.monotonic() - self._since
                if elapsed >= 1:
                    self._status.update(f"{self._text} ({elapsed:.0f} s)")

    def _stop(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None

    def stop(self) -> None:
        with self._guard:
            self._stop()


def stop_progress() -> None:
    """End a status line still on screen (before an error is printed under it)."""
    for handler in logging.getLogger(PROGRESS_LOGGER).handlers:
        if isinstance(handler, _StatusHandler):
            handler.stop()


def _stderr_is_terminal() -> bool:
    return sys.stderr.isatty() and os.environ.get("TERM") != "dumb"


def stdout_is_terminal() -> bool:
    return sys.stdout.isatty() and os.environ.get("TERM") != "dumb"


@functools.cache
def stderr_console() -> Any:
    """One Console for stderr: log lines and the status line must share it to interleave cleanly."""
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
    stop_progress()
    if _stderr_is_terminal():
        from rich.markup import escape

        stderr_console().print(f"[bold red]error:[/] {escape(message)}")
    elif _entry_name != "remote-kernel":
        # A launcher's error lands in Jupyter's server log among other kernels' lines: say when and whose.
        sys.stderr.write(f"{time.strftime('%H:%M:%S')} ERROR   [{_entry_name}] remote-kernel: error: {message}\n")
    else:
        sys.stderr.write(f"remote-kernel: error: {message}\n")
    sys.stderr.flush()

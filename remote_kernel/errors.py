"""The user-facing errors of remote-kernel.

Every failure a user can act on is a RemoteKernelError; cli.py maps them to exit codes in one
place. Lower layers translate third-party exceptions into these (``raise SSHError(...) from exc``)
so that messages always name the file, key or host and say how to fix the problem.
"""

from __future__ import annotations

from dataclasses import dataclass

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class RemoteKernelError(Exception):
    """Base class: an operation failed in a way the user can understand (exit code 1)."""

    exit_code = EXIT_FAILED

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class UsageError(RemoteKernelError):
    """Bad command-line usage (exit code 2)."""

    exit_code = EXIT_USAGE


@dataclass(frozen=True)
class ConfigProblem:
    """One problem found in a config file: where it is, and what was expected vs found."""

    path: str
    key: str
    message: str
    line: int | None = None
    column: int | None = None

    def location(self) -> str:
        where = self.path
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        return where

    def __str__(self) -> str:
        key = f" {self.key}:" if self.key else ""
        return f"{self.location()}:{key} {self.message}"


class ConfigError(RemoteKernelError):
    """The config file is missing, malformed or invalid (exit code 2). Carries every problem."""

    exit_code = EXIT_USAGE

    def __init__(self, problems: list[ConfigProblem], *, hint: str | None = None) -> None:
        self.problems = list(problems)
        count = len(self.problems)
        head = f"{count} problem{'s' if count != 1 else ''} in config"
        super().__init__(head + ":\n" + "\n".join(f"  {p}" for p in self.problems), hint=hint)


class KernelspecError(RemoteKernelError):
    """A kernelspec could not be found, read or written."""


class SyncConflict(RemoteKernelError):  # noqa: N818 - reads as what it reports
    """Sync found a kernelspec it does not own where it wanted to write one."""


class SSHError(RemoteKernelError):
    """Connecting or authenticating to an SSH host failed."""

    def __init__(self, message: str, *, host: str, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.host = host


class HostKeyError(SSHError):
    """The host key of a host is unknown or has changed."""


class LaunchError(RemoteKernelError):
    """The remote kernel could not be started, or died."""

    def __init__(self, message: str, *, stderr_tail: str = "", hint: str | None = None) -> None:
        if stderr_tail:
            message = f"{message}\n  remote stderr (last lines):\n" + "\n".join(
                f"    {line}" for line in stderr_tail.rstrip().splitlines()
            )
        super().__init__(message, hint=hint)
        self.stderr_tail = stderr_tail

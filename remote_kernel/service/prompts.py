"""Who answers authentication's questions (ssh.Prompter): a terminal, SSH_ASKPASS, or nobody.

Standard library only; ssh/auth.py asks ``default_prompter()`` when no prompter was injected (the
per-user service injects its own: the `login` terminal, or "nobody yet, run login"). Answers are
secrets: they are returned, never logged or stored.
"""

from __future__ import annotations

import getpass
import logging
import os
import subprocess
import sys
from collections.abc import Mapping

log = logging.getLogger(__name__)

ASKPASS_TIMEOUT = 300.0  # a person reads the dialog and types a code


class TerminalPrompter:
    """Asks on the controlling terminal (getpass reads /dev/tty, never a pipe)."""

    def ask(self, host: str, prompt: str, *, echo: bool, kind: str, instructions: str = "") -> str | None:
        if instructions:
            sys.stderr.write(instructions.rstrip() + "\n")
        try:
            return input(prompt) if echo else getpass.getpass(prompt)
        except EOFError:
            return None


class AskpassPrompter:
    """Asks through an SSH_ASKPASS program, as OpenSSH does: the prompt is its only argument, the
    answer its standard output; a non-zero exit is "cancelled" (no answer, nothing sent)."""

    def __init__(self, program: str, env: Mapping[str, str] | None = None) -> None:
        self.program = program
        self.env = dict(env) if env is not None else None

    def ask(self, host: str, prompt: str, *, echo: bool, kind: str, instructions: str = "") -> str | None:
        text = f"{instructions.rstrip()}\n{prompt}" if instructions else prompt
        env = {**os.environ, **self.env} if self.env is not None else None
        if echo and env is not None:
            env["SSH_ASKPASS_PROMPT"] = "none"  # not a secret: some programs then show the typing
        try:
            done = subprocess.run([self.program, text], capture_output=True, timeout=ASKPASS_TIMEOUT,
                                  check=False, env=env, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("SSH_ASKPASS program %s could not ask for %s: %s", self.program, host, exc)
            return None
        if done.returncode != 0:
            log.info("SSH_ASKPASS program %s: no answer for %s (exit status %d)", self.program, host,
                     done.returncode)
            return None
        return done.stdout.decode("utf-8", "replace").rstrip("\r\n")


def askpass_program(env: Mapping[str, str], *, terminal: bool) -> str | None:
    """The SSH_ASKPASS program OpenSSH would use with ``env`` (SSH_ASKPASS_REQUIRE: "force" always,
    "prefer" when a display exists, "never" not at all; unset: only without a terminal and with a
    display), or None."""
    program = env.get("SSH_ASKPASS")
    require = (env.get("SSH_ASKPASS_REQUIRE") or "").lower()
    display = bool(env.get("DISPLAY") or env.get("WAYLAND_DISPLAY"))
    if not program or require == "never":
        return None
    if require == "force":
        return program
    if require == "prefer":
        return program if display else None
    return program if display and not terminal else None


def stdin_is_a_terminal() -> bool:
    """Can a person answer here? (OpenSSH asks when stdin is a TTY.)"""
    return sys.stdin is not None and sys.stdin.isatty()


def default_prompter(*, terminal: bool | None = None) -> TerminalPrompter | AskpassPrompter | None:
    """What an in-process connection asks: SSH_ASKPASS when OpenSSH would use it, else the
    terminal when there is one (``terminal``: stdin is a TTY, by default looked up here), else
    nobody (the error then says what to run)."""
    if terminal is None:
        terminal = stdin_is_a_terminal()
    program = askpass_program(os.environ, terminal=terminal)
    if program is not None:
        return AskpassPrompter(program)
    return TerminalPrompter() if terminal else None



"""Authentication: ssh-agent keys, key files, then keyboard-interactive or password.

Every question (a key's passphrase, a TOTP code, Duo's choice, a password) goes to a Prompter:
the one injected with ``prompts_through`` (the per-user service relays its questions to
`remote-kernel login`), else the default of remote_kernel.service.prompts (SSH_ASKPASS, or the
terminal when there is one, as OpenSSH decides). Nothing here reads the terminal itself. Errors
list what was tried (paths, fingerprints), never key material or answers.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
import os
import shlex
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from remote_kernel.errors import SSHError
from remote_kernel.ssh._paramiko import key_classes, paramiko
from remote_kernel.ssh.config import ResolvedHost
from remote_kernel.ssh.hostkeys import fingerprint
from remote_kernel.ssh.tracing import trace, tracing

log = logging.getLogger("remote_kernel.ssh")  # one logger for the package: doctor quiets it, -v names it

PASSPHRASE_ATTEMPTS = 3

class Prompter(Protocol):
    """Asks the user one question: a key's passphrase (``kind`` "passphrase"), a keyboard-interactive
    prompt (a TOTP code, Duo's choice: "keyboard-interactive") or a password ("password"). Returns
    the answer, or None when nobody can answer; may raise an SSHError to end the attempt at once.
    Answers are secrets: never logged, stored, or put in argv or a file."""

    def ask(self, host: str, prompt: str, *, echo: bool, kind: str, instructions: str = "") -> str | None: ...


_prompting = threading.local()


@contextlib.contextmanager
def prompts_through(prompter: Prompter) -> Iterator[list[str]]:
    """Authentication on this thread asks ``prompter`` instead of the terminal or SSH_ASKPASS
    (the per-user service relays its questions to `remote-kernel login`); yields the list that
    the methods which succeeded are appended to ("publickey", "keyboard-interactive", "password")."""
    previous = getattr(_prompting, "context", None)
    methods: list[str] = []
    _prompting.context = (prompter, methods)
    try:
        yield methods
    finally:
        _prompting.context = previous


def _prompter() -> Prompter | None:
    """The injected prompter, else the default one (SSH_ASKPASS or the terminal, as OpenSSH decides),
    else None."""
    context = getattr(_prompting, "context", None)
    if context is not None:
        prompter: Prompter = context[0]
        return prompter
    from remote_kernel.service.prompts import default_prompter

    return default_prompter()


def _note_auth(method: str) -> None:
    context = getattr(_prompting, "context", None)
    if context is not None:
        context[1].append(method)


@dataclass
class _AuthReport:
    """What was tried, for the error message: paths and fingerprints, never key material."""

    host: str = ""
    tried: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    encrypted: list[str] = field(default_factory=list)


def _agent_keys() -> list[paramiko.AgentKey]:
    if not os.environ.get("SSH_AUTH_SOCK"):
        return []
    try:
        return list(paramiko.Agent().get_keys())
    except (paramiko.SSHException, OSError) as exc:
        log.info("ssh-agent at $SSH_AUTH_SOCK is not usable: %s", exc)
        return []


def _public_blob(private_path: str) -> bytes | None:
    """The key's public half from ``PATH.pub``, to find it in the agent without decrypting."""
    try:
        fields = Path(private_path + ".pub").read_text().split()
        return base64.b64decode(fields[1]) if len(fields) >= 2 else None
    except (OSError, ValueError, binascii.Error):
        return None


def _load_key_file(path: str, passphrase: str | None) -> paramiko.PKey:
    """Any key type paramiko supports. Raises PasswordRequiredException for an encrypted key
    without passphrase, SSHException when unreadable (or the passphrase is wrong)."""
    if passphrase is None:
        unreadable = (TypeError, ValueError, paramiko.pkey.UnknownKeyType, paramiko.SSHException)
        with contextlib.suppress(*unreadable):
            return paramiko.PKey.from_path(path)  # also loads PATH-cert.pub
    # paramiko 5's from_path cannot decrypt (it hands cryptography a str): try each key class
    for key_class in key_classes():
        try:
            key = key_class.from_private_key_file(path, password=passphrase)
        except paramiko.PasswordRequiredException:
            raise
        except (paramiko.SSHException, ValueError, TypeError, IndexError, UnicodeDecodeError):
            continue
        with contextlib.suppress(OSError, ValueError, paramiko.SSHException):
            if Path(path + "-cert.pub").is_file():
                key.load_certificate(path + "-cert.pub")
        return key
    wrong = "wrong passphrase" if passphrase is not None else "not a private key paramiko can read"
    raise paramiko.SSHException(wrong)


def _unlock_key(path: str, report: _AuthReport) -> paramiko.PKey | None:
    """Ask for an encrypted key's passphrase through the prompter (a terminal, SSH_ASKPASS, or
    `remote-kernel login` through the per-user service); without one, the error says so."""
    prompter = _prompter()
    for attempt in range(PASSPHRASE_ATTEMPTS):
        passphrase = None if prompter is None else prompter.ask(
            report.host, f"Enter passphrase for key '{path}': ", echo=False, kind="passphrase")
        if passphrase is None and attempt == 0:
            report.encrypted.append(path)
            return None
        if not passphrase:
            break
        try:
            return _load_key_file(path, passphrase)
        except paramiko.SSHException:
            log.warning("wrong passphrase for %s", path)
    report.problems.append(f"{path}: not unlocked")
    return None


def _file_key(path: str, report: _AuthReport) -> paramiko.PKey | None:
    if not Path(path).is_file():
        report.problems.append(f"{path}: no such file")
        return None
    try:
        return _load_key_file(path, None)
    except paramiko.PasswordRequiredException:
        return _unlock_key(path, report)
    except (paramiko.SSHException, OSError) as exc:
        report.problems.append(f"{path}: {exc}")
        return None


def _candidate_keys(hop: ResolvedHost, report: _AuthReport) -> Iterator[tuple[str, paramiko.PKey]]:
    """Identity files first (through the agent when it holds them: no passphrase needed), then
    the agent's other keys unless IdentitiesOnly. Files are loaded only when reached."""
    agent = _agent_keys()
    used: set[bytes] = set()
    for path in hop.identity_files:
        blob = _public_blob(path)
        in_agent = next((k for k in agent if blob is not None and k.asbytes() == blob), None)
        key = in_agent or _file_key(path, report)
        if key is not None and key.asbytes() not in used:
            used.add(key.asbytes())
            yield (f"{path} (via ssh-agent)" if in_agent else path), key
    if hop.identities_only and hop.identity_files:
        return
    for key in agent:
        if key.asbytes() not in used:
            yield f"ssh-agent key {key.get_name()} {fingerprint(key.asbytes())}", key


def authenticate(transport: paramiko.Transport, hop: ResolvedHost) -> None:
    report = _AuthReport(host=hop.label)
    allowed: list[str] = []
    if tracing():
        allowed = _allowed_methods(transport, hop.user)
        trace("auth_offered", hop, methods=allowed)
        if transport.is_authenticated():  # the server wants no authentication at all
            trace("auth", hop, method="none")
            return
    for label, key in _candidate_keys(hop, report):
        try:
            remaining = transport.auth_publickey(hop.user, key)
        except paramiko.BadAuthenticationType as exc:
            allowed = list(exc.allowed_types)
            break
        except paramiko.AuthenticationException:
            report.tried.append(label)
            continue
        except paramiko.SSHException as exc:  # e.g. the agent refused to sign
            if not transport.is_active():
                raise
            report.problems.append(f"{label}: {exc}")
            continue
        log.debug("authenticated to %s as %s with public key %s", hop.address, hop.user, label)
        trace("auth", hop, method="publickey", key=label)
        _note_auth("publickey")
        if remaining and not _interactive_auth(transport, hop, remaining):
            raise _auth_error(hop, report, remaining)
        return
    allowed = allowed or _allowed_methods(transport, hop.user)
    if not _interactive_auth(transport, hop, allowed):
        raise _auth_error(hop, report, allowed)



def _allowed_methods(transport: paramiko.Transport, user: str) -> list[str]:
    try:
        transport.auth_none(user)
    except paramiko.BadAuthenticationType as exc:
        return list(exc.allowed_types)
    except paramiko.SSHException:
        return []
    return []


def _interactive_auth(transport: paramiko.Transport, hop: ResolvedHost, allowed: list[str]) -> bool:
    """keyboard-interactive (2FA codes, Duo, passwords) or password, through the prompter. A
    question nobody answers ends the attempt without sending a guess (a wrong answer counts
    against the account: vscode-remote-release#2010)."""
    prompter = _prompter()  # looked up here: paramiko calls ``answer`` on its transport thread
    if prompter is None:
        return False

    def ask(prompt: str, echo: bool, kind: str, instructions: str = "") -> str:
        reply = prompter.ask(hop.label, prompt, echo=echo, kind=kind, instructions=instructions)
        if reply is None:
            raise SSHError(f"authentication to {hop.label} needs an answer to {prompt.strip()!r} and got none",
                           host=hop.label, hint=f"run `remote-kernel login {hop.alias}` in a terminal")
        return reply

    def answer(title: str, instructions: str, prompts: list[tuple[str, bool]]) -> list[str]:
        note = "\n".join(text for text in (title, instructions) if text.strip())
        return [ask(prompt or "Response: ", echo, "keyboard-interactive", note) for prompt, echo in prompts]

    try:
        if "keyboard-interactive" in allowed:
            remaining = transport.auth_interactive(hop.user, answer)
        elif "password" in allowed:
            remaining = transport.auth_password(hop.user, ask(f"{hop.user}@{hop.hostname}'s password: ", False,
                                                              "password"))
        else:
            return False
    except paramiko.AuthenticationException:
        return False
    log.debug("authenticated to %s as %s interactively", hop.address, hop.user)
    method = "keyboard-interactive" if "keyboard-interactive" in allowed else "password"
    trace("auth", hop, method=method)
    _note_auth(method)
    return not remaining or _interactive_auth(transport, hop, remaining)


def _auth_error(hop: ResolvedHost, report: _AuthReport, allowed: list[str]) -> SSHError:
    lines = [f"authentication to {hop.label} failed"]
    if report.tried:
        lines.append("  the server refused: " + ", ".join(report.tried))
    lines += [f"  {path}: encrypted, and there is no terminal to ask for its passphrase" for path in report.encrypted]
    lines += [f"  {problem}" for problem in report.problems]
    if not (report.tried or report.encrypted or report.problems):
        lines.append("  no key to try: no identity file exists and no ssh-agent has keys (SSH_AUTH_SOCK)")
    if allowed:
        lines.append(f"  the server accepts: {', '.join(allowed)}")
    if report.encrypted:
        hint = "add the key to ssh-agent (ssh-add " + " ".join(map(shlex.quote, report.encrypted)) + ") and retry"
    else:
        hint = (
            f"put your public key in ~{hop.user}/.ssh/authorized_keys on {hop.hostname},"
            " or set identity_file to a key the server accepts"
        )
    return SSHError("\n".join(lines), host=hop.label, hint=hint)



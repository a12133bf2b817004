"""Host keys, checked as OpenSSH checks them, never with paramiko's AutoAddPolicy.

A known key must match; an unknown key is refused ("strict") or recorded ("accept-new"); a
changed or @revoked key is refused under every policy, with a message that says where the old key
is and how to remove it once the new one is verified. known_hosts files are read here (hashed
names, patterns, negations, markers), not by paramiko.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from remote_kernel.errors import HostKeyError
from remote_kernel.ssh.config import DEFAULT_PORT, DEFAULT_USER_KNOWN_HOSTS, ResolvedHost
from remote_kernel.ssh.tracing import trace

if TYPE_CHECKING:
    import paramiko

log = logging.getLogger("remote_kernel.ssh")  # one logger for the package: doctor quiets it, -v names it

@dataclass(frozen=True)
class KnownHostKey:
    """One known_hosts line that matched a host name."""

    path: str
    line: int
    key_type: str
    key_blob: bytes
    marker: str = ""  # "", "@revoked" or "@cert-authority"

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


def _pattern_matches(pattern: str, name: str) -> bool:
    if pattern.startswith("|1|"):
        return _hashed_name_matches(pattern, name)
    # OpenSSH patterns know only * and ?; "[host]:port" brackets are literal
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern.lower())
    return re.fullmatch(regex, name.lower()) is not None


def _hashed_name_matches(pattern: str, name: str) -> bool:
    """``|1|salt|hash`` entries (HashKnownHosts yes): HMAC-SHA1 of the name keyed by the salt."""
    try:
        _, _, salt_b64, hash_b64 = pattern.split("|")
        salt, expected = base64.b64decode(salt_b64), base64.b64decode(hash_b64)
    except (ValueError, binascii.Error):
        return False
    digest = hmac.new(salt, name.lower().encode(), hashlib.sha1).digest()
    return hmac.compare_digest(digest, expected)


def host_matches(patterns: str, name: str) -> bool:
    """OpenSSH's rule: any positive pattern matches and no negated (``!``) pattern does."""
    matched = False
    for pattern in patterns.split(","):
        negated = pattern.startswith("!")
        if _pattern_matches(pattern.removeprefix("!"), name):
            if negated:
                return False
            matched = True
    return matched


def _parse_known_hosts_line(text: str) -> tuple[str, str, str, bytes] | None:
    """``[@marker] patterns keytype base64 [comment]`` -> (marker, patterns, keytype, blob)."""
    fields = text.split()
    if not fields or fields[0].startswith("#"):
        return None
    marker = fields.pop(0) if fields[0].startswith("@") else ""
    if len(fields) < 3:
        return None
    try:
        blob = base64.b64decode(fields[2], validate=True)
    except (ValueError, binascii.Error):
        return None
    return marker, fields[0], fields[1], blob


def find_known_keys(files: Sequence[str], name: str) -> list[KnownHostKey]:
    """Every known_hosts line in ``files`` whose host patterns match ``name``."""
    found = []
    for path in files:
        try:
            lines = Path(path).read_text(errors="replace").splitlines()
        except OSError:
            continue
        for number, text in enumerate(lines, start=1):
            parsed = _parse_known_hosts_line(text)
            if parsed and host_matches(parsed[1], name):
                marker, _, key_type, blob = parsed
                found.append(KnownHostKey(path, number, key_type, blob, marker))
    return found


def record_host_key(path: Path, name: str, key_type: str, key_base64: str) -> None:
    """Append ``name keytype key`` to a known_hosts file (created 0600 in a 0700 directory)."""
    if not path.parent.exists():
        path.parent.mkdir(mode=0o700, parents=True)
    needs_newline = path.is_file() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a") as out:
        out.write(("\n" if needs_newline else "") + f"{name} {key_type} {key_base64}\n")


def fingerprint(blob: bytes) -> str:
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def verify_host_key(hop: ResolvedHost, server_key: paramiko.PKey, known: list[KnownHostKey], via: str) -> None:
    blob, key_type = server_key.asbytes(), server_key.get_name()
    revoked = [k for k in known if k.marker == "@revoked" and k.key_blob == blob]
    if revoked:
        raise HostKeyError(
            f"the host key of {hop.label} ({key_type} {fingerprint(blob)}) is marked @revoked"
            f" in {revoked[0].where}; refusing to connect",
            host=hop.label,
            hint="ask the server's administrator for its current host key",
        )
    plain = [k for k in known if not k.marker]
    if any(k.key_blob == blob for k in plain):
        where = next(k.where for k in plain if k.key_blob == blob)
        log.debug("host key of %s matches %s", hop.label, where)
        trace("host_key", hop, match=where)
        return
    if plain:
        raise _changed_key_error(hop, key_type, blob, plain)
    if hop.host_key_policy == "accept-new":
        _accept_new_key(hop, key_type, server_key.get_base64(), blob)
        return
    raise _unknown_key_error(hop, key_type, blob, via)


def _changed_key_error(hop: ResolvedHost, key_type: str, blob: bytes, old: list[KnownHostKey]) -> HostKeyError:
    first = old[0]
    where = ", ".join(k.where for k in old)
    removal = f"ssh-keygen -R {shlex.quote(hop.known_hosts_name)} -f {shlex.quote(first.path)}"
    log.warning(
        "HOST KEY CHANGED for %s: remove line %d of %s if the change is expected",
        hop.label,
        first.line,
        first.path,
    )
    return HostKeyError(
        f"HOST KEY CHANGED for {hop.label}: the server presents {key_type} {fingerprint(blob)},"
        f" but {where} holds a different key ({first.key_type} {fingerprint(first.key_blob)})."
        " Someone may be intercepting the connection, or the server was reinstalled; refusing"
        " to connect under every host_key_policy",
        host=hop.label,
        hint=f"only after verifying the new key with the server's administrator, remove line"
        f" {first.line} of {first.path} (or run: {removal}) and connect again",
    )


def _unknown_key_error(hop: ResolvedHost, key_type: str, blob: bytes, via: str) -> HostKeyError:
    target = hop.known_hosts[0] if hop.known_hosts else DEFAULT_USER_KNOWN_HOSTS[0]
    quoted = shlex.quote(target)
    port = f"-p {hop.port} " if hop.port != DEFAULT_PORT else ""
    commands = []
    if not via and not hop.host_key_alias and not hop.proxy_command:  # ssh-keyscan reaches none of these
        commands.append(f"ssh-keyscan {port}{hop.hostname} >> {quoted}")
    options = f"-J {shlex.quote(via)} " if via else ""
    if hop.proxy_command and not via:
        options += f"-o ProxyCommand={shlex.quote(hop.proxy_command)} "
    if hop.host_key_alias:
        options += f"-o HostKeyAlias={shlex.quote(hop.host_key_alias)} "
    commands.append(f"ssh {options}-o UserKnownHostsFile={quoted} {port}{hop.user}@{hop.hostname}")
    checked = ", ".join(hop.known_hosts) or "(none)"
    return HostKeyError(
        f"the host key of {hop.label} is unknown: {key_type} {fingerprint(blob)} is not in"
        f" {checked} under {hop.known_hosts_name!r};"
        " refusing to connect (host_key_policy = strict)",
        host=hop.label,
        hint=f"verify the fingerprint with the server's administrator, then record it in {target}"
        " with:\n      " + "\n   or ".join(commands) + '\n   or set host_key_policy = "accept-new" for this host',
    )


def _accept_new_key(hop: ResolvedHost, key_type: str, key_base64: str, blob: bytes) -> None:
    if not hop.known_hosts:
        raise HostKeyError(f"no known_hosts file to record the key of {hop.label} in", host=hop.label)
    target = Path(hop.known_hosts[0])
    try:
        record_host_key(target, hop.known_hosts_name, key_type, key_base64)
    except OSError as exc:
        raise HostKeyError(
            f"cannot record the host key of {hop.label} in {target}: {exc.strerror}",
            host=hop.label,
            hint="fix the file's permissions or set known_hosts to a writable file",
        ) from exc
    log.warning(
        "Permanently added %s key %s for %s to %s (host_key_policy = accept-new)",
        key_type,
        fingerprint(blob),
        hop.known_hosts_name,
        target,
    )
    trace("host_key", hop, recorded=str(target))


def prefer_known_key_types(transport: paramiko.Transport, known: list[KnownHostKey]) -> None:
    """Ask for a host key type we already know, as OpenSSH does, so a server with several host
    keys is not mistaken for a changed one."""
    options = transport.get_security_options()
    wanted: list[str] = []
    for key in known:
        types = ("rsa-sha2-512", "rsa-sha2-256") if key.key_type == "ssh-rsa" else (key.key_type,)
        wanted += [t for t in types if t in options.key_types and t not in wanted]
    if wanted:
        options.key_types = [*wanted, *(t for t in options.key_types if t not in wanted)]



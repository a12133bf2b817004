"""SSH: resolve a host like ``ssh`` does, verify its key, authenticate once, run commands.

The only module that imports paramiko, and it does so lazily (``import paramiko`` costs ~0.1 s;
``remote-kernel --help`` must stay fast). Every paramiko/socket exception leaves this module as an
SSHError or HostKeyError naming the host and saying what to do.

Host keys are checked like OpenSSH checks them, never with paramiko's AutoAddPolicy: a known key
must match; an unknown key is refused ("strict") or recorded ("accept-new"); a changed key is
refused under every policy. We drive ``paramiko.Transport`` directly (not SSHClient) so each hop of
a ProxyJump chain is verified by the same code before anything is sent to it.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import getpass
import glob
import hashlib
import hmac
import importlib
import importlib.util
import logging
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import types
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from remote_kernel.entry import DEFAULT_KEEPALIVE, HOST_KEY_POLICIES, HostEntry, parse_target
from remote_kernel.errors import ConfigError, ConfigProblem, HostKeyError, SSHError

if TYPE_CHECKING:
    import paramiko
else:

    class _LazyParamiko:
        """``import paramiko`` costs ~0.1 s: load it on first use, not when ssh.py is imported
        (mypy sees the real module above)."""

        def __getattr__(self, name: str) -> Any:
            return getattr(_load_paramiko(), name)

    paramiko = _LazyParamiko()


def _load_paramiko() -> Any:
    """paramiko, imported without two costs it adds to every kernel start (bench/README.md):
    - invoke: paramiko.config imports it (~30 ms) only to run ``Match exec`` lines of an
      ssh_config; _SSHConfig hands it over when a config has one (_enable_match_exec);
    - importlib.metadata: paramiko imports it (~10 ms: email, zipfile, csv...) for one call,
      ``metadata.version("paramiko")``; a stand-in answers it from the dist-info directory name.
    Both stand-ins leave sys.modules as soon as paramiko is loaded.
    Locked: while one thread imports it, sys.modules holds a half-initialised paramiko that a
    second thread (two kernels starting at once in the service or the provisioner) must not use."""
    with _PARAMIKO_LOCK:
        return _import_paramiko()


_PARAMIKO_LOCK = threading.Lock()


def _import_paramiko() -> Any:
    module = sys.modules.get("paramiko")
    if module is not None:
        return module
    stand_ins: dict[str, Any] = {}
    if "invoke" not in sys.modules:
        stand_ins["invoke"] = None  # `import invoke` fails at once
    if "importlib.metadata" not in sys.modules:
        stand_ins["importlib.metadata"] = _VersionOnlyMetadata("importlib.metadata")
    sys.modules.update(stand_ins)
    try:
        return importlib.import_module("paramiko")
    finally:
        for name, stand_in in stand_ins.items():
            if name in sys.modules and sys.modules[name] is stand_in:
                del sys.modules[name]


class _VersionOnlyMetadata(types.ModuleType):
    """What paramiko's ``from importlib import metadata; metadata.version("paramiko")`` needs."""

    @staticmethod
    def version(distribution: str) -> str:
        spec = importlib.util.find_spec(distribution)
        if spec is not None and spec.origin:
            site_dir = Path(spec.origin).parent.parent
            prefix = distribution.lower().replace("-", "_") + "-"
            with contextlib.suppress(OSError):
                for name in os.listdir(site_dir):
                    if name.lower().startswith(prefix) and name.endswith(".dist-info"):
                        return name[len(prefix):-len(".dist-info")]
        # Not a plain wheel install (egg, zip...): ask the real module.
        if isinstance(sys.modules.get("importlib.metadata"), _VersionOnlyMetadata):
            del sys.modules["importlib.metadata"]
        real = importlib.import_module("importlib.metadata")
        return str(real.version(distribution))


def _enable_match_exec() -> None:
    """Give paramiko.config the invoke that _load_paramiko kept from it (or, when invoke is not
    installed, the ImportError paramiko would have stored and raises for ``Match exec``)."""
    config_module = importlib.import_module("paramiko.config")
    if config_module.invoke is not None:
        return
    try:
        setattr(config_module, "invoke", importlib.import_module("invoke"))  # noqa: B010 - untyped global
    except ImportError as exc:
        setattr(config_module, "invoke_import_error", exc)  # noqa: B010 - untyped global

log = logging.getLogger(__name__)
_T = TypeVar("_T")

DEFAULT_PORT = 22
DEFAULT_SSH_CONFIG = "~/.ssh/config"
DEFAULT_KEY_FILES = ("~/.ssh/id_ed25519", "~/.ssh/id_ecdsa", "~/.ssh/id_rsa")
DEFAULT_USER_KNOWN_HOSTS = ("~/.ssh/known_hosts", "~/.ssh/known_hosts2")
DEFAULT_GLOBAL_KNOWN_HOSTS = ("/etc/ssh/ssh_known_hosts", "/etc/ssh/ssh_known_hosts2")
# AES-GCM was the fastest paramiko cipher measured (ANCHORS.md); the rest keep paramiko's order.
PREFERRED_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")
MAX_JUMPS = 16
# The window we grant the remote side for one exec channel's output. paramiko's default (2 MiB)
# capped a kernel's 50 MB of output at ~1.3x OpenSSH's time; 16 MiB brought it to ~1.1x (bench/).
CHANNEL_WINDOW = 16 * 1024 * 1024
PASSPHRASE_ATTEMPTS = 3
_CHUNK = 65536


# -- resolution --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResolvedHost:
    """What we actually connect to, after ~/.ssh/config and defaults."""

    alias: str
    hostname: str
    port: int
    user: str
    identity_files: tuple[str, ...]
    known_hosts: tuple[str, ...]  # files checked; the first one is where accept-new records
    host_key_policy: str = "strict"
    keepalive: float = DEFAULT_KEEPALIVE
    jumps: tuple[ResolvedHost, ...] = ()
    host_key_alias: str | None = None  # ssh_config HostKeyAlias: the known_hosts name to use
    identities_only: bool = False  # ssh_config IdentitiesOnly: no other agent keys
    proxy_command: str | None = None  # ssh_config ProxyCommand, tokens expanded; never with jumps

    @property
    def address(self) -> str:
        host = f"[{self.hostname}]" if ":" in self.hostname else self.hostname
        return f"{host}:{self.port}"

    @property
    def label(self) -> str:
        """``alice@lab.example.org:22``, plus ``(alias)`` when the alias differs."""
        text = f"{self.user}@{self.address}"
        return text if self.alias in (self.hostname, self.address) else f"{text} ({self.alias})"

    @property
    def known_hosts_name(self) -> str:
        """The name the host's key is stored under, as OpenSSH writes it."""
        if self.host_key_alias:
            return self.host_key_alias
        host = self.hostname.lower()
        return host if self.port == DEFAULT_PORT else f"[{host}]:{self.port}"

    def describe(self) -> str:
        """``alice@lab.example.org:22 via bastion`` (for -v logs)."""
        text = f"{self.user}@{self.address}"
        chain = hop_chain(self)
        via = [hop.alias for hop in chain[:-1]]
        if chain[0].proxy_command:
            via.insert(0, f"ProxyCommand {chain[0].proxy_command!r}")
        return f"{text} via {' -> '.join(via)}" if via else text


def hop_chain(host: ResolvedHost) -> tuple[ResolvedHost, ...]:
    """Every host to connect to, in order, ending with ``host``.

    Like OpenSSH's ``ProxyJump a,b``: ``a`` is reached by its own jumps, ``b`` through ``a``
    (its own ProxyJump is overridden by the explicit chain), then the target through ``b``.
    """
    if not host.jumps:
        return (host,)
    first, *rest = host.jumps
    return (*hop_chain(first), *rest, host)


class _SSHConfig:
    """~/.ssh/config through paramiko.SSHConfig; problems become ConfigError naming the file.

    paramiko knows no ``Include``: the file is first flattened into one text (flatten_ssh_config)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._config = paramiko.SSHConfig()
        if not path.is_file():
            return
        try:
            text = flatten_ssh_config(path)
        except OSError as exc:
            raise self.problem(f"cannot read: {exc.strerror or exc}") from exc
        try:
            if "exec" in text.lower():
                _enable_match_exec()
            self._config = paramiko.SSHConfig.from_text(text)
        except (ValueError, paramiko.SSHException) as exc:
            raise self.problem(f"cannot parse: {exc}") from exc

    def lookup(self, name: str) -> dict[str, Any]:
        try:
            return dict(self._config.lookup(name))
        except (ValueError, paramiko.SSHException, ImportError) as exc:
            raise self.problem(f"looking up Host {name!r}: {exc}") from exc

    def problem(self, message: str, key: str = "") -> ConfigError:
        return ConfigError([ConfigProblem(path=str(self.path), key=key, message=message)])


# -- ~/.ssh/config Include ---------------------------------------------------------------------

INCLUDE_MAX_DEPTH = 16  # OpenSSH's READCONF_MAX_DEPTH
_CONFIG_LINE = re.compile(r"(\w+)(?:\s*=\s*|\s+)(.+)")  # paramiko's SETTINGS_REGEX
# Written after each ProxyJump/ProxyCommand line of the flattened text. paramiko keeps the first
# value of each keyword but not which of the two came first, and OpenSSH uses whichever did; an
# unknown keyword is neither tokenized nor unquoted, so it also keeps the raw ProxyCommand.
_FIRST_PROXY = "XRemoteKernelFirstProxy"


@dataclass(frozen=True)
class _Block:
    """Which hosts the lines being read apply to: all ``criteria`` hold (Match criteria, ``()``:
    every host). ``header`` (re)opens the block in the flattened text."""

    criteria: tuple[str, ...] = ()
    header: str = "Host *"


def flatten_ssh_config(path: Path) -> str:
    """The ssh_config at ``path`` as one text without ``Include``, read as OpenSSH reads it.

    An Include is replaced by the files it names (globs, sorted; relative to ~/.ssh; a pattern
    matching nothing is ignored; at most 16 deep). Included lines belong to the block of the
    Include line until the included file's own Host/Match line; such a block applies only where
    the including block does too (OpenSSH: SSHCONF_NEVERMATCH), so it becomes a ``Match`` with
    both blocks' criteria; after the file, the including block is reopened (OpenSSH restores its
    state, a reopened ``Match`` is evaluated again)."""
    out: list[str] = []
    _flatten_file(path, _Block(), 0, out)
    return "".join(f"{line}\n" for line in out)


def _flatten_file(path: Path, outer: _Block, depth: int, out: list[str]) -> bool:
    """Append ``path``'s lines to ``out``; True when it opened a block of its own."""
    block = outer
    lines = path.read_text(errors="replace").splitlines()
    if isinstance(out, _OriginLines):
        out.files.append(str(path))
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parsed = _CONFIG_LINE.fullmatch(line)
        if parsed is None:
            raise _line_problem(path, number, "", f"cannot parse {line!r}: expected 'Keyword value'")
        key, value = parsed[1].lower(), parsed[2]
        if key in ("host", "match"):
            block = _open_block(outer, key, value, line, (path, number))
            out.append(block.header)
        elif key == "include":
            _include(value, block, depth, out, (path, number))
        else:
            out.append(line)
            if isinstance(out, _OriginLines):
                out.append(f"{_ORIGIN}{key} {path}:{number}")
            if key in ("proxyjump", "proxycommand"):
                out.append(f"{_FIRST_PROXY} {key} {value}")
    return block is not outer


def _open_block(outer: _Block, key: str, value: str, line: str, where: tuple[Path, int]) -> _Block:
    try:
        words = shlex.split(value)
    except ValueError as exc:
        raise _line_problem(*where, key.capitalize(), f"cannot parse {value!r}: {exc}") from exc
    # ``Host a b`` is ``Match originalhost a,b`` (paramiko and OpenSSH match both on the name
    # as given); "all" is true, and paramiko refuses it next to other criteria.
    own = ("originalhost", ",".join(words)) if key == "host" else tuple(w for w in words if w.lower() != "all")
    if not outer.criteria:
        return _Block(own, line)
    criteria = outer.criteria + own
    return _Block(criteria, "Match " + " ".join(map(shlex.quote, criteria)))


def _include(value: str, block: _Block, depth: int, out: list[str], where: tuple[Path, int]) -> None:
    if depth >= INCLUDE_MAX_DEPTH:
        raise _line_problem(*where, "Include", f"Include nested more than {INCLUDE_MAX_DEPTH} files deep"
                            " (does a file include itself?)")
    try:
        patterns = shlex.split(value)
    except ValueError as exc:
        raise _line_problem(*where, "Include", f"cannot parse {value!r}: {exc}") from exc
    for included in (path for pattern in patterns for path in _include_matches(pattern)):
        try:
            opened_a_block = _flatten_file(included, block, depth + 1, out)
        except FileNotFoundError:
            continue  # gone since the glob: OpenSSH ignores it too
        except OSError as exc:
            raise _line_problem(*where, "Include", f"cannot read included file {included}: {exc.strerror}",
                                ) from exc
        if opened_a_block:
            out.append(block.header)


def _include_matches(pattern: str) -> list[Path]:
    """The files an Include pattern names, sorted like glob(3); relative means under ~/.ssh."""
    expanded = os.path.expandvars(os.path.expanduser(pattern))
    if not os.path.isabs(expanded):
        expanded = str(Path("~/.ssh").expanduser() / expanded)
    # a directory reads as an empty file in OpenSSH
    return [Path(match) for match in sorted(glob.glob(expanded)) if not os.path.isdir(match)]


def _line_problem(path: Path, line: int, key: str, message: str) -> ConfigError:
    return ConfigError([ConfigProblem(path=str(path), key=key, message=message, line=line)])


# -- where ~/.ssh/config values come from (`remote-kernel doctor`) -----------------------------

# Written after each option line when origins are asked for: paramiko keeps the first value of an
# unknown keyword as it does for the option itself, so the marker that wins is the winning line's.
_ORIGIN = "XRemoteKernelFrom"


class _OriginLines(list[str]):
    """The flattened lines, with an origin marker after each option and the files read."""

    def __init__(self) -> None:
        super().__init__()
        self.files: list[str] = []


@dataclass(frozen=True)
class ConfigOrigins:
    """Which ssh_config lines gave a host its values: ``values`` maps each keyword that applied
    (lower case, as paramiko names them) to ``file:line``; ``files`` is every file read, the main
    one first, then each Include in the order read."""

    path: str
    files: tuple[str, ...]
    values: dict[str, str]


def ssh_config_origins(host: HostEntry, *, ssh_config_path: Path | None = None) -> ConfigOrigins:
    """Where each ~/.ssh/config value for ``host`` comes from (file:line), for ``doctor``; an
    unreadable or invalid file raises ConfigError as resolve_host does."""
    path = ssh_config_path or Path(DEFAULT_SSH_CONFIG).expanduser()
    if not path.is_file():
        return ConfigOrigins(str(path), (), {})
    config = _SSHConfig(path)  # the same checks and errors as a connection's
    lines = _OriginLines()
    _flatten_file(path, _Block(), 0, lines)
    config._config = paramiko.SSHConfig.from_text("".join(f"{line}\n" for line in lines))
    prefix = _ORIGIN.lower()
    values = {key[len(prefix):]: str(value) for key, value in config.lookup(host.hostname or host.name).items()
              if key.startswith(prefix)}
    return ConfigOrigins(str(path), tuple(lines.files), values)


def resolve_host(host: HostEntry, *, ssh_config_path: Path | None = None) -> ResolvedHost:
    """Explicit HostEntry fields win, then ~/.ssh/config, then ssh's defaults."""
    config = _SSHConfig(ssh_config_path or Path(DEFAULT_SSH_CONFIG).expanduser())
    return _resolve(host, config, ())


def _resolve(host: HostEntry, config: _SSHConfig, seen: tuple[str, ...]) -> ResolvedHost:
    lookup_name = host.hostname or host.name
    # same name on another explicit port is another host (two sshds on one machine)
    identity = f"{lookup_name}:{host.port}" if host.port else lookup_name
    _check_resolvable(host, config, seen, identity)
    options = config.lookup(lookup_name)
    resolved = ResolvedHost(
        alias=host.name,
        hostname=str(options.get("hostname") or lookup_name),
        port=host.port or _config_port(options, config),
        user=host.user or str(options.get("user") or getpass.getuser()),
        identity_files=_identity_files(host, options),
        known_hosts=_known_hosts_files(host, options),
        host_key_policy=host.host_key_policy,
        keepalive=host.keepalive,
        host_key_alias=options.get("hostkeyalias"),
        identities_only=str(options.get("identitiesonly", "no")).lower() == "yes",
    )
    # OpenSSH uses whichever of ProxyJump and ProxyCommand it reads first ("none" included);
    # an explicit proxy_jump comes before ~/.ssh/config.
    first = "proxyjump" if host.proxy_jump else _first_proxy(options)
    if first == "proxycommand":
        return replace(resolved, proxy_command=_proxy_command(options, config, resolved, lookup_name))
    if first == "proxyjump":
        return replace(resolved, jumps=_resolve_jumps(host, options, config, (*seen, identity)))
    return resolved


def _check_resolvable(host: HostEntry, config: _SSHConfig, seen: tuple[str, ...], identity: str) -> None:
    if identity in seen or len(seen) > MAX_JUMPS:
        chain = " -> ".join([*seen, identity])
        raise SSHError(
            f"ProxyJump loop: {chain}",
            host=host.label,
            hint=f"give the jump host its own 'ProxyJump none' in {config.path}, or fix proxy_jump",
        )
    if host.host_key_policy not in HOST_KEY_POLICIES:
        raise SSHError(
            f"unknown host_key_policy {host.host_key_policy!r} for {host.label}",
            host=host.label,
            hint=f"use one of: {', '.join(HOST_KEY_POLICIES)}",
        )


def _first_proxy(options: dict[str, Any]) -> str:
    """"proxyjump", "proxycommand" or "" (neither is set), from the flattened config's marker."""
    return str(options.get(_FIRST_PROXY.lower(), "")).partition(" ")[0]


def _proxy_command(options: dict[str, Any], config: _SSHConfig, host: ResolvedHost, lookup_name: str) -> str | None:
    """The ProxyCommand to run for ``host`` with its tokens expanded (None for "none"). The raw
    text comes from the marker: paramiko expands only some tokens, not %%, before the explicit
    hostname/port/user of a [hosts] table are known."""
    raw = str(options[_FIRST_PROXY.lower()]).partition(" ")[2].strip()
    if raw.lower() == "none":
        return None
    if raw == "-" or str(options.get("proxyusefdpass", "no")).lower() == "yes":
        raise config.problem(
            f"ProxyCommand {raw!r} for {lookup_name} uses stdin/stdout or ProxyUseFdpass, which remote-kernel"
            " cannot; give a command that relays the connection on its stdin/stdout, or use ProxyJump",
            key="ProxyCommand",
        )
    tokens = {"%": "%", "h": host.hostname, "k": host.host_key_alias or lookup_name, "n": lookup_name,
              "p": str(host.port), "r": host.user}

    def expand(match: re.Match[str]) -> str:
        if match[1] in tokens:
            return tokens[match[1]]
        raise config.problem(
            f"unknown token %{match[1]} in ProxyCommand {raw!r}; it accepts %%, %h, %k, %n, %p and %r",
            key="ProxyCommand",
        )

    return re.sub(r"%(.?)", expand, raw, flags=re.DOTALL)


def _config_port(options: dict[str, Any], config: _SSHConfig) -> int:
    text = str(options.get("port", DEFAULT_PORT))
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise config.problem(f"Port must be a number from 1 to 65535, found {text!r}", key="Port")
    return int(text)


def _expand(path: str) -> str:
    return os.path.expanduser(path)


def _identity_files(host: HostEntry, options: dict[str, Any]) -> tuple[str, ...]:
    if host.identity_file:
        return (_expand(host.identity_file),)
    configured = [_expand(p) for p in options.get("identityfile", []) if p.lower() != "none"]
    if configured:
        return tuple(configured)
    return tuple(p for p in map(_expand, DEFAULT_KEY_FILES) if Path(p).is_file())


def _known_hosts_files(host: HostEntry, options: dict[str, Any]) -> tuple[str, ...]:
    if host.known_hosts:
        user_files = [host.known_hosts]
    else:
        user_files = str(options.get("userknownhostsfile", "")).split() or list(DEFAULT_USER_KNOWN_HOSTS)
    global_files = str(options.get("globalknownhostsfile", "")).split() or DEFAULT_GLOBAL_KNOWN_HOSTS
    files = [_expand(p) for p in user_files if p.lower() != "none"]
    files += [p for p in map(_expand, global_files) if Path(p).is_file() and p not in files]
    return tuple(files)


def _resolve_jumps(
    host: HostEntry, options: dict[str, Any], config: _SSHConfig, seen: tuple[str, ...]
) -> tuple[ResolvedHost, ...]:
    hops = host.proxy_jump or _config_jumps(host, options, config)
    return tuple(_resolve(hop, config, seen) for hop in hops)


def _config_jumps(host: HostEntry, options: dict[str, Any], config: _SSHConfig) -> tuple[HostEntry, ...]:
    """``ProxyJump [user@]host[:port],ssh://...`` from ssh_config. Hops inherit the host-key
    policy; their known_hosts come from their own Host block (like ``ssh bastion``)."""
    text = str(options.get("proxyjump", "none"))
    if text.lower() == "none":
        return ()
    hops = []
    for spec in text.split(","):
        try:
            target = parse_target(spec.strip().removeprefix("ssh://"))
        except ValueError as exc:
            raise config.problem(str(exc), key="ProxyJump") from exc
        hops.append(
            HostEntry(
                name=target.host,
                user=target.user,
                port=target.port,
                host_key_policy=host.host_key_policy,
                keepalive=host.keepalive,
            )
        )
    return tuple(hops)


# -- known_hosts -------------------------------------------------------------------------------


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


def _fingerprint(blob: bytes) -> str:
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def _verify_host_key(hop: ResolvedHost, server_key: paramiko.PKey, known: list[KnownHostKey], via: str) -> None:
    blob, key_type = server_key.asbytes(), server_key.get_name()
    revoked = [k for k in known if k.marker == "@revoked" and k.key_blob == blob]
    if revoked:
        raise HostKeyError(
            f"the host key of {hop.label} ({key_type} {_fingerprint(blob)}) is marked @revoked"
            f" in {revoked[0].where}; refusing to connect",
            host=hop.label,
            hint="ask the server's administrator for its current host key",
        )
    plain = [k for k in known if not k.marker]
    if any(k.key_blob == blob for k in plain):
        where = next(k.where for k in plain if k.key_blob == blob)
        log.debug("host key of %s matches %s", hop.label, where)
        _trace("host_key", hop, match=where)
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
        f"HOST KEY CHANGED for {hop.label}: the server presents {key_type} {_fingerprint(blob)},"
        f" but {where} holds a different key ({first.key_type} {_fingerprint(first.key_blob)})."
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
        f"the host key of {hop.label} is unknown: {key_type} {_fingerprint(blob)} is not in"
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
        _fingerprint(blob),
        hop.known_hosts_name,
        target,
    )
    _trace("host_key", hop, recorded=str(target))


def _prefer_known_key_types(transport: paramiko.Transport, known: list[KnownHostKey]) -> None:
    """Ask for a host key type we already know, as OpenSSH does, so a server with several host
    keys is not mistaken for a changed one."""
    options = transport.get_security_options()
    wanted: list[str] = []
    for key in known:
        types = ("rsa-sha2-512", "rsa-sha2-256") if key.key_type == "ssh-rsa" else (key.key_type,)
        wanted += [t for t in types if t in options.key_types and t not in wanted]
    if wanted:
        options.key_types = [*wanted, *(t for t in options.key_types if t not in wanted)]


# -- authentication ----------------------------------------------------------------------------


def _stdin_is_tty() -> bool:
    return sys.stdin is not None and sys.stdin.isatty()


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
    """The injected prompter, else the terminal, else SSH_ASKPASS (as OpenSSH decides), else None."""
    context = getattr(_prompting, "context", None)
    if context is not None:
        prompter: Prompter = context[0]
        return prompter
    from remote_kernel.service.prompts import default_prompter

    return default_prompter(terminal=_stdin_is_tty())


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
    for key_class in paramiko.key_classes:
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
            yield f"ssh-agent key {key.get_name()} {_fingerprint(key.asbytes())}", key


def _authenticate(transport: paramiko.Transport, hop: ResolvedHost) -> None:
    report = _AuthReport(host=hop.label)
    allowed: list[str] = []
    if getattr(_tracing, "events", None) is not None:
        allowed = _allowed_methods(transport, hop.user)
        _trace("auth_offered", hop, methods=allowed)
        if transport.is_authenticated():  # the server wants no authentication at all
            _trace("auth", hop, method="none")
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
        _trace("auth", hop, method="publickey", key=label)
        _note_auth("publickey")
        if remaining and not _interactive_auth(transport, hop, remaining):
            raise _auth_error(hop, report, remaining)
        return
    allowed = allowed or _allowed_methods(transport, hop.user)
    if not _interactive_auth(transport, hop, allowed):
        raise _auth_error(hop, report, allowed)


def _authenticate_or_explain(transport: paramiko.Transport, hop: ResolvedHost) -> None:
    try:
        _authenticate(transport, hop)
    except (paramiko.SSHException, OSError, EOFError) as exc:
        raise SSHError(
            f"the connection to {hop.address} broke during authentication: {_in_words(exc)}",
            host=hop.label,
            hint="see the server's log (MaxAuthTries, LoginGraceTime, AllowUsers)",
        ) from exc


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
    _trace("auth", hop, method=method)
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


# -- tracing (`remote-kernel doctor`) ----------------------------------------------------------

_tracing = threading.local()


@contextlib.contextmanager
def traced() -> Iterator[list[dict[str, Any]]]:
    """Record what ``connect`` does on this thread, for ``remote-kernel doctor``: dicts with an
    ``event`` (socket, handshake, host_key, auth_offered, auth), the ``hop`` (its label) and the
    figures, in order. While tracing, authentication first asks the server which methods it
    offers (the "none" request OpenSSH's client always sends)."""
    events: list[dict[str, Any]] = []
    previous = getattr(_tracing, "events", None)
    _tracing.events = events
    try:
        yield events
    finally:
        _tracing.events = previous


def _trace(event: str, hop: ResolvedHost, **figures: Any) -> None:
    events = getattr(_tracing, "events", None)
    if events is not None:
        events.append({"event": event, "hop": hop.label, **figures})


# -- connecting --------------------------------------------------------------------------------

# What paramiko says when the transport is already gone ("No existing session" is its jargon for
# "this connection has closed"); EOFError says nothing at all.
_CLOSED_CONNECTION = ("No existing session", "SSH session not active", "Socket is closed", "Channel closed.")
_PARAMIKO_WORDS = {
    "Unable to open channel.": "the server refused to open a channel",
    "Timeout opening channel.": "the server did not answer a request to open a channel in time",
}


class _HandshakeError(SSHError):
    """The SSH handshake failed: through a ProxyCommand, most likely the command's fault."""


def _connection_closed(exc: BaseException) -> bool:
    return isinstance(exc, EOFError) or str(exc) in _CLOSED_CONNECTION


def _in_words(exc: BaseException) -> str:
    """A paramiko or socket exception as a user would say it."""
    if _connection_closed(exc):
        return "the connection was closed"
    text = str(exc)
    return _PARAMIKO_WORDS.get(text, text or type(exc).__name__)



def _connect_error(hop: ResolvedHost, exc: BaseException, timeout: float) -> SSHError:
    if isinstance(exc, socket.gaierror):
        return SSHError(
            f"cannot resolve host name {hop.hostname!r} ({exc.strerror})",
            host=hop.label,
            hint="check hostname (or HostName in ~/.ssh/config) and your DNS / VPN",
        )
    if isinstance(exc, ConnectionRefusedError):
        return SSHError(
            f"connection to {hop.address} refused",
            host=hop.label,
            hint=f"is sshd running on {hop.address}?",
        )
    if isinstance(exc, TimeoutError):
        return SSHError(
            f"timed out after {timeout:g} s connecting to {hop.address}",
            host=hop.label,
            hint="check the address and port, VPN and firewall; a ProxyJump may be needed",
        )
    return SSHError(
        f"cannot connect to {hop.address}: {exc}",
        host=hop.label,
        hint="check the network route to it",
    )


def _open_socket(hop: ResolvedHost, via: tuple[ResolvedHost, paramiko.Transport] | None, timeout: float) -> Any:
    if via is None:
        try:
            return socket.create_connection((hop.hostname, hop.port), timeout=timeout)
        except OSError as exc:
            raise _connect_error(hop, exc, timeout) from exc
    jump, transport = via
    try:
        return transport.open_channel("direct-tcpip", (hop.hostname, hop.port), ("127.0.0.1", 0), timeout=timeout)
    except (paramiko.SSHException, OSError, EOFError) as exc:
        reason = getattr(exc, "text", "") or _in_words(exc)
        raise SSHError(
            f"jump host {jump.label} could not open a connection to {hop.address}: {reason}",
            host=hop.label,
            hint=f"the jump host must allow TCP forwarding (AllowTcpForwarding) to {hop.address}",
        ) from exc


def _start_transport(hop: ResolvedHost, sock: Any, via: str, timeout: float) -> paramiko.Transport:
    """Handshake, host key check, authentication; the transport is closed on any failure."""
    started = time.monotonic()
    transport = paramiko.Transport(sock)
    try:
        transport.banner_timeout = transport.handshake_timeout = transport.auth_timeout = timeout
        known = find_known_keys(hop.known_hosts, hop.known_hosts_name)
        options = transport.get_security_options()
        fast = [c for c in PREFERRED_CIPHERS if c in options.ciphers]
        options.ciphers = [*fast, *(c for c in options.ciphers if c not in fast)]
        transport.use_compression(compress=False)  # compression made 50 MB of output slower
        _prefer_known_key_types(transport, known)
        server_key = _handshake(transport, hop, timeout)
        _trace("handshake", hop, ms=(time.monotonic() - started) * 1000, cipher=transport.local_cipher,
               key_type=server_key.get_name(), fingerprint=_fingerprint(server_key.asbytes()))
        _verify_host_key(hop, server_key, known, via)
        handshake_done = time.monotonic()
        _authenticate_or_explain(transport, hop)
        if hop.keepalive > 0:
            transport.set_keepalive(max(1, round(hop.keepalive)))
        log.debug(
            "%s: handshake %.0f ms (cipher %s), auth %.0f ms",
            hop.address,
            (handshake_done - started) * 1000,
            transport.local_cipher,
            (time.monotonic() - handshake_done) * 1000,
        )
    except BaseException:
        transport.close()
        raise
    return transport


def _handshake(transport: paramiko.Transport, hop: ResolvedHost, timeout: float) -> paramiko.PKey:
    """Key exchange; returns the server's host key (not yet trusted)."""
    try:
        transport.start_client(timeout=timeout)
        # start_client returns quietly when its timeout passes; this raises if kex is unfinished
        return transport.get_remote_server_key()
    except (paramiko.SSHException, OSError, EOFError) as exc:
        reason = transport.get_exception() or exc
        raise _HandshakeError(
            f"SSH handshake with {hop.address} failed within {timeout:g} s: {_in_words(reason)}",
            host=hop.label,
            hint=f"is {hop.address} an SSH server? Check the port, and the server's log",
        ) from exc


def connect(host: HostEntry | ResolvedHost, *, timeout: float = 15.0) -> SSHConnection:
    """Open one authenticated SSH connection (through every ProxyJump hop or the ProxyCommand,
    each hop verified)."""
    resolved = host if isinstance(host, ResolvedHost) else resolve_host(host)
    hops = hop_chain(resolved)
    log.debug(
        "%s resolved to %s (keys: %s; known_hosts: %s)",
        resolved.alias,
        resolved.describe(),
        ", ".join(resolved.identity_files) or "agent/none",
        ", ".join(resolved.known_hosts) or "none",
    )
    transports: list[paramiko.Transport] = []
    proxies: list[_ProxyProcess] = []
    try:
        for index, hop in enumerate(hops):
            via = (hops[index - 1], transports[-1]) if transports else None
            transports.append(_connect_hop(hop, via, hops[:index], proxies, timeout))
    except BaseException:
        for transport in reversed(transports):
            transport.close()
        for proxy in proxies:
            proxy.stop()
        raise
    return SSHConnection(resolved, transports, timeout=timeout, proxies=proxies)


def _connect_hop(
    hop: ResolvedHost,
    via: tuple[ResolvedHost, paramiko.Transport] | None,
    before: Sequence[ResolvedHost],
    proxies: list[_ProxyProcess],
    timeout: float,
) -> paramiko.Transport:
    """One authenticated transport to ``hop``: through ``via``, its ProxyCommand (only the first
    hop of a chain has one: later hops are reached through the chain, as with ``ssh -J``), or
    direct."""
    started = time.monotonic()
    proxy = _ProxyProcess.start(hop) if via is None and hop.proxy_command else None
    if proxy is not None:
        proxies.append(proxy)
    sock = proxy.socket if proxy is not None else _open_socket(hop, via, timeout)
    log.debug("%s: TCP/channel open in %.0f ms", hop.address, (time.monotonic() - started) * 1000)
    _trace("socket", hop, ms=(time.monotonic() - started) * 1000,
           via="proxycommand" if proxy is not None else "direct" if via is None else via[0].label)
    jump_spec = ",".join(f"{h.user}@{h.address}" for h in before)
    try:
        return _start_transport(hop, sock, jump_spec, timeout)
    except SSHError as exc:
        if proxy is not None and proxy.is_to_blame(exc):
            raise proxy.failure(hop, exc) from exc
        raise


class _ProxyProcess:
    """A running ProxyCommand, started as OpenSSH starts one (``$SHELL -c "exec COMMAND"``) but
    in a session of its own: Jupyter interrupts a kernel by signalling the launcher's whole
    process group, which must not cut the connection. Its stdin and stdout are the far end of a
    socketpair, so paramiko gets a real socket; the tail of its stderr goes into error messages."""

    STDERR_LINES = 20

    def __init__(self, command: str, process: subprocess.Popen[bytes], sock: socket.socket) -> None:
        self.command = command
        self.process = process
        self.socket = sock
        self._stderr: deque[str] = deque(maxlen=self.STDERR_LINES)
        self._reader = threading.Thread(target=self._read_stderr, name="proxycommand-stderr", daemon=True)
        self._reader.start()

    @classmethod
    def start(cls, hop: ResolvedHost) -> _ProxyProcess:
        command = hop.proxy_command or ""
        shell = os.environ.get("SHELL") or "/bin/sh"
        ours, theirs = socket.socketpair()
        try:
            process = subprocess.Popen(
                [shell, "-c", f"exec {command}"],
                stdin=theirs.fileno(),
                stdout=theirs.fileno(),
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as exc:
            ours.close()
            raise SSHError(
                f"cannot start the ProxyCommand for {hop.label} with {shell}: {exc.strerror or exc}",
                host=hop.label,
                hint="check $SHELL and ProxyCommand in ~/.ssh/config",
            ) from exc
        finally:
            theirs.close()
        log.debug("%s: ProxyCommand %r runs as pid %d", hop.label, command, process.pid)
        return cls(command, process, ours)

    def _read_stderr(self) -> None:
        if self.process.stderr is None:
            return
        for raw in iter(self.process.stderr.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip()
            if line:
                self._stderr.append(line)
                log.debug("ProxyCommand: %s", line)

    def is_to_blame(self, exc: SSHError) -> bool:
        """Did ``exc`` (connecting through the proxy) come from the proxy rather than the server?"""
        if isinstance(exc, HostKeyError):
            return False
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=0.5)  # it may be exiting right now
        return isinstance(exc, _HandshakeError) or self.process.poll() is not None

    def failure(self, hop: ResolvedHost, cause: SSHError) -> SSHError:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=1.0)
        self._reader.join(timeout=1.0)  # its last words
        status = self.process.poll()
        if status is not None and status >= 0:
            what = f"exited (status {status}) before the SSH connection was set up"
        else:  # still running, or killed by our closing its socket (SIGPIPE)
            what = f"did not lead to an SSH server ({cause.message})"
        lines = [f"the ProxyCommand for {hop.label} {what}: {self.command}"]
        if self._stderr:
            lines += ["  its stderr:", *(f"    {line}" for line in self._stderr)]
        return SSHError(
            "\n".join(lines),
            host=hop.label,
            hint="run the command by hand to see what it does, then fix ProxyCommand in ~/.ssh/config",
        )

    def stop(self) -> None:
        """SIGHUP (what ssh sends its ProxyCommand when it exits), SIGKILL if it lingers."""
        self.socket.close()
        for sig in (signal.SIGHUP, signal.SIGKILL):
            if self.process.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, sig)  # its own session: a pipeline goes too
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=2.0)
        self._reader.join(timeout=1.0)
        if self.process.stderr is not None:
            self.process.stderr.close()


class SSHConnection:
    """One authenticated SSH transport to ``host`` (and the transports of its jump hosts)."""

    def __init__(
        self,
        host: ResolvedHost,
        transports: list[paramiko.Transport],
        *,
        timeout: float = 15.0,
        proxies: Sequence[_ProxyProcess] = (),
    ) -> None:
        self.host = host
        self._transports = transports
        self._timeout = timeout
        self._proxies = list(proxies)

    def open_exec(self, command: str) -> ExecChannel:
        """A session channel running ``command`` (through the user's login shell, as ssh does)."""
        transport = self._transports[-1]
        started = time.monotonic()
        try:
            channel = transport.open_session(window_size=CHANNEL_WINDOW, timeout=self._timeout)
            tap = _StdoutTap.install(channel)  # before exec: no byte of output can miss it
            _send_exec(transport, channel, command)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise self._exec_error(exc) from exc
        log.debug(
            "exec channel on %s open in %.0f ms",
            self.host.address,
            (time.monotonic() - started) * 1000,
        )
        return ExecChannel(channel, self.host.label, tap)

    def _exec_error(self, exc: BaseException) -> SSHError:
        if _connection_closed(exc) or not self._transports[-1].is_active():
            return SSHError(
                f"cannot run a command on {self.host.label}: the SSH connection closed before the command could start",
                host=self.host.label,
                hint="the network dropped or the server ended the connection; try again",
            )
        return SSHError(
            f"cannot run a command on {self.host.label}: {_in_words(exc)}",
            host=self.host.label,
            hint="the connection may have dropped, or the server limits sessions (MaxSessions)",
        )

    def is_active(self) -> bool:
        return all(transport.is_active() for transport in self._transports)

    def probe(self) -> threading.Event:
        """Ask the server for a reply (``keepalive@openssh.com``, like ServerAliveInterval) and
        return an event set when it answers. paramiko's own keepalive wants no reply, so it cannot
        tell a silent link (a blackhole, a sleeping NAT) from an idle one. The request blocks until
        the reply or the transport's end, so it runs on a daemon thread: closing the connection
        ends it."""
        answered = threading.Event()
        transport = self._transports[-1]

        def ask() -> None:
            with contextlib.suppress(Exception):
                transport.global_request("keepalive@openssh.com", wait=True)  # a failure reply counts
                if transport.is_active():
                    answered.set()

        threading.Thread(target=ask, name="rk-ssh-probe", daemon=True).start()
        return answered

    def close(self) -> None:
        for transport in reversed(self._transports):
            transport.close()
        for proxy in self._proxies:
            proxy.stop()

    def __enter__(self) -> SSHConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _send_exec(transport: paramiko.Transport, channel: paramiko.Channel, command: str) -> None:
    """The exec request, without waiting for its reply (as OpenSSH's client does): what the caller
    sends next (the script, the agent payload) travels right behind it, one round trip less per
    start. A refused request closes the channel, which the caller sees as the command's end (no
    exit status), as it would see a command that could not start. paramiko's exec_command is
    the same message followed by a wait for the reply."""
    message = paramiko.Message()
    message.add_byte(paramiko.common.cMSG_CHANNEL_REQUEST)
    message.add_int(channel.remote_chanid)
    message.add_string("exec")
    message.add_boolean(True)
    message.add_string(command)
    private: Any = transport  # paramiko has no public exec that does not wait (nor a stub for this)
    private._send_user_message(message)


class _StdoutTap:
    """Stands in for a paramiko Channel's stdout buffer (``Channel.in_buffer``, private API) so
    that, once a sink is set, each arriving packet's bytes go straight to the sink on paramiko's
    transport thread instead of through the buffer, its wake-up pipe and a reader thread (the
    launcher's CPU per `1+1` cell: 0.55 -> 0.40 ms, bench/README.md). Until a sink is set, and
    for everything but ``feed``, it is the original buffer (EOF and close still wake readers)."""

    def __init__(self, buffer: Any) -> None:
        self._buffer = buffer
        self._lock = threading.Lock()
        self._sink: Callable[[bytes], None] | None = None

    @classmethod
    def install(cls, channel: paramiko.Channel) -> _StdoutTap | None:
        """Put a tap in place of ``channel``'s stdout buffer; None (and nothing changed) when this
        paramiko lacks one of the private names the tap and ExecChannel.release rely on."""
        needed = (hasattr(channel, "in_buffer") and hasattr(channel, "_check_add_window")
                  and hasattr(channel, "remote_chanid") and hasattr(channel.transport, "_send_user_message")
                  and hasattr(paramiko.common, "cMSG_CHANNEL_WINDOW_ADJUST"))
        if not needed or not all(hasattr(channel.in_buffer, name) for name in ("feed", "empty")):
            return None
        tap = cls(channel.in_buffer)
        settable: Any = channel
        settable.in_buffer = tap
        return tap

    def __getattr__(self, name: str) -> Any:
        return getattr(self._buffer, name)

    def __len__(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes) -> None:
        """(paramiko's transport thread) One packet of stdout."""
        with self._lock:
            if self._sink is None:
                self._buffer.feed(data)
            else:
                self._sink(data)

    def set_sink(self, sink: Callable[[bytes], None]) -> None:
        """From now on, stdout goes to ``sink``, starting with what is already buffered."""
        with self._lock:  # held while the backlog goes out: a packet arriving now waits its turn
            backlog = self._buffer.empty()
            if backlog:
                sink(backlog)
            self._sink = sink


class ExecChannel:
    """A running remote command: its stdin, stdout, stderr and exit status."""

    def __init__(self, channel: paramiko.Channel, host_label: str, tap: _StdoutTap | None = None) -> None:
        self._channel = channel
        self._host = host_label
        self._blocking = True
        self._tap = tap

    def fileno(self) -> int:
        """Readable when stdout data, stderr data or EOF arrives (for select/selectors)."""
        return self._channel.fileno()

    def _ready_or_eof(self, ready: bool) -> bool:
        return ready or bool(self._channel.eof_received) or self._channel.closed

    def recv(self, n: int) -> bytes:
        """Up to ``n`` bytes of stdout; ``b""`` at EOF. Non-blocking mode raises BlockingIOError
        when nothing is buffered."""
        if not self._blocking and not self._ready_or_eof(self._channel.recv_ready()):
            raise BlockingIOError("no stdout data buffered")
        return self._guard(lambda: self._channel.recv(n))

    def recv_stderr(self, n: int) -> bytes:
        if not self._blocking and not self._ready_or_eof(self._channel.recv_stderr_ready()):
            raise BlockingIOError("no stderr data buffered")
        return self._guard(lambda: self._channel.recv_stderr(n))

    def recv_ready(self) -> bool:
        return self._channel.recv_ready()

    def recv_stderr_ready(self) -> bool:
        return self._channel.recv_stderr_ready()

    def deliver_to(self, sink: Callable[[bytes], None]) -> bool:
        """Hand stdout to ``sink`` as it arrives, on paramiko's transport thread; False when this
        channel cannot (read with ``recv`` then). The sink must not block and must never send on
        this connection: a send waits while keys are re-exchanged, which needs that very thread
        (ANCHORS.md: a re-key deadlock). The reader calls ``release`` for what it has consumed."""
        if self._tap is None:
            return False
        self._tap.set_sink(sink)
        return True

    def release(self, consumed: int) -> None:
        """Grant the remote side window for ``consumed`` bytes handed to the sink: what
        ``Channel.recv`` does after a read (a WINDOW_ADJUST once a tenth of the window is used).
        Not on the transport thread (see deliver_to)."""
        channel: Any = self._channel
        grant = self._guard(lambda: channel._check_add_window(consumed))
        if grant > 0:
            message = paramiko.Message()
            message.add_byte(paramiko.common.cMSG_CHANNEL_WINDOW_ADJUST)
            message.add_int(channel.remote_chanid)
            message.add_int(grant)
            self._guard(lambda: channel.transport._send_user_message(message))

    def can_send_now(self, size: int) -> bool:
        """True when ``size`` bytes fit in the peer's window: sendall will not wait for it."""
        return not self._channel.closed and self._channel.out_window_size >= size

    def sendall(self, data: bytes) -> None:
        """Send everything, blocking while the remote window is full."""
        # Not paramiko's sendall: it spins forever once the channel is closed (send returns 0).
        for start in range(0, len(data), _CHUNK):
            chunk = data[start : start + _CHUNK]
            while chunk:
                chunk = chunk[self._send_some(chunk) :]

    def _send_some(self, chunk: bytes) -> int:
        sent = self._guard(lambda: self._channel.send(chunk))
        if sent == 0:
            raise self._gone("the channel is closed")
        return sent

    def shutdown_write(self) -> None:
        with contextlib.suppress(OSError, EOFError):
            self._channel.shutdown_write()

    def set_blocking(self, blocking: bool) -> None:
        # The paramiko channel itself stays blocking, so sendall keeps blocking semantics.
        self._blocking = blocking

    def exit_status(self) -> int | None:
        """The command's exit status, -1 if it died without one (signal); None while running."""
        if not self._channel.exit_status_ready():
            return None
        return self._channel.recv_exit_status()

    def close(self) -> None:
        self._channel.close()

    @property
    def closed(self) -> bool:
        return bool(self._channel.closed)

    def _gone(self, reason: str) -> SSHError:
        return SSHError(
            f"lost the SSH channel to {self._host}: {reason}",
            host=self._host,
            hint="the connection dropped or the server ended the session",
        )

    def _guard(self, call: Callable[[], _T]) -> _T:
        try:
            return call()
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise self._gone(_in_words(exc)) from exc

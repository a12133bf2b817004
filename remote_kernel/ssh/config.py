"""Which host to connect to, and how: a HostEntry resolved as ``ssh`` resolves it.

Explicit HostEntry fields win, then ~/.ssh/config (read through paramiko.SSHConfig after its
``Include`` lines are flattened here, ``Match`` blocks included), then ssh's defaults. ProxyJump
chains and ProxyCommand (tokens expanded) are resolved here; nothing is connected.
"""

from __future__ import annotations

import getpass
import glob
import os
import re
import shlex
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from remote_kernel.entry import DEFAULT_KEEPALIVE, HOST_KEY_POLICIES, HostEntry, parse_target
from remote_kernel.errors import ConfigError, ConfigProblem, SSHError
from remote_kernel.ssh._paramiko import enable_match_exec, paramiko

DEFAULT_PORT = 22
DEFAULT_SSH_CONFIG = "~/.ssh/config"
DEFAULT_KEY_FILES = ("~/.ssh/id_ed25519", "~/.ssh/id_ecdsa", "~/.ssh/id_rsa")
DEFAULT_USER_KNOWN_HOSTS = ("~/.ssh/known_hosts", "~/.ssh/known_hosts2")
DEFAULT_GLOBAL_KNOWN_HOSTS = ("/etc/ssh/ssh_known_hosts", "/etc/ssh/ssh_known_hosts2")
MAX_JUMPS = 16


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
                enable_match_exec()
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



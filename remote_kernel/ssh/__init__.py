"""SSH: resolve a host like ``ssh`` does, verify its key, authenticate once, run commands.

The only package that imports paramiko, and it does so lazily (``import paramiko`` costs ~0.1 s;
``remote-kernel --help`` must stay fast). Every paramiko/socket exception leaves it as an SSHError
or HostKeyError naming the host and saying what to do. One module per concern:

- ``config``: a HostEntry resolved through ~/.ssh/config (Include, Match, ProxyJump, ProxyCommand);
- ``hostkeys``: known_hosts, checked as OpenSSH checks it (strict / accept-new, changed, revoked);
- ``auth``: ssh-agent, key files, keyboard-interactive and passwords through a Prompter;
- ``transport``: one hop (socket, handshake, host key, authentication); ``proxy``: a ProxyCommand;
- ``connection``: ``connect`` (every hop), SSHConnection (exec, probe), ExecChannel;
- ``tracing``: what ``connect`` did, for ``doctor``;
- ``_paramiko``: the lazy import, and the only module that uses paramiko's private names.

Everything other modules use is imported from here (``from remote_kernel import ssh``).
"""

from __future__ import annotations

from remote_kernel.ssh._paramiko import StdoutTap
from remote_kernel.ssh.auth import PASSPHRASE_ATTEMPTS, Prompter, prompts_through
from remote_kernel.ssh.config import (
    DEFAULT_GLOBAL_KNOWN_HOSTS,
    DEFAULT_KEY_FILES,
    DEFAULT_PORT,
    DEFAULT_SSH_CONFIG,
    DEFAULT_USER_KNOWN_HOSTS,
    INCLUDE_MAX_DEPTH,
    MAX_JUMPS,
    ConfigOrigins,
    ResolvedHost,
    _SSHConfig,
    flatten_ssh_config,
    hop_chain,
    resolve_host,
    ssh_config_origins,
)
from remote_kernel.ssh.connection import CHANNEL_WINDOW, ExecChannel, SSHConnection, connect
from remote_kernel.ssh.hostkeys import KnownHostKey, find_known_keys, host_matches, record_host_key
from remote_kernel.ssh.tracing import traced
from remote_kernel.ssh.transport import PREFERRED_CIPHERS

_StdoutTap = StdoutTap  # tests replace its install() to run a kernel without the fast path

__all__ = [
    "CHANNEL_WINDOW",
    "DEFAULT_GLOBAL_KNOWN_HOSTS",
    "DEFAULT_KEY_FILES",
    "DEFAULT_PORT",
    "DEFAULT_SSH_CONFIG",
    "DEFAULT_USER_KNOWN_HOSTS",
    "INCLUDE_MAX_DEPTH",
    "MAX_JUMPS",
    "PASSPHRASE_ATTEMPTS",
    "PREFERRED_CIPHERS",
    "ConfigOrigins",
    "ExecChannel",
    "KnownHostKey",
    "Prompter",
    "ResolvedHost",
    "SSHConnection",
    "_SSHConfig",
    "_StdoutTap",
    "connect",
    "find_known_keys",
    "flatten_ssh_config",
    "hop_chain",
    "host_matches",
    "prompts_through",
    "record_host_key",
    "resolve_host",
    "ssh_config_origins",
    "traced",
]

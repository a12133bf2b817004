"""remote-kernel login HOST: authenticate once (key passphrase, one-time code, Duo, password) and
leave the connection in the per-user service, where every kernel on HOST then uses it."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "login", parents=[common], help="authenticate to HOST once (2FA) and keep the connection in the service",
        description="Connect to HOST through the per-user service (started if needed), asking here for what "
                    "the host wants: a key's passphrase, a one-time code (TOTP), Duo's choice, a password. "
                    "Answers go to the service over its private socket and are never stored. Kernels on HOST, "
                    "also those Jupyter starts without a terminal, then use this connection. It stays until "
                    "`remote-kernel logout HOST` or until the network drops it.",
    )
    parser.add_argument("host", metavar="HOST", help="a [hosts] name, a kernel name (its host), or [user@]host[:port]")


def run(args: argparse.Namespace) -> int:
    import getpass
    import sys

    from remote_kernel import console
    from remote_kernel.errors import EXIT_OK
    from remote_kernel.service import client

    host = resolve_host(args.host, args.config)
    channel = client.ensure()
    try:
        channel.send({"op": "login", "host": host.to_dict()})
        while True:
            event = channel.receive()
            if event is None:
                raise client.ServiceUnavailable("the service ended the login without an answer",
                                                hint="see its log: remote-kernel service status")
            kind = event.get("event")
            if kind == "prompt":
                channel.send({"op": "answer", "text": _ask(event, getpass.getpass, sys.stderr)})
            elif kind == "error":
                client.raise_error(event)
            elif kind == "done":
                break
    finally:
        channel.close()
    if args.json:
        console.emit_json("login", {"ok": True, "host": host.name, "auth": event.get("auth"),
                                    "reused": bool(event.get("reused"))})
    elif event.get("reused"):
        console.emit_line(f"already logged in to {host.label}: the service's connection answers ({event.get('auth')})")
    else:
        console.emit_line(f"logged in to {host.label} ({event.get('auth')}); kernels on it use this connection "
                          f"until `remote-kernel logout {host.name}`")
    return EXIT_OK


def _ask(event: dict[str, Any], secret: Any, stream: Any) -> str:
    """One of the service's questions, on this terminal (typed answers are not echoed)."""
    instructions = str(event.get("instructions") or "").strip()
    if instructions:
        stream.write(instructions + "\n")
        stream.flush()
    prompt = str(event.get("prompt") or "Response: ")
    try:
        answer: str = input(prompt) if event.get("echo") else secret(prompt)
    except EOFError:
        answer = ""
    return answer


def resolve_host(target: str, config: Any) -> Any:
    """A [hosts] name, a kernel name (its host), a configured hostname, or [user@]host[:port]:
    the same HostEntry a kernel's launch uses, so they share the connection."""
    from remote_kernel.entry import HostEntry
    from remote_kernel.errors import UsageError

    loaded = _load_config(config)
    if loaded is not None:
        hosts = loaded.host_entries()
        entries = loaded.entries()
        if target in hosts:
            return hosts[target]
        if target.lower() in entries:
            return entries[target.lower()].host
        for host in [*hosts.values(), *(e.host for e in entries.values())]:
            if target in (host.hostname, host.label):
                return host
    try:
        return HostEntry.from_target(target)
    except ValueError as exc:
        raise UsageError(f"{target!r} is neither a host nor a kernel in the config, nor a target: {exc}") from exc


def _load_config(config: Any) -> Any:
    """The config when there is one (an ad-hoc target needs none)."""
    from remote_kernel.config import discover_config_path, load_config
    from remote_kernel.errors import ConfigError

    try:
        return load_config(discover_config_path(config))
    except ConfigError:
        if config:
            raise
        return None

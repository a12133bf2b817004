"""remote-kernel validate: check the config file; exit 0 or 2."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    subparsers.add_parser(
        "validate", parents=[common], help="check the config file (exit 0 when valid, 2 when not)",
        description="Check the config file and report every problem at once.",
    )


def run(args: argparse.Namespace) -> int:
    # Problems propagate as ConfigError: cli.py prints them (or the --json error document), exit 2.
    from remote_kernel import config, console

    loaded = config.load_config(config.discover_config_path(args.config))
    kernels = list(loaded.entries())
    hosts = list(loaded.model.hosts)
    if args.json:
        console.emit_json("validate", {
            "ok": True, "path": str(loaded.path), "kernels": kernels, "hosts": hosts,
        })
    else:
        console.emit_line(
            f"{loaded.path}: OK, {_count(len(kernels), 'kernel')}, {_count(len(hosts), 'host')}")
    return 0


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"

"""remote-kernel list: the config's kernel entries, their hosts, and whether each is in sync."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathlib import Path

    from remote_kernel.config import LoadedConfig


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    subparsers.add_parser(
        "list", parents=[common], help="list kernel entries, their hosts and sync state",
        description="List the kernels declared in the config file.",
    )


def run(args: argparse.Namespace) -> int:
    from remote_kernel import config, console

    path = _config_path(args.config)
    if path is None:
        return _no_config_yet(args)
    loaded = config.load_config(path)
    kernels = _kernel_rows(loaded)
    if args.json:
        console.emit_json("list", {"config": str(loaded.path), "kernels": kernels})
        return 0
    columns = list(kernels[0]) if kernels else ["name", "host", "display_name", "python"]
    console.emit_table(f"kernels in {loaded.path}", columns,
                       [[str(kernel[column]) for column in columns] for kernel in kernels])
    return 0


def _config_path(explicit: str | None) -> Path | None:
    """The config file, or None when none was named and none exists where one is looked for.

    Having no config yet is a state, not an error, for `list` (the README's first command runs
    it on a fresh machine); a file named by --config or $REMOTE_KERNEL_CONFIG must still exist.
    """
    import os

    from remote_kernel import config

    if not explicit and not os.environ.get(config.CONFIG_ENV_VAR) and not any(
            candidate.is_file() for candidate in _default_locations()):
        return None
    return config.discover_config_path(explicit)


def _default_locations() -> list[Path]:
    from pathlib import Path

    from remote_kernel import config

    return [Path.cwd() / config.CONFIG_FILENAME, config.default_user_config_path()]


def _no_config_yet(args: argparse.Namespace) -> int:
    from remote_kernel import console

    locations = [str(path) for path in _default_locations()]
    steps = [
        "remote-kernel install -t [user@]host --python /path/to/python   (writes the config and the kernelspec)",
        f"or write {locations[-1]} (start from examples/minimal.toml in the source tree), "
        "then `remote-kernel sync`",
    ]
    if args.json:
        console.emit_json("list", {"config": None, "kernels": [], "looked_at": locations, "next": steps})
        return 0
    console.emit_line(f"No config file yet, so no remote kernels (looked at {' and '.join(locations)}).")
    console.emit_line("To add one:")
    for step in steps:
        console.emit_line(f"  {step}")
    return 0


def _kernel_rows(loaded: LoadedConfig) -> list[dict[str, str]]:
    """One dict per kernel, in file order: the --json objects and the table rows alike."""
    states = _sync_states(loaded)
    rows = []
    for name, entry in loaded.entries().items():
        row = {"name": name, "host": entry.host.label, "display_name": entry.display_name,
               "python": entry.python}
        if states is not None:
            row["sync"] = states.get(name, "unknown")
        rows.append(row)
    return rows


def _sync_states(loaded: LoadedConfig) -> dict[str, str] | None:
    """Kernel name -> sync state ("in sync", "missing", "outdated"...); None: no sync column.

    Judged on the kernelspec Jupyter would pick for each name (remote_kernel.sync.sync_states).
    """
    from remote_kernel.sync import sync_states

    return sync_states(loaded.entries().values(), config_path=loaded.path)

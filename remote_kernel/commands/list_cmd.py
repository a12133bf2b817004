"""remote-kernel list: the config's kernel entries, their hosts, and whether each is in sync."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from remote_kernel.config import LoadedConfig


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    subparsers.add_parser(
        "list", parents=[common], help="list kernel entries, their hosts and sync state",
        description="List the kernels declared in the config file.",
    )


def run(args: argparse.Namespace) -> int:
    from remote_kernel import config, console

    loaded = config.load_config(config.discover_config_path(args.config))
    kernels = _kernel_rows(loaded)
    if args.json:
        console.emit_json("list", {"config": str(loaded.path), "kernels": kernels})
        return 0
    columns = list(kernels[0]) if kernels else ["name", "host", "display_name", "python"]
    console.emit_table(f"kernels in {loaded.path}", columns,
                       [[str(kernel[column]) for column in columns] for kernel in kernels])
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

"""remote-kernel from-spec KERNEL: launch from an installed kernelspec (what kernel.json runs).

This is the path Jupyter takes for every kernel start, so it stays light: no pydantic, no
jupyter_client; everything needed is in the spec's ``metadata.remote_kernel.entry``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from remote_kernel.commands.start_cmd import add_connection_file_option


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "from-spec", parents=[common], help="launch from an installed kernelspec (name or directory)",
        description="Launch the remote kernel described by a kernelspec written by `remote-kernel sync`. "
                    "Works without the config file.",
    )
    parser.add_argument("kernel", metavar="KERNEL",
                        help="a kernelspec name on JUPYTER_PATH, or a directory holding kernel.json")
    add_connection_file_option(parser)


def run(args: argparse.Namespace) -> int:
    from remote_kernel.commands.start_cmd import launch

    return launch(load_spec_entry(args.kernel), args.connection_file, json_output=args.json)


def find_spec_dir(kernel: str) -> Path:
    """A directory holding kernel.json, or the first kernelspec named ``kernel`` on JUPYTER_PATH."""
    from remote_kernel.errors import UsageError
    from remote_kernel.suggest import did_you_mean

    candidate = Path(kernel).expanduser()
    if (candidate / "kernel.json").is_file():
        return candidate.resolve()
    bases = _kernelspec_bases() if "/" not in kernel else []
    for base in bases:
        if (base / kernel / "kernel.json").is_file():
            return base / kernel
    suggestion = did_you_mean(kernel, _installed_names(bases)) if bases else ""
    # A name the user typed that matches nothing is bad usage (exit 2), as for `start NAME`.
    raise UsageError(f"no kernelspec {kernel!r}: not a directory with kernel.json, nor a name on JUPYTER_PATH"
                     + (f"; {suggestion}" if suggestion else ""),
                     hint="run `remote-kernel sync`, or `jupyter kernelspec list` to see what is installed")


def _kernelspec_bases() -> list[Path]:
    from jupyter_core.paths import jupyter_path

    return [Path(base) for base in jupyter_path("kernels")]


def _installed_names(bases: list[Path]) -> set[str]:
    """Every kernelspec name on JUPYTER_PATH (only read for the "did you mean" of a miss)."""
    names: set[str] = set()
    for base in bases:
        try:
            names.update(path.parent.name for path in base.glob("*/kernel.json"))
        except OSError:
            continue
    return names


def load_spec_entry(kernel: str) -> Any:
    from remote_kernel.entry import KernelEntry
    from remote_kernel.errors import KernelspecError

    spec_file = find_spec_dir(kernel) / "kernel.json"
    try:
        spec = json.loads(spec_file.read_text(encoding="utf-8"))
        data = spec["metadata"]["remote_kernel"]["entry"]
        return KernelEntry.from_dict(data)
    except OSError as exc:
        raise KernelspecError(f"cannot read {spec_file}: {exc.strerror}") from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise KernelspecError(f"{spec_file} is not a kernelspec written by remote-kernel ({exc!r} missing or invalid)",
                              hint="re-create it with `remote-kernel sync`") from exc

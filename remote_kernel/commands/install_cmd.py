"""remote-kernel install -t TARGET (v1.1): append an entry to the config file and sync it.

The entry is appended as text (remote_kernel.install); nothing the user wrote is rewritten.
With --force, exactly the existing [kernels.NAME] table is cut out (verified by re-parsing) and
the new one appended; an entry written any other way must be edited by hand.
"""

from __future__ import annotations

import argparse
from typing import Any

from remote_kernel.commands.sync_cmd import add_kernelspec_options


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "install", parents=[common],
        help="(v1.1) add a kernel entry for a target to the config file and sync it",
        description="Append a [kernels.NAME] entry (and its host) to the config file, never "
                    "rewriting what is there, then sync that entry.",
    )
    add_target_options(parser)
    parser.add_argument("-n", "--name",
                        help="kernel entry name (default: from the target, e.g. alice-lab)")
    parser.add_argument("-d", "--display-name", help="display name in Jupyter")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing entry with that name (cuts out exactly its "
                             "[kernels.NAME] table, then appends the new one)")
    add_kernelspec_options(parser)


def add_target_options(parser: argparse.ArgumentParser) -> None:
    """The v1.1 target options shared by `install` and the ad-hoc `-t` launch."""
    parser.add_argument("-t", "--target", required=True, metavar="[USER@]HOST[:PORT]",
                        help="the SSH target")
    parser.add_argument("-J", "--jump", action="append", default=[], metavar="JUMP",
                        help="a ProxyJump hop; repeat for a chain")
    parser.add_argument("-i", "--identity", metavar="KEY", help="private key file")
    parser.add_argument("-c", "--command", dest="kernel_command", metavar="COMMAND",
                        help="kernel command, e.g. 'python -m spyder_kernels.console'")
    parser.add_argument("--python", metavar="PYTHON", help="remote python (default: python3)")


def run(args: argparse.Namespace) -> int:
    # Lazy: keeps --help fast (pydantic, jupyter_core).
    from remote_kernel import install
    from remote_kernel.commands import sync_cmd
    from remote_kernel.kernelspec import desired_specs
    from remote_kernel.sync import launcher_python, sync_kernelspecs

    options = install.InstallOptions(
        target=args.target, jumps=tuple(args.jump), identity=args.identity,
        kernel_command=args.kernel_command, python=args.python, name=args.name,
        display_name=args.display_name, force=args.force,
    )
    prepared = install.prepare_install(options, args.config)
    kernels_dir = sync_cmd.target_kernels_dir(args)
    desired = desired_specs([prepared.loaded.entry(prepared.name)], kernels_dir=kernels_dir,
                            config_path=prepared.path, python=launcher_python(args.launcher_python))
    extra = {"config": str(prepared.path), "name": prepared.name, "replaced": prepared.replaced}
    # Refuse before touching the config file if the kernelspec could not be written anyway.
    plan, _ = sync_kernelspecs(desired, kernels_dir=kernels_dir, config_path=prepared.path,
                               prune=False, dry_run=True)
    if plan.conflicts:
        return sync_cmd.report(args, plan, None, mode="apply", command="install", extra=extra)
    install.write_config(prepared)
    plan, result = sync_kernelspecs(desired, kernels_dir=kernels_dir, config_path=prepared.path,
                                    prune=False)
    return sync_cmd.report(args, plan, result, mode="apply", command="install", extra=extra)

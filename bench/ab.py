"""A/B probe: two source trees of remote-kernel side by side, for trying a change before bench/run.py.

    .venv/bin/python bench/ab.py [--base REF] [--rounds R] [--execs N] [--openssh] [--local]

Exports ``REF`` (default HEAD) of this repository into a temporary directory and runs the
kernelspec of each tree (``base``: REF, ``work``: the working tree, chosen through PYTHONPATH) in
the same process, the order rotated per round, with bench/run.py's harness: a cold start of each
(start_kernel -> first kernel_info_reply), then ``1+1`` round trips interleaved in blocks. Prints
medians and work/base ratios. ``--openssh`` and ``--local`` add bench/run.py's baselines.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import run as bench  # bench/run.py

REPO = bench.REPO


def export_tree(ref: str, dest: Path) -> Path:
    """``ref``'s remote_kernel package under ``dest`` (git archive: no worktree left behind)."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref, "remote_kernel"], check=True,
                             capture_output=True).stdout
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def clone_spec(source: str, name: str, tree: Path, env: dict[str, str] | None = None) -> None:
    spec_dir = Path(os.environ["JUPYTER_DATA_DIR"]) / "kernels"
    document = json.loads((spec_dir / source / "kernel.json").read_text(encoding="utf-8"))
    document["env"] = {**document.get("env", {}), **(env or {}), "PYTHONPATH": str(tree)}
    bench.write_spec(name, document)
    bench.KERNELS[name] = name


def interleaved_execs(order: list[str], log: Any, execs: int, results: dict[str, Any]) -> None:
    """Every variant's kernel alive at once, `1+1` in blocks of bench.EXEC_BLOCK, rotated."""
    with contextlib.ExitStack() as stack:
        live = [(variant, stack.enter_context(bench.kernel(variant, log, bench.Samples()))[1]) for variant in order]
        for _, kc in live:
            for _ in range(10):  # warm the path
                bench.run_cell(kc, "1+1")
        for block in range(max(1, execs // bench.EXEC_BLOCK)):
            for variant, kc in bench.rotated(live, block):
                for _ in range(bench.EXEC_BLOCK):
                    results[variant].add("exec", bench.run_cell(kc, "1+1"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="HEAD", help="git ref to compare the working tree with (default HEAD)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--execs", type=int, default=200, help="`1+1` per variant in all (0: startup only)")
    parser.add_argument("--openssh", action="store_true", help="add the OpenSSH -L baseline")
    parser.add_argument("--local", action="store_true", help="add the local ipykernel baseline")
    parser.add_argument("--work-env", action="append", default=[], metavar="NAME=VALUE",
                        help="add a variant `work+env`: the working tree with this environment (a knob to try)")
    parser.add_argument("--nice", type=int, default=0)
    args = parser.parse_args()
    if args.nice:
        os.nice(args.nice)
    root = Path(tempfile.mkdtemp(prefix="rk-ab-"))
    bench.isolate(root)
    # `python -m` puts the working directory first on sys.path: run from the repository, every
    # variant's launcher would import the working tree whatever its PYTHONPATH says.
    os.chdir(root)
    from sshd import SSHServer

    server = SSHServer(root / "sshd")
    variants = ["base", "work"] + (["work+env"] if args.work_env else [])
    variants += (["openssh"] if args.openssh else []) + (["local"] if args.local else [])
    results = {variant: bench.Samples() for variant in variants}
    try:
        server.start()
        bench.write_specs(server, root)
        base_tree = export_tree(args.base, root / "base")
        for tree in (base_tree, REPO):
            bench.compile_bytecode(tree / "remote_kernel")
        clone_spec(bench.KERNELS["ours"], "base", base_tree)
        clone_spec(bench.KERNELS["ours"], "work", REPO)
        if args.work_env:
            clone_spec(bench.KERNELS["ours"], "work+env", REPO, dict(item.split("=", 1) for item in args.work_env))
        with (root / "kernels.log").open("ab") as log:
            for number in range(args.rounds):
                order = bench.rotated(variants, number)
                bench.startups(order, log, results)
                if args.execs:
                    interleaved_execs(order, log, max(bench.EXEC_BLOCK, args.execs // args.rounds), results)
                print(f"  round {number + 1}/{args.rounds} ({', '.join(order)})", flush=True)
    finally:
        with contextlib.suppress(Exception):  # the per-user service the launches started (and its spares)
            bench.stop_service(subprocess.DEVNULL)
        server.stop()
        bench.reap_leftovers(root)
    print(f"\n{'variant':10} {'startup s':>10} {'1+1 ms':>8} {'p99 ms':>8}   vs base")
    base = results["base"].values
    for variant in variants:
        values = results[variant].values
        startup = statistics.median(values["startup"])
        line = f"{variant:10} {startup:10.3f}"
        execs = values.get("exec")
        if execs:
            line += f" {statistics.median(execs) * 1e3:8.2f} {bench.p99(execs) * 1e3:8.2f}"
        ratios = [f"startup {startup / statistics.median(base['startup']):.3f}x"]
        if execs and base.get("exec"):
            ratios.append(f"1+1 {statistics.median(execs) / statistics.median(base['exec']):.3f}x")
        print(f"{line}   {', '.join(ratios)}")
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

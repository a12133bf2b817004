"""Sync 1000 kernel entries: create, no-op re-sync, prune all. Target: each <= 1 s.

Runs in a throwaway HOME/JUPYTER_DATA_DIR (never the real ones). Three ways, side by side:
- in-process: ``cli.main(["sync", ...])`` (load + validate the TOML, plan, apply, print);
- CLI: ``remote-kernel sync`` as a subprocess (adds interpreter start and imports);
- baseline: jupyter_client's KernelSpecManager doing the same (install_kernel_spec per spec,
  get_all_specs for the no-op, remove_kernel_spec per spec), which rescans every spec per call.

    .venv/bin/python bench/sync_1000.py [--entries N] [--repeat R] [--no-baseline] [--tmp DIR]

--tmp /dev/shm (tmpfs) separates our own cost from the disk's: on a busy shared disk, creating
4000 files waits on the filesystem journal, and that wait varies several-fold from run to run.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

STEPS = ("create", "no-op", "prune all")


def isolate(root: Path) -> None:
    for name, sub in (("HOME", "home"), ("JUPYTER_DATA_DIR", "data"), ("JUPYTER_CONFIG_DIR", "cfg"),
                      ("JUPYTER_RUNTIME_DIR", "run"), ("XDG_CONFIG_HOME", "xdg")):
        (root / sub).mkdir(parents=True, exist_ok=True)
        os.environ[name] = str(root / sub)
    for name in ("JUPYTER_PATH", "REMOTE_KERNEL_CONFIG"):
        os.environ.pop(name, None)


def config_text(entries: int) -> str:
    hosts = "".join(f'[hosts.h{i}]\nhostname = "node{i}.example.org"\nuser = "alice"\n\n'
                    for i in range(10))
    kernels = "".join(f'[kernels.k{i:04d}]\nhost = "h{i % 10}"\ndisplay_name = "Kernel {i}"\n'
                      f'setup = ["module load python"]\n\n' for i in range(entries))
    return hosts + kernels


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def in_process(config: Path, text: str) -> list[float]:
    from remote_kernel import cli

    def sync() -> None:
        with contextlib.redirect_stdout(io.StringIO()):
            code = cli.main(["sync", "--config", str(config)])
        assert code == 0, code

    config.write_text(text)
    times = [timed(sync), timed(sync)]
    config.write_text("")
    return [*times, timed(sync)]


def via_cli(config: Path, text: str) -> list[float]:
    command = [str(Path(sys.executable).parent / "remote-kernel"), "sync", "--config", str(config)]

    def sync() -> None:
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, timeout=120)

    config.write_text(text)
    times = [timed(sync), timed(sync)]
    config.write_text("")
    return [*times, timed(sync)]


def baseline(entries: int, scratch: Path) -> list[float]:
    from jupyter_client.kernelspec import KernelSpecManager

    manager = KernelSpecManager()
    source = scratch / "source"
    source.mkdir()
    (source / "kernel.json").write_text(json.dumps(
        {"argv": [sys.executable, "-m", "remote_kernel", "from-spec", "x", "-f", "{connection_file}"],
         "display_name": "x", "language": "python"}))
    names = [f"k{i:04d}" for i in range(entries)]

    def create() -> None:
        for name in names:
            manager.install_kernel_spec(str(source), kernel_name=name, user=True)

    def noop() -> None:
        manager.get_all_specs()

    def prune() -> None:
        for name in names:
            manager.remove_kernel_spec(name)

    return [timed(create), timed(noop), timed(prune)]


def run_once(entries: int, with_baseline: bool, tmp: str | None) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {}
    text = config_text(entries)
    for label, runner in (("in-process", in_process), ("CLI", via_cli)):
        root = Path(tempfile.mkdtemp(prefix="rk-bench-", dir=tmp))
        try:
            isolate(root)
            results[label] = runner(root / "remote-kernels.toml", text)
            left = [p for p in (root / "data" / "kernels").iterdir() if not p.name.startswith(".")]
            assert not left, f"{len(left)} specs left after prune"
        finally:
            shutil.rmtree(root, ignore_errors=True)
    if with_baseline:
        root = Path(tempfile.mkdtemp(prefix="rk-bench-", dir=tmp))
        try:
            isolate(root)
            results["jupyter_client"] = baseline(entries, root)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--entries", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3, help="runs; the median is printed")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--tmp", metavar="DIR", help="where the throwaway data dirs go (default: $TMPDIR)")
    args = parser.parse_args()
    runs = [run_once(args.entries, not args.no_baseline, args.tmp) for _ in range(args.repeat)]
    labels = list(runs[0])
    medians = {label: [statistics.median(run[label][i] for run in runs) for i in range(3)]
               for label in labels}
    minima = {label: [min(run[label][i] for run in runs) for i in range(3)] for label in labels}
    where = args.tmp or tempfile.gettempdir()
    print(f"{args.entries} entries in {where}, {args.repeat} runs: median (best) in seconds; "
          "target <= 1.0 s")
    print(f"{'step':<12}" + "".join(f"{label:>22}" for label in labels)
          + ("   in-process / jupyter_client" if "jupyter_client" in labels else ""))
    for index, step in enumerate(STEPS):
        row = f"{step:<12}" + "".join(
            f"{medians[label][index]:>14.3f} ({minima[label][index]:.3f})" for label in labels)
        if "jupyter_client" in labels:
            ratio = medians["in-process"][index] / medians["jupyter_client"][index]
            row += f"   {ratio:.2f}x"
        print(row)
    worst = max(max(medians[label]) for label in ("in-process", "CLI"))
    verdict = "meets" if worst <= 1.0 else "MISSES"
    print(f"slowest remote-kernel median: {worst:.3f} s -> {verdict} the 1 s target")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

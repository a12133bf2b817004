"""Issue 16 item 5 / issue 12 item 6: a silent outage while the kernel prints fast.

    .venv/bin/python bench/outage.py [--outage 60] [--rate 2000000] [--tree DIR] [--backlog BYTES]

A private sshd (tests/sshd.py) behind tests/blackhole.py (a proxy that stops forwarding without
closing anything); a launcher subprocess (`remote-kernel from-spec`, run from --tree through
PYTHONPATH, so an older checkout can be measured with the same harness); a cell printing numbered
96-byte lines at --rate bytes/s (--flush: in ~100 iopub messages a second, the case where the
kernel's own queue of 1000 messages overflows). 5 s in, the path goes silent for --outage seconds; the cell goes
on for 15 s after it returns. Prints: lines printed, received (each exactly once?), reported
dropped, seconds from silence to the launcher's "link silent"/"lost the connection" line, and
from the path's return to "reattached". Nothing touches the real HOME, ~/.ssh or Jupyter dirs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

LINE = "line {:09d} " + "x" * 80 + "\n"
CELL = """
import sys, time
n, start = 0, time.monotonic()
while time.monotonic() - start < {seconds}:
    sys.stdout.write("".join({line!r}.format(i) for i in range(n, n + {per_tick})))
    n += {per_tick}
    if {flush}:
        sys.stdout.flush()  # one iopub message per tick: ~100 a second
    time.sleep(0.01)
print("total", n)
"""


def isolate(root: Path) -> None:
    for name, sub in (("HOME", "home"), ("JUPYTER_DATA_DIR", "jupyter/data"), ("JUPYTER_CONFIG_DIR", "jupyter/cfg"),
                      ("JUPYTER_RUNTIME_DIR", "jupyter/run"), ("IPYTHONDIR", "home/.ipython")):
        (root / sub).mkdir(parents=True, exist_ok=True)
        os.environ[name] = str(root / sub)
    for name in ("SSH_AUTH_SOCK", "JUPYTER_PATH"):
        os.environ.pop(name, None)


def watch(path: Path, marks: dict[str, float], patterns: dict[str, str], stop: threading.Event) -> None:
    """Record when each pattern first appears in the launcher's stderr."""
    while not stop.is_set():
        text = path.read_text(errors="replace") if path.exists() else ""
        for key, pattern in patterns.items():
            if key not in marks and re.search(pattern, text):
                marks[key] = time.monotonic()
        time.sleep(0.05)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--outage", type=float, default=60.0)
    parser.add_argument("--rate", type=int, default=2_000_000)
    parser.add_argument("--tree", type=Path, default=REPO)
    parser.add_argument("--backlog", type=int, default=None, help="output_backlog (default: the config default)")
    parser.add_argument("--flush", action="store_true",
                        help="flush every 10 ms: ~100 iopub messages a second (ipykernel batches 0.2 s otherwise)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rk-outage-") as temp:
        root = Path(temp)
        isolate(root)
        result = measure(root, args)
    print(json.dumps(result, indent=1))
    return 0


def measure(root: Path, args: Any) -> dict[str, Any]:
    from blackhole import Blackhole
    from jupyter_client.blocking.client import BlockingKernelClient
    from launch_helpers import collect, kernel_entry, write_spec
    from sshd import SSHServer

    server = SSHServer(root / "sshd").start()
    try:
        with Blackhole(server.port) as proxy:
            known = root / "known_hosts_proxy"
            known.write_text(server.known_hosts_line(f"[{server.host}]:{proxy.port}"))
            host = server.host_entry(name="fixture", port=proxy.port, known_hosts=str(known))
            fields: dict[str, Any] = {"reconnect_grace": 600.0}
            if args.backlog:
                fields["output_backlog"] = args.backlog
            spec = write_spec(kernel_entry(server, sys.executable, "outage", host=host, **fields))
            connection_file, stderr_path = root / "outage.json", root / "launcher.stderr"
            env = {**os.environ, "PYTHONPATH": str(args.tree)}
            with stderr_path.open("w") as stderr:
                launcher = subprocess.Popen([sys.executable, "-m", "remote_kernel", "from-spec", str(spec), "-f",
                                             str(connection_file)], stdin=subprocess.DEVNULL, stderr=stderr,
                                            stdout=subprocess.DEVNULL, env=env, cwd=root, start_new_session=True)
            try:
                while not connection_file.exists():
                    time.sleep(0.1)
                kc = BlockingKernelClient(connection_file=str(connection_file))
                kc.load_connection_file()
                kc.start_channels()
                kc.wait_for_ready(timeout=60)
                return run_outage(kc, proxy, stderr_path, args, collect)
            finally:
                launcher.terminate()
                launcher.wait(timeout=30)
    finally:
        server.stop()


def run_outage(kc: Any, proxy: Any, stderr_path: Path, args: Any, collect: Any) -> dict[str, Any]:
    per_tick = max(1, args.rate // 100 // len(LINE.format(0)))
    msg_id = kc.execute(CELL.format(seconds=5 + args.outage + 15, line=LINE, per_tick=per_tick, flush=args.flush))
    marks: dict[str, float] = {}
    stop = threading.Event()
    patterns = {"lost": r"link silent|lost the connection|no answer", "reattached": r"reattached"}
    threading.Thread(target=watch, args=(stderr_path, marks, patterns, stop), daemon=True).start()
    time.sleep(5)
    silenced = time.monotonic()
    proxy.silence()
    time.sleep(args.outage)
    proxy.restore()
    restored = time.monotonic()
    execution = collect(kc, msg_id, timeout=args.outage + 300)
    stop.set()
    numbers = [int(line.split()[1]) for line in execution.stdout.splitlines() if line.startswith("line ")]
    total = next(int(line.split()[1]) for line in execution.stdout.splitlines() if line.startswith("total "))
    reported = sum(int(n.replace(",", "")) for n in re.findall(r"\[remote-kernel\] ([\d,]+) lines", execution.stderr))
    log = stderr_path.read_text(errors="replace")
    return {
        "tree": str(args.tree), "outage_s": args.outage, "rate_bytes_per_s": args.rate, "flush": args.flush,
        "lines_printed": total, "lines_received": len(numbers), "lines_lost": total - len(numbers),
        "received_once_in_order": numbers == sorted(set(numbers)), "lines_reported_dropped": reported,
        "detected_after_s": round(marks["lost"] - silenced, 1) if "lost" in marks else None,
        "reattached_after_return_s": round(marks["reattached"] - restored, 1) if "reattached" in marks else None,
        "said_nothing_was_lost": "nothing was lost" in log,
        "log": [line for line in log.splitlines() if re.search(r"lost|silent|reattach|dropped", line)][-8:],
    }


if __name__ == "__main__":
    raise SystemExit(main())

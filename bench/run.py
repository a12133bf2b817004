"""Issue 6 benchmark: remote-kernel side by side with a local ipykernel and OpenSSH ``ssh -L``.

    .venv/bin/python bench/run.py [--quick] [--rounds R] [--execs N] [--controlmaster] [--out bench/RESULTS.md]
    .venv/bin/python bench/run.py --rtt 0,20,80 [--quick]   # latency mode: bench/latency.py

One run starts a private sshd on 127.0.0.1 (tests/sshd.py), writes three kernelspecs into a
throw-away JUPYTER_DATA_DIR and drives each through jupyter_client's KernelManager, as Jupyter does:

- ``local``: ipykernel on this machine (the limit);
- ``openssh``: bench/openssh_kernel.py, one ``ssh -L`` x5 that also runs the remote ipykernel (TCP);
- ``ours``: the kernelspec ``remote-kernel sync`` writes (``python -m remote_kernel from-spec``).

Every round runs every variant, in an order rotated per round: first a cold start of each, one
kernel alive at a time; then all three kernels at once, the data-path work interleaved in blocks.
Measured per variant: startup (start_kernel -> first kernel_info_reply, the request re-sent every
1 s as jupyter_client's wait_for_ready does), ``1+1`` round trip to idle, ``print('x' * 50_000_000)``,
a 20 MB display_data, interrupt -> KeyboardInterrupt on iopub (signal and message mode), shutdown,
and the CPU time the relay processes spend (ssh or our launcher, plus sshd and our agent on the
"remote"), which is what a 2-core machine pays for. Then ``sync`` of 1000 entries
(bench/sync_1000.py) and the wall time of ``remote-kernel --help`` / ``list``. Prints medians and
ratios; writes bench/RESULTS.md. Nothing touches the real HOME, ~/.ssh or Jupyter directories.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import queue
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(REPO / "tests"))  # tests/sshd.py: the private sshd
sys.path.insert(0, str(BENCH_DIR))  # sync_1000.py

VENV_BIN = Path(sys.executable).parent
CLI = VENV_BIN / "remote-kernel"
SSH = shutil.which("ssh") or "/usr/bin/ssh"
VARIANTS = ("local", "openssh", "ours")  # the default run; --controlmaster adds "cm"
KERNELS = {"local": "python3", "openssh": "bench-openssh", "ours": "bench-ours", "cm": "bench-cm"}
READY_TIMEOUT = 30.0
CELL_TIMEOUT = 120.0
RESEND = 1.0  # re-send kernel_info like jupyter_client's wait_for_ready (a lost request costs 1 s)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PRINT_50MB = "print('x' * 50_000_000)"
IMAGE_SETUP = ("import base64 as _b, os as _o\nfrom IPython.display import display as _display\n"
               "_rk_png = _b.b64encode(_o.urandom(15_000_000)).decode()")  # 20 MB of base64
IMAGE_20MB = "_display({'image/png': _rk_png}, raw=True)"
SLEEP_CELL = "import time; time.sleep(60)"
EXEC_BLOCK = 25  # `1+1` cells per variant in a row before the next variant's turn
BULK_REPEAT = 2  # 50 MB prints and 20 MB displays per variant per round


# ------------------------------------------------------------------------------------ setup


def isolate(root: Path) -> None:
    """Point HOME, Jupyter, IPython and XDG at ``root``; drop anything that could leak in."""
    for name, sub in (("HOME", "home"), ("JUPYTER_DATA_DIR", "jupyter/data"), ("JUPYTER_CONFIG_DIR", "jupyter/cfg"),
                      ("JUPYTER_RUNTIME_DIR", "jupyter/run"), ("IPYTHONDIR", "home/.ipython"),
                      ("XDG_CONFIG_HOME", "xdg/config"), ("XDG_DATA_HOME", "xdg/data"),
                      ("XDG_CACHE_HOME", "xdg/cache"), ("XDG_RUNTIME_DIR", "xdg/run")):
        (root / sub).mkdir(parents=True, exist_ok=True)
        os.environ[name] = str(root / sub)
    for name in ("JUPYTER_PATH", "JUPYTER_PREFER_ENV_PATH", "JUPYTER_PLATFORM_DIRS", "SSH_AUTH_SOCK",
                 "SSH_AGENT_PID", "REMOTE_KERNEL_CONFIG"):
        os.environ.pop(name, None)
    (root / "home" / ".ssh").mkdir(mode=0o700, exist_ok=True)


def compile_bytecode(package: Path) -> None:
    """What `pip install` does for every package: with PYTHONDONTWRITEBYTECODE=1 (set on our
    machines) an editable install would otherwise compile remote_kernel's ~4000 lines at every
    launch (~30 ms of each start, measured), which no installed copy pays."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(package)], check=True)


def write_spec(name: str, document: dict[str, Any]) -> Path:
    spec_dir = Path(os.environ["JUPYTER_DATA_DIR"]) / "kernels" / name
    spec_dir.mkdir(parents=True, exist_ok=True)
    (spec_dir / "kernel.json").write_text(json.dumps(document, indent=1), encoding="utf-8")
    return spec_dir


def write_specs(server: Any, root: Path, *, control_path: Path | None = None) -> Path:
    """The kernelspecs (local, OpenSSH -L, remote-kernel, and with ``control_path`` OpenSSH over
    that warm ControlMaster); returns a config file naming the ``ours`` entry (for ``list``)."""
    write_spec(KERNELS["local"], {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                                  "display_name": "local", "language": "python", "interrupt_mode": "signal"})
    remote_dir = root / "remote-files"
    remote_dir.mkdir(mode=0o700, exist_ok=True)
    write_openssh_spec(KERNELS["openssh"], openssh_settings(server, server.port, remote_dir))
    if control_path is not None:
        write_openssh_spec(KERNELS["cm"], openssh_settings(server, server.port, remote_dir, control_path))
    return write_ours_spec(KERNELS["ours"], server, root, port=server.port, alias="bench")


def openssh_settings(server: Any, port: int, remote_dir: Path, control_path: Path | None = None) -> dict[str, Any]:
    """bench/openssh_kernel.py's settings: reach ``server`` on ``port`` (its own, or a delay proxy's)."""
    settings: dict[str, Any] = {
        "host": server.host, "port": port, "user": server.user, "key": str(server.client_key),
        "known_hosts": str(server.known_hosts), "python": sys.executable, "remote_dir": str(remote_dir), "ssh": SSH}
    if control_path is not None:
        settings["control_path"] = str(control_path)
    return settings


def write_openssh_spec(name: str, settings: dict[str, Any]) -> None:
    spec_dir = Path(os.environ["JUPYTER_DATA_DIR"]) / "kernels" / name
    spec_dir.mkdir(parents=True, exist_ok=True)
    (spec_dir / "settings.json").write_text(json.dumps(settings), encoding="utf-8")
    display = "OpenSSH, warm ControlMaster" if settings.get("control_path") else "OpenSSH -L"
    write_spec(name, {"argv": [sys.executable, str(BENCH_DIR / "openssh_kernel.py"), "{connection_file}",
                               str(spec_dir / "settings.json")],
                      "display_name": display, "language": "python", "interrupt_mode": "message"})


def write_ours_spec(name: str, server: Any, root: Path, *, port: int, alias: str) -> Path:
    """The kernelspec `remote-kernel sync` writes for host ``alias`` = ``server`` on ``port``; returns
    the config file it names."""
    from remote_kernel.entry import KernelEntry
    from remote_kernel.kernelspec import render_kernel_json

    config = root / f"remote-kernels-{alias}.toml"
    config.write_text(
        f'[hosts.{alias}]\nhostname = "{server.host}"\nport = {port}\nuser = "{server.user}"\n'
        f'identity_file = "{server.client_key}"\nknown_hosts = "{server.known_hosts}"\n\n'
        f'[kernels.{name}]\nhost = "{alias}"\npython = "{sys.executable}"\nreconnect_grace = 10\n',
        encoding="utf-8")
    entry = KernelEntry(name=name, host=server.host_entry(name=alias, port=port), display_name="remote-kernel",
                        python=sys.executable, reconnect_grace=10.0, interrupt_mode="signal")
    spec_dir = Path(os.environ["JUPYTER_DATA_DIR"]) / "kernels" / entry.name
    write_spec(entry.name, render_kernel_json(entry, spec_dir=spec_dir, config_path=config, python=sys.executable))
    return config


# ------------------------------------------------------------------------------------ warm ControlMaster, service


class ControlMaster:
    """``ssh -M -S PATH -N`` to ``server`` on ``port``, started (and authenticated) before any timed
    start, as the savvy user's ``ControlMaster auto`` + ``ControlPersist`` leaves it; our child."""

    def __init__(self, server: Any, port: int, path: Path, log: Any) -> None:
        self.path = path
        self.base = [SSH, "-F", "none", "-i", str(server.client_key), "-o", "IdentitiesOnly=yes",
                     "-o", f"UserKnownHostsFile={server.known_hosts}", "-o", "StrictHostKeyChecking=yes",
                     "-o", "BatchMode=yes", "-p", str(port), "-S", str(path)]
        self.target = f"{server.user}@{server.host}"
        self.proc = subprocess.Popen([*self.base, "-M", "-N", self.target], stdin=subprocess.DEVNULL,
                                     stdout=log, stderr=log)
        self.remote: set[int] = set()  # the master's processes under sshd, for the relay's CPU

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the ControlMaster ssh exited with {self.proc.returncode} (see the kernels log)")
            check = subprocess.run([*self.base, "-O", "check", self.target], capture_output=True, check=False)
            if check.returncode == 0:
                return
            time.sleep(0.05)
        raise RuntimeError(f"the ControlMaster at {self.path} was not ready within {timeout} s")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)


def service_exists() -> bool:
    """Has remote-kernel a per-user service (issue 14)? Only then is a second kernel on a host
    different from the first, and only then must a first start find no service running."""
    probe = subprocess.run([str(CLI), "service", "--help"], capture_output=True, check=False, timeout=60)
    return probe.returncode == 0


def service_pids() -> list[int]:
    """The running service's pid, if this tree has a service and it runs."""
    try:
        from remote_kernel.service import paths
        from remote_kernel.service.testing import service_pid
    except ImportError:
        return []
    pid = service_pid(paths.runtime_dir())
    return [pid] if pid is not None else []


def stop_service(log: Any, timeout: float = 15.0) -> None:
    """No service and so no connection held for any host: the next start is a first start.
    `service stop` answers before the service has exited, and a launch in that moment reaches the
    dying service ("the per-user service ended before kernel ... was ready"): wait for its pid lock."""
    subprocess.run([str(CLI), "service", "stop"], stdout=log, stderr=log, check=False, timeout=60)
    deadline = time.monotonic() + timeout
    while service_pids():
        if time.monotonic() > deadline:
            raise RuntimeError(f"remote-kernel's service still runs {timeout} s after `service stop`")
        time.sleep(0.01)


# ------------------------------------------------------------------------------------ kernel driving


@dataclass
class Samples:
    """Every figure of one variant, pooled over the rounds."""

    values: dict[str, list[float]] = field(default_factory=dict)

    def add(self, metric: str, value: float) -> None:
        self.values.setdefault(metric, []).append(value)


def wait_kernel_info(km: Any, kc: Any, resend: float, started: float) -> float:
    """Seconds from ``started`` to the first kernel_info_reply, re-sending the request every ``resend``."""
    deadline = started + READY_TIMEOUT
    while time.perf_counter() < deadline:
        kc.kernel_info()
        try:
            msg = kc.get_shell_msg(timeout=resend)
        except queue.Empty:
            if not km.is_alive():
                raise RuntimeError(f"{km.kernel_name} died before replying to kernel_info") from None
            continue
        if msg["msg_type"] == "kernel_info_reply":
            return time.perf_counter() - started
    raise RuntimeError(f"{km.kernel_name}: no kernel_info_reply within {READY_TIMEOUT} s")


def wait_idle(kc: Any, msg_id: str, timeout: float = CELL_TIMEOUT, *, until: str | None = None) -> dict[str, Any]:
    """Read iopub until the ``idle`` of ``msg_id`` (or, with ``until``, a message of that type)."""
    deadline = time.monotonic() + timeout
    while True:
        msg = kc.get_iopub_msg(timeout=max(0.01, deadline - time.monotonic()))
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        kind = msg["msg_type"]
        if kind == until or (until is None and kind == "status" and msg["content"]["execution_state"] == "idle"):
            return dict(msg)


def drain_shell(kc: Any) -> None:
    with contextlib.suppress(queue.Empty):
        while True:
            kc.get_shell_msg(timeout=0.01)


def settle(kc: Any) -> None:
    """Make sure iopub is subscribed (a SUB socket misses what precedes its subscription)."""
    for _ in range(40):
        msg_id = kc.execute("None", store_history=False)
        with contextlib.suppress(queue.Empty):
            wait_idle(kc, msg_id, timeout=0.5)
            drain_shell(kc)
            return
    raise RuntimeError("iopub never delivered an idle status")


def run_cell(kc: Any, code: str) -> float:
    started = time.perf_counter()
    msg_id = kc.execute(code)
    wait_idle(kc, msg_id)
    elapsed = time.perf_counter() - started
    reply = kc.get_shell_msg(timeout=CELL_TIMEOUT)
    if reply["content"]["status"] != "ok":
        raise RuntimeError(f"{code!r} failed: {reply['content']}")
    return elapsed


def interrupt_latency(km: Any, kc: Any, mode: str) -> float:
    """Interrupt a sleeping cell; seconds from the request to KeyboardInterrupt on iopub."""
    msg_id = kc.execute(SLEEP_CELL)
    wait_idle(kc, msg_id, until="execute_input")
    time.sleep(0.1)  # let the cell reach time.sleep
    started = time.perf_counter()
    if mode == "signal":
        km.interrupt_kernel()  # the spec says signal: jupyter_client signals the kernel's process group
    else:  # what jupyter_client sends in message mode
        kc.control_channel.send(kc.session.msg("interrupt_request", {}))
    error = wait_idle(kc, msg_id, timeout=30, until="error")
    elapsed = time.perf_counter() - started
    if error["content"]["ename"] != "KeyboardInterrupt":
        raise RuntimeError(f"interrupt raised {error['content']['ename']}")
    wait_idle(kc, msg_id)
    drain_shell(kc)
    with contextlib.suppress(queue.Empty):
        while True:
            kc.get_control_msg(timeout=0.05)
    return elapsed


@contextlib.contextmanager
def kernel(variant: str, log: Any, samples: Samples, *, metric: str = "startup") -> Iterator[tuple[Any, Any]]:
    """Start ``variant``'s kernel as Jupyter does, record its startup (as ``metric``), shut it down
    at the end. A start that never answers is counted (``failed_starts``), logged and tried once more."""
    for attempt in (1, 2):
        km, kc = start_kernel(variant, log, samples, metric=metric)
        if kc is not None:
            break
        samples.add("failed_starts", 1.0)
        log.write(f"\n===== {variant}: no kernel_info_reply (attempt {attempt})\n".encode())
        log.flush()
        km.shutdown_kernel(now=True)
        if attempt == 2:
            raise RuntimeError(f"{variant}: the kernel never answered kernel_info (see {log.name})")
    try:
        yield km, kc
    finally:
        kc.stop_channels()
        began = time.perf_counter()
        km.shutdown_kernel(now=False)
        samples.add("shutdown", time.perf_counter() - began)


def start_kernel(variant: str, log: Any, samples: Samples, *, metric: str = "startup") -> tuple[Any, Any]:
    """(manager, ready client), or (manager, None) when the kernel did not answer."""
    from jupyter_client.manager import KernelManager

    km = KernelManager(kernel_name=KERNELS[variant])
    started = time.perf_counter()
    km.start_kernel(stdout=log, stderr=log)
    kc = km.client()
    kc.start_channels()
    try:
        samples.add(metric, wait_kernel_info(km, kc, RESEND, started))
        drain_shell(kc)
        settle(kc)
    except RuntimeError:
        kc.stop_channels()
        return km, None
    return km, kc


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of ``pids`` from /proc (processes that are gone count 0)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


SPARE_MARKER = b"remote-kernel-spare"  # bootstrap.SPARE_MARKER: on a spare's agent and kernel
SHELLS = frozenset(("sh", "bash", "dash", "zsh"))


def relay_pids(km: Any, kc: Any, remote: set[int]) -> list[int]:
    """The processes between client and kernel: ssh or our launcher, and of ``remote`` (what this
    kernel's login added under sshd: its session processes, our agent) all but the kernel, and but
    a spare kernel the service made after this start (issue 14) and its agent: they wait for the
    next start, they relay nothing (its own agent and kernel, if this start took a spare, carry the
    marker too)."""
    msg_id = kc.execute("import os as _os; print(_os.getpid(), _os.getppid())")
    kernel_pid, agent_pid = map(int, wait_idle(kc, msg_id, until="stream")["content"]["text"].split())
    wait_idle(kc, msg_id)
    drain_shell(kc)
    mine = {kernel_pid, agent_pid}
    return [km.provisioner.process.pid, *(pid for pid in remote
                                         if pid != kernel_pid and (pid in mine or SPARE_MARKER not in _cmdline(pid)))]


def _cmdline(pid: int) -> bytes:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    return b""


def settled_descendants(sshd_pid: int, timeout: float = 3.0) -> set[int]:
    """What runs under sshd once no login shell is left in it: a start's shell execs the agent,
    a spare's too (made in the background just after a start), and only then do command lines say
    what each process is (bounded: a shell that stays is reported as it is)."""
    from sshd import descendants_of

    deadline = time.monotonic() + timeout
    while True:
        pids = set(descendants_of(sshd_pid))
        shells = [pid for pid in pids if _comm(pid) in SHELLS]
        if not shells or time.monotonic() > deadline:
            return pids
        time.sleep(0.02)


def _comm(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/comm").read_text().strip()
    return ""


def timed_with_cpu(kc: Any, code: str, cells: int, *, samples: Samples, metric: str, pids: list[int]) -> None:
    """Run ``code`` ``cells`` times; record each wall time, and the relay's CPU per cell."""
    before = cpu_seconds(pids)
    for _ in range(cells):
        samples.add(metric, run_cell(kc, code))
    if pids:
        samples.add(f"{metric}_cpu", cpu_seconds(pids) - before)
        samples.add(f"{metric}_cpu_cells", float(cells))


@dataclass
class Live:
    """A started kernel of one variant, with what is measured on it."""

    variant: str
    km: Any
    kc: Any
    samples: Samples
    relay: list[int]


def rotated(items: list[Any], by: int) -> list[Any]:
    return items[by % len(items):] + items[: by % len(items)]


def startups(order: list[str], log: Any, results: dict[str, Samples], *, service: bool = False) -> None:
    """One cold start (and shutdown) of each variant, one kernel alive at a time. With remote-kernel's
    service (``service``), it is stopped before ``ours`` starts: each start is a first start."""
    for variant in order:
        if service and variant == "ours":
            stop_service(log)
        with kernel(variant, log, results[variant]):
            pass


def data_path(order: list[str], log: Any, execs: int, results: dict[str, Samples], sshd_pid: int, *,
              shared_relay: dict[str, list[int]] | None = None) -> None:
    """Every variant's kernel alive at once; the same work interleaved in blocks, so that a busy
    moment of the machine falls on all of them alike. ``shared_relay``: processes a variant's
    traffic also crosses that its start did not add (a ControlMaster's ssh and its sshd)."""
    with contextlib.ExitStack() as stack:
        from sshd import descendants_of

        live = []
        for variant in order:
            before = set(descendants_of(sshd_pid))
            # Not a cold start (ours: the service, its connection and a spare are there): kept apart.
            km, kc = stack.enter_context(kernel(variant, log, results[variant], metric="startup_warm"))
            remote = settled_descendants(sshd_pid) - before
            relay = relay_pids(km, kc, remote) if variant != "local" else []
            relay += (shared_relay or {}).get(variant, [])
            if variant == "ours":
                relay += service_pids()  # with the service, the relay runs in it, not in the launcher
            live.append(Live(variant, km, kc, results[variant], relay))
        for item in live:
            for _ in range(10):  # warm the path (first-call imports in the kernel and the client)
                run_cell(item.kc, "1+1")
            run_cell(item.kc, IMAGE_SETUP)
        blocks = max(1, execs // EXEC_BLOCK)
        for block in range(blocks):
            for item in rotated(live, block):
                timed_with_cpu(item.kc, "1+1", EXEC_BLOCK, samples=item.samples, metric="exec", pids=item.relay)
        for repeat in range(BULK_REPEAT):
            for item in rotated(live, repeat):
                timed_with_cpu(item.kc, PRINT_50MB, 1, samples=item.samples, metric="print50", pids=item.relay)
            for item in rotated(live, repeat + 1):
                item.samples.add("image20", run_cell(item.kc, IMAGE_20MB))
        for item in live:
            if item.variant not in ("openssh", "cm"):  # a signal to the ssh process would end the connection
                item.samples.add("int_signal", interrupt_latency(item.km, item.kc, "signal"))
            item.samples.add("int_message", interrupt_latency(item.km, item.kc, "message"))


# ------------------------------------------------------------------------------------ commands and sync


def best_wall(argv: list[str], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
        best = min(best, time.perf_counter() - started)
    return best


def command_times(config: Path, repeat: int) -> dict[str, float]:
    return {
        "python -c pass (floor)": best_wall([sys.executable, "-c", "pass"], repeat),
        "remote-kernel --help": best_wall([str(CLI), "--help"], repeat),
        "remote-kernel list": best_wall([str(CLI), "--config", str(config), "list"], repeat),
        "remote-kernel from-spec --help": best_wall([str(CLI), "from-spec", "--help"], repeat),
    }


def sync_times(entries: int, repeat: int, with_baseline: bool) -> dict[str, list[float]]:
    """bench/sync_1000.py's measurement (median of ``repeat``), in its own throw-away dirs."""
    import sync_1000

    saved = dict(os.environ)
    try:
        runs = [sync_1000.run_once(entries, with_baseline and index == 0, None) for index in range(repeat)]
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return {label: [statistics.median(run[label][i] for run in runs if label in run) for i in range(3)]
            for label in runs[0]}


# ------------------------------------------------------------------------------------ report


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[98] if len(values) > 1 else values[0]


ROWS: tuple[tuple[str, str, str, float], ...] = (
    # (label, metric, statistic, scale to display unit)
    ("startup to kernel_info_reply, s", "startup", "median", 1.0),
    ("`1+1` round trip, ms, median", "exec", "median", 1000.0),
    ("`1+1` round trip, ms, p99", "exec", "p99", 1000.0),
    ("relay CPU per `1+1`, ms", "exec_cpu", "per_cell", 1000.0),
    ("print 50 MB, s", "print50", "median", 1.0),
    ("relay CPU per 50 MB print, s", "print50_cpu", "per_cell", 1.0),
    ("display_data 20 MB, s", "image20", "median", 1.0),
    ("interrupt, signal mode, ms", "int_signal", "median", 1000.0),
    ("interrupt, message mode, ms", "int_message", "median", 1000.0),
    ("shutdown, s", "shutdown", "median", 1.0),
    ("starts that never answered (retried)", "failed_starts", "count", 1.0),
)


def statistic(samples: Samples, metric: str, kind: str) -> float | None:
    values = samples.values.get(metric)
    if not values:
        return None
    if kind == "count":
        return float(len(values))
    if kind == "per_cell":  # CPU is counted in clock ticks (10 ms): total over total, not a median
        return sum(values) / sum(samples.values[f"{metric}_cells"])
    return p99(values) if kind == "p99" else statistics.median(values)


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "-"


def cell(value: float | None, scale: float) -> str:
    if value is None:
        return "-"
    shown = value * scale
    return f"{shown:.1f}" if scale > 1 else f"{shown:.3f}"


def kernel_table(results: dict[str, Samples]) -> list[list[str]]:
    """The RTT-0 table; with a ControlMaster run (--controlmaster) a column for it and ours/CM."""
    with_cm = bool(results.get("cm") and results["cm"].values)
    head = ["measure", "local", "OpenSSH -L", *(["OpenSSH, warm CM"] if with_cm else []), "remote-kernel",
            "ours/local", "OpenSSH/local", "ours/OpenSSH", *(["ours/CM"] if with_cm else [])]
    rows = [head]
    for label, metric, kind, scale in ROWS:
        local, openssh, ours = (statistic(results[v], metric, kind) for v in VARIANTS)
        cm = [statistic(results["cm"], metric, kind)] if with_cm else []
        if kind == "count":
            counts = (local, openssh, *cm, ours)
            rows.append([label, *(str(int(value or 0)) for value in counts), *[""] * (len(head) - 1 - len(counts))])
            continue
        rows.append([label, cell(local, scale), cell(openssh, scale), *(cell(value, scale) for value in cm),
                     cell(ours, scale), ratio(ours, local), ratio(openssh, local), ratio(ours, openssh),
                     *(ratio(ours, value) for value in cm)])
    return rows


def target_checks(results: dict[str, Samples], commands: dict[str, float],
                  sync: dict[str, list[float]]) -> list[tuple[str, str, bool]]:
    def get(variant: str, metric: str, kind: str = "median") -> float:
        value = statistic(results[variant], metric, kind)
        return value if value is not None else float("nan")

    checks = [
        ("exec median <= 1.10x local", get("ours", "exec") / get("local", "exec"), 1.10),
        ("exec p99 <= 1.5x local", get("ours", "exec", "p99") / get("local", "exec", "p99"), 1.5),
        ("print 50 MB <= 1.15x OpenSSH", get("ours", "print50") / get("openssh", "print50"), 1.15),
        ("startup <= 1.0x OpenSSH", get("ours", "startup") / get("openssh", "startup"), 1.0),
    ]
    lines = [(label, f"{value:.2f}x", value <= limit) for label, value, limit in checks]
    help_time = commands["remote-kernel --help"]
    lines.append(("`remote-kernel --help` <= 0.3 s", f"{help_time:.3f} s", help_time <= 0.3))
    for label in ("in-process", "CLI"):
        if label in sync:
            worst = max(sync[label])
            lines.append((f"sync 1000 ({label}) <= 1 s each", f"worst {worst:.3f} s", worst <= 1.0))
    return lines


def markdown(rows: list[list[str]]) -> str:
    head, *body = rows
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def plain(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(text.ljust(widths[i]) if i == 0 else text.rjust(widths[i])
                               for i, text in enumerate(row)) for row in rows)


def versions() -> dict[str, str]:
    found = {"Python": platform.python_version()}
    for name in ("paramiko", "pyzmq", "ipykernel", "jupyter_client", "remote-kernel"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[name] = importlib.metadata.version(name)
    import zmq

    found["libzmq"] = zmq.zmq_version()
    probe = subprocess.run([SSH, "-V"], capture_output=True, text=True, check=False)
    found["OpenSSH"] = (probe.stderr or probe.stdout).strip().split(",")[0]
    return found


@dataclass
class Report:
    args: argparse.Namespace
    results: dict[str, Samples]
    commands: dict[str, float]
    sync: dict[str, list[float]]
    seconds: float
    load: tuple[float, float, float]

    def tables(self) -> tuple[list[list[str]], list[list[str]], list[list[str]], list[list[str]]]:
        kernels = kernel_table(self.results)
        commands = [["command", f"best of {self.args.cli_repeat}, s"]]
        commands += [[name, f"{value:.3f}"] for name, value in self.commands.items()]
        labels = list(self.sync)
        sync = [["sync 1000 entries, s", *labels]]
        for index, step in enumerate(("create", "no-op", "prune all")):
            sync.append([step, *(f"{self.sync[label][index]:.3f}" for label in labels)])
        checks = [["target", "measured", "met"]]
        checks += [[label, value, "yes" if met else "**NO**"]
                   for label, value, met in target_checks(self.results, self.commands, self.sync)]
        return kernels, commands, sync, checks

    def counts(self) -> str:
        ours = self.results["ours"].values
        return (f"{self.args.rounds} rounds, order rotated per round; {len(ours.get('startup', []))} starts and "
                f"{len(ours.get('exec', []))} `1+1` per variant; niceness {os.nice(0)}")

    def text(self) -> str:
        return "\n\n".join(plain(table) for table in self.tables() if len(table[0]) > 1)

    def markdown(self) -> str:
        kernels, commands, sync, checks = self.tables()
        version_line = ", ".join(f"{name} {value}" for name, value in versions().items())
        when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
        return "\n".join([
            "# Benchmark results (issue 6)",
            "",
            f"Written by `bench/run.py{' --quick' if self.args.quick else ''}` on {when} in {self.seconds:.0f} s.",
            f"Machine: {os.cpu_count()} cores (`os.cpu_count()`), {platform.machine()}, "
            f"{platform.system()} {platform.release()}; load average at start "
            f"{self.load[0]:.2f} {self.load[1]:.2f} {self.load[2]:.2f}.",
            f"Versions: {version_line}.",
            f"Sample: {self.counts()}. Figures are medians unless marked p99. Loopback sshd (tests/sshd.py).",
            "",
            "## Kernels: local ipykernel vs OpenSSH `ssh -L` x5 vs remote-kernel",
            "", markdown(kernels), "",
            "## Targets", "", markdown(checks), "",
            "## Commands (wall time, subprocess)", "", markdown(commands), "",
            *(["## sync (bench/sync_1000.py)", "", markdown(sync), ""] if self.sync else []),
        ])


# ------------------------------------------------------------------------------------ main


LATENCY_HEADING = "## Latency: "  # RESULTS.md's --rtt section, from this heading to the end


def write_results(path: Path, text: str, *, keep: str) -> None:
    """Write ``text`` to ``path``, keeping the part of the old file from the heading ``keep`` on
    (the RTT-0 run and the --rtt run each rewrite their own part of RESULTS.md)."""
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    at = old.find("\n" + keep)
    kept = old[at:] if at >= 0 and keep not in text else ""
    path.write_text(text.rstrip("\n") + "\n" + kept, encoding="utf-8")


def reap_leftovers(root: Path) -> None:
    """Kill what this run started and left behind (a kernel whose ssh was killed after a start that
    never answered is re-parented to init, out of sshd's tree): processes naming our temp dir."""
    marker = str(root).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if marker in (entry / "cmdline").read_bytes():
                os.kill(int(entry.name), signal.SIGKILL)
                print(f"  killed leftover process {entry.name}", file=sys.stderr)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 rounds, 100 `1+1` samples: under a minute")
    parser.add_argument("--rounds", type=int, help="rounds of every variant (default 10; 2 with --quick)")
    parser.add_argument("--execs", type=int, help="`1+1` samples per variant in all (default 500; 100 with --quick)")
    parser.add_argument("--variants", help="comma-separated subset (for profiling; default: every variant)")
    parser.add_argument("--controlmaster", action="store_true",
                        help="add OpenSSH over a warm ControlMaster (started before the timed starts) to the RTT-0 "
                             "table; always part of --rtt")
    parser.add_argument("--rtt", type=rtt_list, metavar="MS,MS,...",
                        help="latency mode: every SSH variant through bench/delay_proxy.py at each of these round-trip "
                             "times (e.g. 0,20,80), one table per RTT in RESULTS.md's latency section (see README)")
    parser.add_argument("--no-sync", action="store_true", help="skip the sync rows")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "RESULTS.md")
    parser.add_argument("--nice", type=int, default=0,
                        help="add this to the niceness of the bench and everything it starts (negative needs root): "
                             "on a shared machine, -10 keeps other work from dominating the variance")
    args = parser.parse_args()
    if args.rtt:  # per RTT; a `1+1` costs one RTT and a 50 MB print several, so fewer than at RTT 0
        args.rounds = args.rounds or (2 if args.quick else 5)
        args.execs = args.execs or (20 if args.quick else 150)
    args.rounds = args.rounds or (2 if args.quick else 10)
    args.execs = args.execs or (100 if args.quick else 500)
    args.cli_repeat = 5 if args.quick else 10
    return args


def rtt_list(text: str) -> list[float]:
    try:
        values = [float(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--rtt {text!r}: expected milliseconds separated by commas, "
                                         "e.g. --rtt 0,20,80") from None
    if not values or any(value < 0 for value in values):
        raise argparse.ArgumentTypeError(f"--rtt {text!r}: expected one or more round-trip times >= 0 ms")
    return sorted(set(values))


def run_kernels(args: argparse.Namespace, log: Any, sshd_pid: int,
                shared_relay: dict[str, list[int]]) -> dict[str, Samples]:
    every = (*VARIANTS, "cm") if args.controlmaster else VARIANTS
    chosen = [v for v in every if v in (args.variants or ",".join(every)).split(",")]
    results = {variant: Samples() for variant in every}
    per_round = max(EXEC_BLOCK, args.execs // args.rounds)
    service = service_exists()
    for number in range(args.rounds):
        order = rotated(chosen, number)
        began = time.perf_counter()
        log.write(f"\n===== round {number + 1}: {', '.join(order)}\n".encode())
        log.flush()
        startups(order, log, results, service=service)
        data_path(order, log, per_round, results, sshd_pid, shared_relay=shared_relay)
        print(f"  round {number + 1}/{args.rounds} ({', '.join(order)}) {time.perf_counter() - began:5.1f} s",
              flush=True)
    return results


def start_master(server: Any, root: Path, log: Any) -> tuple[ControlMaster, list[int]]:
    """The warm ControlMaster of --controlmaster, and the processes its traffic crosses (its ssh,
    its sshd) that no kernel start adds."""
    from sshd import descendants_of

    before = set(descendants_of(server.pid))
    master = ControlMaster(server, server.port, root / "cm.sock", log)
    master.wait_ready()
    return master, [master.proc.pid, *(set(descendants_of(server.pid)) - before)]


def main() -> int:
    args = parse_args()
    if args.nice:
        os.nice(args.nice)
    if args.rtt:
        import latency

        return latency.main(args)
    started = time.perf_counter()
    load = os.getloadavg()
    root = Path(tempfile.mkdtemp(prefix="rk-bench-"))
    isolate(root)
    from sshd import SSHServer

    server = SSHServer(root / "sshd")
    log_path = root / "kernels.log"
    stack = contextlib.ExitStack()
    try:
        server.start()
        config = write_specs(server, root, control_path=root / "cm.sock" if args.controlmaster else None)
        subprocess.run([sys.executable, "-c", "import ipykernel.kernelapp"], check=True)  # warm the page cache
        compile_bytecode(REPO / "remote_kernel")
        with log_path.open("ab") as log:
            shared_relay: dict[str, list[int]] = {}
            if args.controlmaster:
                master, shared_relay["cm"] = start_master(server, root, log)
                stack.callback(master.stop)
            results = run_kernels(args, log, server.pid, shared_relay)
        print("  commands ...", flush=True)
        commands = command_times(config, args.cli_repeat)
        sync: dict[str, list[float]] = {}
        if not args.no_sync:
            print("  sync 1000 ...", flush=True)
            sync = sync_times(1000, 1 if args.quick else 3, with_baseline=not args.quick)
    except BaseException:
        print(f"kernel logs: {log_path}\n{log_path.read_text(errors='replace')[-4000:] if log_path.exists() else ''}",
              file=sys.stderr)
        raise
    finally:
        stack.close()
        if service_exists():
            stop_service(subprocess.DEVNULL)
        server.stop()
        reap_leftovers(root)
    report = Report(args, results, commands, sync, time.perf_counter() - started, load)
    print()
    print(report.text())
    write_results(args.out, report.markdown(), keep=LATENCY_HEADING)
    print(f"\nwritten to {args.out}")
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

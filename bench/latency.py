"""bench/run.py's latency mode (``--rtt 0,20,80``): every SSH variant through a delay proxy.

    .venv/bin/python bench/run.py --rtt 0,20,80 [--quick] [--rounds R] [--execs N] [--out FILE]

For each RTT, bench/delay_proxy.py listens on 127.0.0.1 and forwards to the private sshd with
RTT/2 added in each direction (the proxy runs at RTT 0 too, so the RTTs differ only by the delay);
a known_hosts line names the proxy's address with the sshd's host key. Variants, side by side in
one run, one kernel alive at a time for startups, all alive at once for the data path:

- ``local``: ipykernel on this machine (the limit; the same at every RTT);
- ``openssh``: bench/openssh_kernel.py, one ``ssh -L`` x5 that also runs the kernel;
- ``cm``: the same over a warm ControlMaster (``ssh -M -S PATH -N`` through the proxy, started and
  authenticated before any timed start; the kernel's ssh rides it with ``-S PATH``);
- ``ours``: remote-kernel's kernelspec, its ``[hosts]`` port the proxy's. A first kernel on the
  host: when remote-kernel has a per-user service (``remote-kernel service`` exists), the service is
  stopped before each such start, so no connection is held;
- ``ours2``: only with the service: a second kernel on the host, started while a first one (not
  timed) is alive, so its start can ride the service's connection.

Measures: startup (start_kernel -> first kernel_info_reply), ``1+1`` median/p99, print 50 MB,
and shutdown until nothing remains (shutdown_kernel, then until the launcher, the kernel and every
process the start added under sshd are gone; a connection kept on purpose, the ControlMaster's or
the service's, is not counted). Round trips on the startup path: (startup at the highest RTT -
startup at the lowest) / (the difference of the RTTs); with ``--rtt 0,20,80`` that is
(startup at 80 ms - startup at 0 ms) / 0.080 s. Nothing touches the real HOME, ~/.ssh or Jupyter.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import run as bench  # bench/run.py: the harness, specs, ControlMaster, report helpers

SPARE_MARKER = "remote-kernel-spare"  # bootstrap.SPARE_MARKER (a base tree of ab.py may not have it)

VARIANTS = ("local", "openssh", "cm", "ours", "ours2")
LABELS = {"local": "local", "openssh": "OpenSSH -L", "cm": "OpenSSH, warm CM", "ours": "remote-kernel",
          "ours2": "remote-kernel, 2nd kernel"}
SHORT = {"openssh": "-L", "cm": "CM", "ours": "ours", "ours2": "2nd"}
GONE_TIMEOUT = 15.0  # shutdown until nothing remains: past this, count what is left and move on
EXEC_BLOCK = 10  # `1+1` per variant in a row (fewer than at RTT 0: each costs a round trip)
PROXY_TIMEOUT = 10.0


# ------------------------------------------------------------------------------------ the proxy


class DelayProxy:
    """bench/delay_proxy.py as our child process, forwarding to 127.0.0.1:``target``."""

    def __init__(self, target: int, rtt_ms: float, log: Any) -> None:
        self.rtt_ms = rtt_ms
        self.proc = subprocess.Popen(
            [sys.executable, str(bench.BENCH_DIR / "delay_proxy.py"), "--target", str(target),
             "--delay-ms", str(rtt_ms / 2)], stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL)
        self.port = self._read_port()

    def _read_port(self) -> int:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], PROXY_TIMEOUT)
        line = self.proc.stdout.readline().decode() if ready else ""
        if not line.startswith("listening on "):
            self.stop()
            raise RuntimeError(f"bench/delay_proxy.py did not start within {PROXY_TIMEOUT} s (said {line!r}; "
                               "see the kernels log)")
        return int(line.rsplit(":", 1)[1])

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)


def _echo_server() -> socket.socket:
    """Echo every connection (a thread each) until the listener is shut down."""
    listener = socket.create_server(("127.0.0.1", 0))

    def echo(conn: socket.socket) -> None:
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with contextlib.suppress(OSError):
                while data := conn.recv(1 << 20):
                    conn.sendall(data)

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                threading.Thread(target=echo, args=(listener.accept()[0],), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return listener


def _ping_ms(port: int, count: int) -> float:
    """Median round trip of a 64-byte message, ms."""
    with socket.create_connection(("127.0.0.1", port), timeout=PROXY_TIMEOUT) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        trips = []
        for _ in range(count + 1):  # the first pays the proxy's connect upstream
            started = time.perf_counter()
            sock.sendall(b"x" * 64)
            got = 0
            while got < 64:
                got += len(sock.recv(64 - got))
            trips.append(time.perf_counter() - started)
    return statistics.median(trips[1:]) * 1000


def _stream_mb_s(port: int, megabytes: int) -> float:
    """MB/s of ``megabytes`` sent through the echo server and read back (both directions loaded)."""
    payload = b"x" * (1 << 20)
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        def send() -> None:
            for _ in range(megabytes):
                sock.sendall(payload)

        started = time.perf_counter()
        sender = threading.Thread(target=send)
        sender.start()
        received = 0
        while received < megabytes << 20:
            chunk = sock.recv(1 << 20)
            if not chunk:
                raise RuntimeError("the echo connection closed while measuring the proxy")
            received += len(chunk)
        sender.join()
    return megabytes * 1.048576 / (time.perf_counter() - started)


def proxy_overhead(rtts: list[float], log: Any, megabytes: int) -> list[list[str]]:
    """The proxy alone, against an echo server on 127.0.0.1: round trip and throughput, direct and
    through the proxy at each RTT. Rows for the report."""
    listener = _echo_server()
    target = int(listener.getsockname()[1])
    rows = [["path", "64 B round trip, ms (median)", f"{megabytes} MB echoed, MB/s"]]
    try:
        rows.append(["direct (no proxy)", f"{_ping_ms(target, 200):.3f}", f"{_stream_mb_s(target, megabytes):.0f}"])
        for rtt in rtts:
            proxy = DelayProxy(target, rtt, log)
            try:
                pings = 200 if rtt == 0 else max(5, int(2000 / max(rtt, 1)))
                rows.append([f"proxy, RTT {rtt:g} ms", f"{_ping_ms(proxy.port, pings):.3f}",
                             f"{_stream_mb_s(proxy.port, megabytes):.0f}"])
            finally:
                proxy.stop()
    finally:
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
    return rows


# ------------------------------------------------------------------------------------ one RTT's set-up


def rtt_tag(rtt: float) -> str:
    return f"{rtt:g}".replace(".", "_")


def key(variant: str, rtt: float) -> str:
    """bench.KERNELS key of ``variant`` at ``rtt``."""
    return f"{variant}@{rtt_tag(rtt)}"


@dataclass
class Link:
    """One RTT: its proxy, its ControlMaster and the kernelspecs that go through them."""

    rtt: float
    proxy: DelayProxy
    master: bench.ControlMaster | None = None


def open_link(server: Any, root: Path, rtt: float, log: Any, stack: contextlib.ExitStack) -> Link:
    proxy = DelayProxy(server.port, rtt, log)
    stack.callback(proxy.stop)
    with server.known_hosts.open("a", encoding="utf-8") as known:  # the proxy's address, sshd's key
        known.write(server.known_hosts_line(f"[127.0.0.1]:{proxy.port}"))
    tag = rtt_tag(rtt)
    remote_dir = root / "remote-files"
    remote_dir.mkdir(mode=0o700, exist_ok=True)
    names = {"local": "python3", "openssh": f"bench-openssh-rtt{tag}", "cm": f"bench-cm-rtt{tag}",
             "ours": f"bench-ours-rtt{tag}", "ours2": f"bench-ours-rtt{tag}"}  # ours2: the same kernelspec
    for variant, name in names.items():
        bench.KERNELS[key(variant, rtt)] = name
    bench.write_openssh_spec(names["openssh"], bench.openssh_settings(server, proxy.port, remote_dir))
    control_path = root / f"cm{tag}.sock"
    bench.write_openssh_spec(names["cm"], bench.openssh_settings(server, proxy.port, remote_dir, control_path))
    bench.write_ours_spec(names["ours"], server, root, port=proxy.port, alias=f"bench-rtt{tag}")
    master = bench.ControlMaster(server, proxy.port, control_path, log)
    stack.callback(master.stop)
    master.wait_ready()
    return Link(rtt, proxy, master)


# ------------------------------------------------------------------------------------ measuring


@dataclass
class Run:
    """What every measurement of this run needs."""

    log: Any
    sshd_pid: int
    service: bool
    results: dict[tuple[float, str], bench.Samples]


@dataclass
class Started:
    """A kernel of one variant and what must be gone after its shutdown."""

    km: Any
    kc: Any
    watch: list[int] = field(default_factory=list)
    kernel: int = 0  # the kernel's pid ...
    agent: int = 0  # ... and its parent's (our agent; 0 for OpenSSH)

    def kept_spare(self, pid: int) -> bool:
        """A spare kernel (or its agent) the service keeps on purpose for the next start, as a
        ControlMaster keeps its connection: not left behind by this kernel (its own kernel and
        agent, when it took a spare, carry the marker too and are not excused)."""
        if pid in (self.kernel, self.agent):
            return False
        with contextlib.suppress(OSError):
            return SPARE_MARKER.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
        return False


def process_name(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/comm").read_text().strip()
    return ""


def kernel_pid(kc: Any) -> int:
    msg_id = kc.execute("import os as _os; print(_os.getpid())", store_history=False)
    pid = int(bench.wait_idle(kc, msg_id, until="stream")["content"]["text"])
    bench.wait_idle(kc, msg_id)
    bench.drain_shell(kc)
    return pid


def start(run: Run, variant: str, rtt: float, samples: bench.Samples) -> Started:
    """Start ``variant`` at ``rtt`` (startup recorded in ``samples``; one retry, counted), and note
    the processes it added: its launcher (ssh or ours), its kernel, what appeared under sshd
    (without sshd's own processes when the connection is kept on purpose)."""
    from sshd import descendants_of

    log, sshd_pid = run.log, run.sshd_pid
    for attempt in (1, 2):
        before = set(descendants_of(sshd_pid))
        km, kc = bench.start_kernel(key(variant, rtt), log, samples)
        if kc is not None:
            break
        samples.add("failed_starts", 1.0)
        log.write(f"\n===== {variant} at RTT {rtt:g}: no kernel_info_reply (attempt {attempt})\n".encode())
        km.shutdown_kernel(now=True)
        if attempt == 2:
            raise RuntimeError(f"{variant} at RTT {rtt:g} ms: the kernel never answered kernel_info "
                               f"(see {log.name})")
    added = set(descendants_of(sshd_pid)) - before
    if keeps_connection(variant, run.service):
        added = {pid for pid in added if process_name(pid) != "sshd"}
    kernel = kernel_pid(kc)
    return Started(km, kc, [km.provisioner.process.pid, kernel, *added], kernel=kernel, agent=parent_pid(kernel))


def parent_pid(pid: int) -> int:
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    return 0


def shutdown_until_gone(started: Started, samples: bench.Samples | None) -> None:
    """shutdown_kernel, then wait until every watched process is gone; recorded as ``gone``."""
    from sshd import process_gone

    started.kc.stop_channels()
    began = time.perf_counter()
    started.km.shutdown_kernel(now=False)
    deadline = began + GONE_TIMEOUT
    left = [pid for pid in started.watch if not process_gone(pid) and not started.kept_spare(pid)]
    while left and time.perf_counter() < deadline:
        time.sleep(0.005)
        left = [pid for pid in left if not process_gone(pid) and not started.kept_spare(pid)]
    if samples is not None:
        samples.add("gone", time.perf_counter() - began)
        if left:
            samples.add("left_behind", float(len(left)))


@contextlib.contextmanager
def alive(run: Run, variant: str, rtt: float, samples: bench.Samples) -> Iterator[Started]:
    """A started kernel, shut down (until nothing remains) on exit; its startup recorded in ``samples``."""
    started = start(run, variant, rtt, samples)
    try:
        yield started
    finally:
        shutdown_until_gone(started, samples)


def keeps_connection(variant: str, service: bool) -> bool:
    return variant == "cm" or (service and variant in ("ours", "ours2"))


def startups(run: Run, link: Link, order: list[str], starts: int) -> None:
    """``starts`` cold starts of each variant at ``link``'s RTT, one kernel alive at a time (and, for
    ``ours2``, the untimed first kernel it joins), each shut down until nothing remains."""
    for _ in range(starts):
        for variant in order:
            samples = run.results[link.rtt, variant]
            if variant == "ours" and run.service:
                bench.stop_service(run.log)
            with contextlib.ExitStack() as stack:
                if variant == "ours2":
                    stack.enter_context(alive(run, "ours", link.rtt, bench.Samples()))
                started = start(run, variant, link.rtt, samples)
                shutdown_until_gone(started, samples)


def data_path(run: Run, link: Link, order: list[str], execs: int, prints: int) -> None:
    """Every variant's kernel alive at once (``ours`` before ``ours2``); `1+1` in blocks and 50 MB
    prints, interleaved so a busy moment of the machine falls on all of them alike."""
    with contextlib.ExitStack() as stack:
        live = []
        for variant in sorted(order, key=lambda v: v == "ours2"):
            started = stack.enter_context(alive(run, variant, link.rtt, bench.Samples()))
            live.append((variant, started.kc))
        for _, kc in live:
            for _ in range(3):  # warm the path (first-call imports in the kernel and the client)
                bench.run_cell(kc, "1+1")
        for block in range(max(1, execs // EXEC_BLOCK)):
            for variant, kc in bench.rotated(live, block):
                for _ in range(EXEC_BLOCK):
                    run.results[link.rtt, variant].add("exec", bench.run_cell(kc, "1+1"))
        for repeat in range(prints):
            for variant, kc in bench.rotated(live, repeat):
                run.results[link.rtt, variant].add("print50", bench.run_cell(kc, bench.PRINT_50MB))


# ------------------------------------------------------------------------------------ report


ROWS: tuple[tuple[str, str, str, float], ...] = (
    ("startup to kernel_info_reply, s", "startup", "median", 1.0),
    ("`1+1` round trip, ms, median", "exec", "median", 1000.0),
    ("`1+1` round trip, ms, p99", "exec", "p99", 1000.0),
    ("print 50 MB, s", "print50", "median", 1.0),
    ("shutdown until nothing remains, s", "gone", "median", 1.0),
    ("starts that never answered (retried)", "failed_starts", "count", 1.0),
    ("processes left after 15 s", "left_behind", "count", 1.0),
)


def rtt_table(results: dict[tuple[float, str], bench.Samples], rtt: float, variants: list[str]) -> list[list[str]]:
    remote = [v for v in variants if v != "local"]
    against_cm = [v for v in remote if v != "cm"]
    head = ["measure", *(LABELS[v] for v in variants), *(f"{SHORT[v]}/local" for v in remote),
            *(f"{SHORT[v]}/CM" for v in against_cm)]
    rows = [head]
    for label, metric, kind, scale in ROWS:
        value = {v: bench.statistic(results[rtt, v], metric, kind) for v in variants}
        if kind == "count":
            counts = [str(int(value[v] or 0)) for v in variants]
            rows.append([label, *counts, *[""] * (len(head) - 1 - len(counts))])
            continue
        rows.append([label, *(bench.cell(value[v], scale) for v in variants),
                     *(bench.ratio(value[v], value.get("local")) for v in remote),
                     *(bench.ratio(value[v], value.get("cm")) for v in against_cm)])
    return rows


def round_trip_table(results: dict[tuple[float, str], bench.Samples], rtts: list[float],
                     variants: list[str]) -> list[list[str]]:
    low, high = rtts[0], rtts[-1]
    span = (high - low) / 1000
    rows = [["variant", f"startup at {low:g} ms, s", f"startup at {high:g} ms, s", "round trips, startup",
             "round trips, shutdown until gone"]]
    for variant in variants:
        if variant == "local":
            continue
        figures = {}
        for metric in ("startup", "gone"):
            a = bench.statistic(results[low, variant], metric, "median")
            b = bench.statistic(results[high, variant], metric, "median")
            trips = f"{round((b - a) / span, 1) + 0.0:.1f}" if a is not None and b is not None else "-"  # no -0.0
            figures[metric] = (a, b, trips)
        a, b, trips = figures["startup"]
        rows.append([LABELS[variant], bench.cell(a, 1.0), bench.cell(b, 1.0), trips, figures["gone"][2]])
    return rows


@dataclass
class Report:
    args: argparse.Namespace
    variants: list[str]
    results: dict[tuple[float, str], bench.Samples]
    overhead: list[list[str]]
    seconds: float
    load: tuple[float, float, float]

    def sections(self) -> list[tuple[str, list[list[str]]]]:
        found = [(f"RTT {rtt:g} ms", rtt_table(self.results, rtt, self.variants)) for rtt in self.args.rtt]
        if len(self.args.rtt) > 1:
            low, high = self.args.rtt[0], self.args.rtt[-1]
            found.append((f"Round trips: (median startup at {high:g} ms - at {low:g} ms) / "
                          f"{(high - low) / 1000:g} s", round_trip_table(self.results, self.args.rtt, self.variants)))
        found.append(("The proxy alone (echo server on 127.0.0.1, same run)", self.overhead))
        return found

    def text(self) -> str:
        return "\n\n".join(f"{title}\n{bench.plain(rows)}" for title, rows in self.sections())

    def markdown(self) -> str:
        rtts = " / ".join(f"{rtt:g}" for rtt in self.args.rtt)
        when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
        versions = ", ".join(f"{name} {value}" for name, value in bench.versions().items())
        sample = self.results[self.args.rtt[0], self.variants[-1]].values  # any variant: the same counts
        absent = "" if "ours2" in self.variants else (
            " remote-kernel has no `service` command in this tree: no second-kernel column.")
        lines = [
            f"{bench.LATENCY_HEADING}RTT {rtts} ms through bench/delay_proxy.py",
            "",
            f"Written by `bench/run.py --rtt {','.join(f'{r:g}' for r in self.args.rtt)}"
            f"{' --quick' if self.args.quick else ''}` on {when} in {self.seconds:.0f} s; "
            f"{os.cpu_count()} cores, {platform.machine()}; load average at start "
            f"{self.load[0]:.2f} {self.load[1]:.2f} {self.load[2]:.2f}; niceness {os.nice(0)}.",
            f"Versions: {versions}.",
            f"Sample per RTT and variant: {len(sample.get('startup', []))} starts, {len(sample.get('exec', []))} "
            f"`1+1`, {len(sample.get('print50', []))} prints of 50 MB ({self.args.rounds} rounds, order rotated)."
            f"{absent} Medians unless marked p99; bench/README.md says what each column means.",
            "",
        ]
        for title, rows in self.sections():
            lines += [f"### {title}", "", bench.markdown(rows), ""]
        return "\n".join(lines)


def write_section(path: Path, text: str) -> None:
    """Replace RESULTS.md's latency section (from its heading to the end), keep the RTT-0 part."""
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    at = old.find("\n" + bench.LATENCY_HEADING)
    head = old[: at + 1] if at >= 0 else (old.rstrip("\n") + "\n\n" if old else "")
    path.write_text(head + text.rstrip("\n") + "\n", encoding="utf-8")


# ------------------------------------------------------------------------------------ main


def chosen_variants(args: argparse.Namespace, service: bool) -> list[str]:
    every = [v for v in VARIANTS if v != "ours2" or service]
    wanted = (args.variants or ",".join(every)).split(",")
    return [v for v in every if v in wanted]


def measure(args: argparse.Namespace, server: Any, root: Path, log: Any) -> Report:
    started_at = time.perf_counter()
    load = os.getloadavg()
    service = bench.service_exists()
    variants = chosen_variants(args, service)
    print(f"  the proxy alone ... (remote-kernel service: {'yes' if service else 'not in this tree'})", flush=True)
    overhead = proxy_overhead(args.rtt, log, 50 if args.quick else 200)
    run = Run(log, server.pid, service, {(rtt, v): bench.Samples() for rtt in args.rtt for v in variants})
    starts = 1 if args.quick else 2
    execs = max(EXEC_BLOCK, args.execs // args.rounds)
    with contextlib.ExitStack() as stack:
        links = [open_link(server, root, rtt, log, stack) for rtt in args.rtt]
        for number in range(args.rounds):
            for link in bench.rotated(links, number):
                began = time.perf_counter()
                order = bench.rotated(variants, number)
                log.write(f"\n===== round {number + 1}, RTT {link.rtt:g} ms: {', '.join(order)}\n".encode())
                log.flush()
                startups(run, link, order, starts)
                data_path(run, link, order, execs, prints=1)
                print(f"  round {number + 1}/{args.rounds} RTT {link.rtt:g} ms ({', '.join(order)}) "
                      f"{time.perf_counter() - began:5.1f} s", flush=True)
    return Report(args, variants, run.results, overhead, time.perf_counter() - started_at, load)


def main(args: argparse.Namespace) -> int:
    root = Path(tempfile.mkdtemp(prefix="rk-rtt-"))
    bench.isolate(root)
    from sshd import SSHServer

    server = SSHServer(root / "sshd")
    log_path = root / "kernels.log"
    try:
        server.start()
        bench.write_specs(server, root)  # the local kernelspec (and the RTT-0 ones, unused here)
        subprocess.run([sys.executable, "-c", "import ipykernel.kernelapp"], check=True)  # warm the page cache
        bench.compile_bytecode(bench.REPO / "remote_kernel")
        with log_path.open("ab") as log:
            report = measure(args, server, root, log)
    except BaseException:
        tail = log_path.read_text(errors="replace")[-4000:] if log_path.exists() else ""
        print(f"kernel logs: {log_path}\n{tail}", file=sys.stderr)
        raise
    finally:
        if bench.service_exists():
            bench.stop_service(subprocess.DEVNULL)
        server.stop()
        bench.reap_leftovers(root)
    print()
    print(report.text())
    write_section(args.out, report.markdown())
    print(f"\nwritten to {args.out} (its latency section)")
    if any(samples.values.get("failed_starts") for samples in report.results.values()):
        print(f"a start never answered: kernel logs kept in {log_path}")  # the rest of {root} goes
        for entry in root.iterdir():
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
        return 0
    shutil.rmtree(root, ignore_errors=True)
    return 0

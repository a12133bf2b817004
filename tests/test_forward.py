"""Forwarded ports (issue 18 part 3): a remote TCP port reached on 127.0.0.1 through the kernel's
own link (forward.py, tunnel.py, remote/agent.py), never through SSH port forwarding."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import http.server
import json
import re
import secrets
import socket
import statistics
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import SSHDFactory
from datapath_harness import WAIT, Rig, pattern, read_exactly, rig_fixture  # noqa: F401 - fixture rig
from launch_helpers import (
    connect_client,
    execute,
    kernel_entry,
    launched_cli,
    run_cli,
    started_kernel,
    wait_until,
    write_spec,
)
from os_users import OSUser, os_user_fixture, os_users_fixture, run_python_as  # noqa: F401 - fixtures
from sshd import SSHServer
from test_config import only_problem, write
from test_launch import _assert_forwarding_is_refused
from test_slurm import client_of, our_job, ready_kernel, slurm_entry

from remote_kernel.config import load_config
from remote_kernel.entry import HostEntry, KernelEntry
from remote_kernel.forward import format_forward, parse_forward

# --- config ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("written", "parsed"), [
    (8787, (8787, 8787)), ("6006", (6006, 6006)), ("8888:9999", (8888, 9999)), (" 1 : 65535 ", (1, 65535)),
])
def test_a_forward_is_a_remote_port_or_remote_colon_local(written: object, parsed: tuple[int, int]) -> None:
    assert parse_forward(written) == parsed


@pytest.mark.parametrize("written", [0, 65536, True, 8787.0, "", "http", "8787:", ":8787", "1:2:3", "99999", [8787]])
def test_anything_else_is_not_a_forward(written: object) -> None:
    with pytest.raises(ValueError, match="65535"):
        parse_forward(written)


def test_forward_is_stored_as_written_and_inherited_from_the_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, """
        [defaults]
        forward = [8787]
        [kernels.inherits]
        host = "alice@lab"
        [kernels.own]
        host = "alice@lab"
        forward = [8787, "6006", "8888:9999"]
    """)
    entries = load_config(path).entries()
    assert entries["inherits"].forward == ("8787",)
    assert entries["own"].forward == ("8787", "6006", "8888:9999")
    assert [parse_forward(item) for item in entries["own"].forward] == [(8787, 8787), (6006, 6006), (8888, 9999)]
    assert format_forward(8888, 9999) == "8888:9999"


@pytest.mark.parametrize("written", ["[0]", "[70000]", '["8787:x"]', "[true]", "[8787.5]", "8787"])
def test_a_bad_forward_names_the_key_and_its_line(tmp_path: Path, written: str) -> None:
    problem = only_problem(write(tmp_path, f'[kernels.k]\nhost = "alice@lab"\n\nforward = {written}\n'))
    assert problem.key.startswith("kernels.k.forward") and problem.line == 4
    assert '"REMOTE:LOCAL"' in problem.message and "65535" in problem.message


def test_an_entry_without_forwards_keeps_its_stored_form() -> None:
    entry = KernelEntry(name="k", host=HostEntry(name="h"), display_name="k")
    assert "forward" not in entry.to_dict()
    wider = KernelEntry(name="k", host=HostEntry(name="h"), display_name="k", forward=("8787",))
    assert KernelEntry.from_dict(wider.to_dict()) == wider and wider.fingerprint() != entry.fingerprint()


# --- end to end: the sshd fixture, real ipykernel, the launcher as Jupyter runs it -----------------------

# An HTTP server on the "remote" host, started inside the kernel (a thread of the kernel process).
SERVE_IN_KERNEL = """
import functools as _f, http.server as _h, threading as _t
_server = _h.ThreadingHTTPServer(("127.0.0.1", {port}), _f.partial(_h.SimpleHTTPRequestHandler, directory={site!r}))
_t.Thread(target=_server.serve_forever, daemon=True).start()
print("serving", _server.server_address[1])
"""
FORWARDING = re.compile(r"forwarding 127\.0\.0\.1:(\d+) to port (\d+) on")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def a_site(tmp_path: Path, text: str) -> Path:
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "index.html").write_text(f"<html><body>{text}</body></html>\n", encoding="utf-8")
    return site


def http_get(port: int, path: str = "/", timeout: float = 20.0) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as reply:
        return str(reply.read().decode())


@contextlib.contextmanager
def served(server: SSHServer, python: Path, tmp_path: Path, name: str, **fields: Any) -> Iterator[tuple[Any, Any]]:
    """The launcher (`from-spec`, as Jupyter runs it) for an entry with ``fields``, and a ready client."""
    spec = write_spec(kernel_entry(server, python, name, **fields))
    connection_file = tmp_path / f"{name}.json"
    with launched_cli(["from-spec", str(spec), "-f", str(connection_file)],
                      stderr_path=tmp_path / f"{name}.stderr") as launcher:
        assert wait_until(connection_file.exists, timeout=30), launcher.stderr
        kc = connect_client(connection_file, launcher=launcher)
        try:
            yield launcher, kc
        finally:
            kc.stop_channels()


def closed_at_once(port: int) -> bool:
    """A request on ``port`` gets no answer: the connection ends (a FIN, or a reset when it is
    closed with the request still unread)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        try:
            client.sendall(b"GET / HTTP/1.0\r\n\r\n")
            client.settimeout(10)
            return client.recv(1024) == b""
        except (ConnectionResetError, BrokenPipeError):
            return True


def serve_in_kernel(kc: Any, port: int, site: Path) -> None:
    assert execute(kc, SERVE_IN_KERNEL.format(port=port, site=str(site))).stdout.strip() == f"serving {port}"


@pytest.mark.slow
def test_a_page_served_on_the_remote_by_the_kernel_is_reached_on_the_local_port(
    sshd: SSHServer, remote_python: Path, tmp_path: Path
) -> None:
    remote, local = free_port(), free_port()
    marker = f"page-{secrets.token_hex(6)}"
    with served(sshd, remote_python, tmp_path, "fwd", forward=(f"{remote}:{local}",)) as (launcher, kc):
        serve_in_kernel(kc, remote, a_site(tmp_path, marker))
        assert marker in http_get(local)
        assert marker in http_get(local, "/index.html")  # a second connection on the same forward
        assert execute(kc, "1+1").result == "2"
    assert f"forwarding 127.0.0.1:{local} to port {remote} on" in launcher.stderr


@pytest.mark.slow
def test_a_remote_port_nobody_listens_on_closes_the_local_connection_says_so_and_the_kernel_lives(
    sshd: SSHServer, remote_python: Path, tmp_path: Path
) -> None:
    remote, local = free_port(), free_port()
    with served(sshd, remote_python, tmp_path, "nobody", forward=(f"{remote}:{local}",)) as (launcher, kc):
        for _ in range(3):  # a browser retrying: each connection is closed, the log says it once
            assert closed_at_once(local)
        assert execute(kc, "1+1").result == "2"
        said = f"nothing listens on remote port {remote}"
        assert wait_until(lambda: said in launcher.stderr, timeout=10), launcher.stderr
    assert launcher.stderr.count(said) == 1, launcher.stderr


@contextlib.contextmanager
def http_server_thread(port: int, site: Path) -> Iterator[None]:
    """An HTTP server of the test itself on 127.0.0.1:``port`` (the "remote" host is this machine)."""
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", port), functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.mark.slow
def test_a_taken_local_port_is_replaced_by_a_free_one_and_the_log_says_which(
    sshd: SSHServer, remote_python: Path, tmp_path: Path
) -> None:
    # forward = [PORT]: here the remote host is this machine, so the remote server itself holds
    # 127.0.0.1:PORT and the launcher must serve the forward on another local port.
    port, marker = free_port(), f"page-{secrets.token_hex(6)}"
    with http_server_thread(port, a_site(tmp_path, marker)), \
            served(sshd, remote_python, tmp_path, "taken", forward=(str(port),)) as (launcher, kc):
        match = FORWARDING.search(launcher.stderr)
        assert match is not None and int(match[2]) == port, launcher.stderr
        local = int(match[1])
        assert local != port and f"local port {port} is taken" in launcher.stderr
        assert marker in http_get(local)
        assert execute(kc, "1+1").result == "2"


@pytest.mark.slow
def test_forwarding_works_through_an_sshd_that_allows_no_tcp_forwarding(
    sshd_factory: SSHDFactory, remote_python: Path, tmp_path: Path
) -> None:
    server = sshd_factory(extra_config="AllowTcpForwarding no")
    _assert_forwarding_is_refused(server)
    remote, local = free_port(), free_port()
    marker = f"page-{secrets.token_hex(6)}"
    with served(server, remote_python, tmp_path, "noforwarding", forward=(f"{remote}:{local}",)) as (_, kc):
        serve_in_kernel(kc, remote, a_site(tmp_path, marker))
        assert marker in http_get(local)


PROBE_AS_OTHER = """
import json, socket
with socket.create_connection(("127.0.0.1", LOCAL), timeout=10) as sock:
    sock.settimeout(10)
    try:
        sock.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n")
        data = sock.recv(65536)
    except OSError as exc:
        data = b""
print(json.dumps({"answer": data.decode("latin-1")}))
"""


@pytest.mark.slow
def test_another_os_user_cannot_use_the_local_forward_port(
    sshd: SSHServer, remote_python: Path, tmp_path: Path, os_user: OSUser
) -> None:
    remote, local = free_port(), free_port()
    marker = f"page-{secrets.token_hex(6)}"
    with served(sshd, remote_python, tmp_path, "mine", forward=(f"{remote}:{local}",)) as (launcher, kc):
        serve_in_kernel(kc, remote, a_site(tmp_path, marker))
        result = run_python_as(os_user, PROBE_AS_OTHER.replace("LOCAL", str(local)))
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == {"answer": ""}
        assert marker in http_get(local)  # the owner is served
    assert f"refused a connection to the kernel from uid {os_user.uid}" in launcher.stderr


DOWNLOAD_BYTES = 100 * 1024 * 1024
ANSWER_BOUND = 10.0  # seconds: generous; the figures are printed, never asserted


def timed_executions(kc: Any, keep_going: Callable[[int], bool]) -> list[float]:
    """Round trips of `1+1` (each must answer within ANSWER_BOUND) while ``keep_going(done)``."""
    times: list[float] = []
    while keep_going(len(times)):
        began = time.perf_counter()
        assert execute(kc, "1+1", timeout=ANSWER_BOUND).result == "2"
        times.append(time.perf_counter() - began)
    return times


def p99(times: list[float]) -> float:
    return sorted(times)[min(len(times) - 1, int(len(times) * 0.99))]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_100_mb_download_through_a_forward_never_stops_the_kernel_answering(
    sshd: SSHServer, remote_python: Path, tmp_path: Path
) -> None:
    remote, local = free_port(), free_port()
    site = a_site(tmp_path, "big")
    with (site / "big.bin").open("wb") as big:
        big.truncate(DOWNLOAD_BYTES)
    server = subprocess.Popen(  # a server process of its own, as a dashboard would be
        [str(remote_python), "-m", "http.server", str(remote), "--bind", "127.0.0.1", "--directory", str(site)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with served(sshd, remote_python, tmp_path, "bulk", forward=(f"{remote}:{local}",)) as (_, kc):
            assert wait_until(lambda: "big" in http_get(local), timeout=20)
            quiet = timed_executions(kc, lambda done: done < 200)
            received: list[int] = []
            download = threading.Thread(target=lambda: received.append(fetch_size(local, "/big.bin")))
            download.start()
            busy = timed_executions(kc, lambda done: download.is_alive() or done < 20)
            download.join(timeout=120)
            assert received == [DOWNLOAD_BYTES]
            assert execute(kc, "1+1").result == "2"
    finally:
        server.kill()
        server.wait(timeout=10)
    print(f"\n1+1 round trip p99: {p99(quiet) * 1000:.1f} ms quiet ({len(quiet)} runs), "
          f"{p99(busy) * 1000:.1f} ms during a 100 MB download ({len(busy)} runs), median "
          f"{statistics.median(quiet) * 1000:.1f} / {statistics.median(busy) * 1000:.1f} ms")


def fetch_size(port: int, path: str) -> int:
    size = 0
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=60) as reply:
        while chunk := reply.read(1 << 20):
            size += len(chunk)
    return size


# --- at our seam: the real agent and tunnel joined by pipes (datapath_harness.py), no sshd ----------------



@contextlib.contextmanager
def sending_server(data: bytes) -> Iterator[int]:
    """A "remote" TCP server that sends ``data`` to each connection and closes it at once (as an
    HTTP/1.0 server does); its port."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn, contextlib.suppress(OSError):
                conn.sendall(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        done.set()
        thread.join(timeout=5)
        listener.close()


def forward_client(rig: Rig, remote: int) -> socket.socket:
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    rig.tunnel.add_listener(f"tcp:{remote}", listener)
    client = socket.create_connection(listener.getsockname(), timeout=WAIT)
    rig.clients.append(client)
    return client


def test_datapath_a_forward_delivers_every_byte_the_remote_server_sent_before_it_closed(rig: Rig) -> None:
    data = pattern(7, 6_000_000)
    with sending_server(data) as remote:
        client = forward_client(rig, remote)
        assert read_exactly(client, len(data) + 1) == data  # then EOF: nothing lost to the early CLOSE


def test_datapath_a_forward_client_that_never_reads_holds_up_no_kernel_channel(rig: Rig) -> None:
    sent = pattern(8, 1_000_000) + bytes(59_000_000)  # compared: the first 1 MB (a 60 MB pattern took 3 s)
    with sending_server(sent) as remote:
        stalled = forward_client(rig, remote)  # a slow browser: takes nothing
        stalled.sendall(b"GET / HTTP/1.0\r\n\r\n")
        time.sleep(1.0)  # the transfer backs up to the water marks (PAUSE)
        for channel in ("shell", "control", "iopub"):
            rig.echo(channel, pattern(1, 300_000))
        assert read_exactly(stalled, 1_000_000) == sent[:1_000_000]  # and it flows when read
        stalled.close()  # the server's sendall then fails instead of waiting out its thread's join


# --- ad hoc: `remote-kernel forward` for a kernel the per-user service runs ----------------------------------


@pytest.mark.slow
def test_forward_command_adds_a_forward_to_a_running_kernel_of_the_service(
    sshd: SSHServer, remote_python: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REMOTE_KERNEL_SERVICE", "on")
    write_spec(kernel_entry(sshd, remote_python, "adhoc"))
    remote, local = free_port(), free_port()
    marker = f"page-{secrets.token_hex(6)}"
    with started_kernel("adhoc") as (_, kc):
        serve_in_kernel(kc, remote, a_site(tmp_path, marker))
        result = run_cli(["--json", "forward", "adhoc", str(remote), str(local)])
        assert result.returncode == 0, result.stderr
        answer = json.loads(result.stdout)
        assert (answer["ok"], answer["remote"], answer["local"], answer["url"]) == (
            True, remote, local, f"http://127.0.0.1:{local}/")
        assert marker in http_get(local)
        connection_file = answer["connection_file"]
        again = run_cli(["forward", connection_file, str(remote)])  # by its connection file; REMOTE is taken here
        assert again.returncode == 0, again.stderr
        url = re.search(r"http://127\.0\.0\.1:(\d+)/ -> port (\d+)", again.stdout)
        assert url is not None and int(url[2]) == remote and "is taken here" in again.stdout, again.stdout
        assert marker in http_get(int(url[1]))
        # `service status` shows the kernel's forwards (remote port -> local port)
        status = run_cli(["--json", "service", "status"])
        [hosted] = json.loads(status.stdout)["kernels"]
        assert sorted((f["remote"], f["local"]) for f in hosted["forwards"]) == sorted(
            [(remote, local), (remote, int(url[1]))])
        assert f"{remote}->{local}" in run_cli(["service", "status"]).stdout
        unknown = run_cli(["forward", "nosuchkernel", str(remote)])
        assert unknown.returncode == 2
        assert "no kernel 'nosuchkernel' runs in the per-user service (its kernels: adhoc)" in unknown.stderr
        assert execute(kc, "1+1").result == "2"
    assert wait_until(lambda: not port_open(local), timeout=20)  # the forward ended with the kernel


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_forward_command_without_a_service_says_the_in_process_kernel_needs_the_forward_key() -> None:
    result = run_cli(["forward", "lab", "8787"])
    assert result.returncode == 2
    assert "no per-user service runs" in result.stderr and "add forward = [8787] to its entry" in result.stderr
    assert "Traceback" not in result.stderr


def test_datapath_a_forwarded_connection_survives_a_dropped_link_and_loses_nothing(rig: Rig) -> None:
    data = pattern(9, 4_000_000)
    with sending_server(data) as remote:
        client = forward_client(rig, remote)
        first = read_exactly(client, 1_000_000)
        rig.drop()
        assert first + read_exactly(client, len(data)) == data


# --- a Slurm kernel: the agent runs in the job, so the forward reaches the compute node ----------------


@pytest.mark.slow
def test_a_slurm_kernels_forward_reaches_a_server_in_its_job(
    slurm: Any, sshd_factory: SSHDFactory, remote_python: Path, tmp_path: Path
) -> None:
    login = sshd_factory(extra_config=slurm.sshd_config_lines())
    remote, local = free_port(), free_port()
    marker = f"page-{secrets.token_hex(6)}"
    entry = dataclasses.replace(slurm_entry(login, remote_python, "fwdjob"), forward=(f"{remote}:{local}",))
    kernel = ready_kernel(entry, tmp_path / "kernel.json")
    try:
        kc = client_of(kernel)
        try:
            assert execute(kc, "import os; print(os.environ['SLURM_JOB_ID'])").stdout.strip() == our_job(
                slurm, "fwdjob")["id"]
            serve_in_kernel(kc, remote, a_site(tmp_path, marker))
            assert marker in http_get(local)
        finally:
            kc.stop_channels()
    finally:
        kernel.close()

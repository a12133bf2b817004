"""Forwarded ports (issue 18 part 3): a remote TCP port reached on 127.0.0.1 through the kernel's
own link (forward.py, tunnel.py, remote/agent.py), never through SSH port forwarding."""

from __future__ import annotations

import contextlib
import re
import secrets
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from launch_helpers import connect_client, execute, kernel_entry, launched_cli, wait_until, write_spec
from sshd import SSHServer
from test_config import only_problem, write

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

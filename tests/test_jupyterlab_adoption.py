"""JupyterLab adopts detached kernels (issue 15 item 3).

A jupyter_server (>= 2) started with ``--ServerApp.allow_external_kernels=True`` lists every
connection file in ``<runtime dir>/external_kernels`` that carries ``kernel_name`` and ``key`` as a
running kernel it does not own; ``remote-kernel start NAME --detach`` writes its connection file
there. Real components: the per-user service, the private OpenSSH sshd, real ipykernel, a real
jupyter_server process spoken to over REST and the kernel websocket, as JupyterLab does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from jupyter_server_helper import JupyterServer, jupyter_server
from launch_helpers import (
    KernelFacts,
    connect_client,
    execute,
    pid_alive,
    remote_leftovers,
    run_cli,
    single_kernel_config,
    wait_remote_gone,
    wait_until,
)
from sshd import SSHServer

pytestmark = pytest.mark.slow

ENTRY = "adopted"
ADOPT = "--ServerApp.allow_external_kernels=True"
LEASE = "3m"  # a kernel this test leaks is reaped on its host soon
CLI_TIMEOUT = 120.0
WS_TIMEOUT = 60.0

_FACTS_CODE = ("import json, os, ipykernel; print(json.dumps({'pid': os.getpid(), "
               "'agent_pid': int(os.environ.get('JPY_PARENT_PID') or 0), "
               "'connection_file': ipykernel.get_connection_file(), 'cwd': os.getcwd()}))")


@pytest.fixture(autouse=True)
def service_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REMOTE_KERNEL_SERVICE", "on")


@pytest.fixture
def config(sshd: SSHServer, remote_python: Path, tmp_path: Path) -> Path:
    return single_kernel_config(tmp_path / "rk.toml", sshd, ENTRY, remote_python)


@pytest.fixture
def detached(config: Path) -> Iterator[dict[str, Any]]:
    """``remote-kernel start adopted --detach --json``'s answer; stopped at the end if still there."""
    started = run_cli(["--config", str(config), "start", ENTRY, "--detach", "--lease", LEASE, "--json"],
                      timeout=CLI_TIMEOUT)
    assert started.returncode == 0, f"start --detach failed ({started.returncode}):\n{started.stdout}\n{started.stderr}"
    answer: dict[str, Any] = json.loads(started.stdout.strip().splitlines()[-1])
    try:
        yield answer
    finally:
        if answer["id"] in detached_ids(config):
            run_cli(["--config", str(config), "stop", answer["id"]], timeout=CLI_TIMEOUT)


def detached_ids(config: Path) -> list[str]:
    """The ids `remote-kernel ps --json` lists under "detached"."""
    result = run_cli(["--config", str(config), "--json", "ps"], timeout=CLI_TIMEOUT)
    assert result.returncode == 0, f"ps failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return [row["id"] for row in json.loads(result.stdout).get("detached") or []]


def records_dir() -> Path:
    from remote_kernel import detached

    return detached.records_dir()


def server_root(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    return root


def adopting_server(root: Path) -> contextlib.AbstractContextManager[JupyterServer]:
    """A jupyter_server with the one option that makes it adopt detached kernels (it inherits the
    test's JUPYTER_RUNTIME_DIR: its external_connection_dir is where `start --detach` writes)."""
    return jupyter_server(server_root(root), ADOPT)


def listed(server: JupyterServer) -> list[dict[str, Any]]:
    status, kernels = server.request("GET", "/api/kernels")
    assert status == 200, f"GET /api/kernels: {status} {kernels}\n{server.log()[-3000:]}"
    return list(kernels)


def the_adopted_kernel(server: JupyterServer) -> dict[str, Any]:
    kernels = listed(server)
    assert [kernel["name"] for kernel in kernels] == [ENTRY], kernels
    return kernels[0]


# --------------------------------------------------------------------------- the kernel websocket


@dataclass
class Reply:
    """What one request over the kernel websocket produced for the client that sent it."""

    status: str | None = None
    stdout: str = ""
    content: dict[str, Any] = field(default_factory=dict)  # the *_reply's content


class KernelSocket:
    """One websocket on /api/kernels/ID/channels, as JupyterLab holds one for an open notebook."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.session = uuid.uuid4().hex

    @classmethod
    async def open(cls, server: JupyterServer, kernel_id: str) -> KernelSocket:
        from tornado.httpclient import HTTPRequest
        from tornado.websocket import websocket_connect

        url = server.url.replace("http://", "ws://") + f"/api/kernels/{kernel_id}/channels"
        return cls(await websocket_connect(HTTPRequest(url, headers={"Authorization": f"token {server.token}"})))

    def send(self, channel: str, msg_type: str, content: dict[str, Any]) -> str:
        msg_id = uuid.uuid4().hex
        self.conn.write_message(json.dumps({
            "header": {"msg_id": msg_id, "msg_type": msg_type, "username": "test", "session": self.session,
                       "date": "", "version": "5.3"},
            "parent_header": {}, "metadata": {}, "channel": channel, "content": content}))
        return msg_id

    def execute(self, code: str) -> str:
        return self.send("shell", "execute_request", {"code": code, "silent": False, "store_history": False,
                                                      "user_expressions": {}, "allow_stdin": False,
                                                      "stop_on_error": True})

    async def collect(self, msg_id: str, *, timeout: float = WS_TIMEOUT, until_stdout: str | None = None) -> Reply:
        """The reply to ``msg_id`` and its output (a shell request's output ends with its idle status:
        iopub and shell are separate sockets, so output may come after the reply); with
        ``until_stdout``, return as soon as that text was printed."""
        reply, idle = Reply(), False
        deadline = time.monotonic() + timeout
        while not (reply.status is not None and idle):
            raw = await asyncio.wait_for(self.conn.read_message(), timeout=max(0.1, deadline - time.monotonic()))
            assert raw is not None, f"the server closed the kernel websocket; so far: {reply}"
            message = json.loads(raw)
            if message.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind, content = message["msg_type"], message["content"]
            if kind == "stream":
                reply.stdout += content["text"]
                if until_stdout is not None and until_stdout in reply.stdout:
                    return reply
            elif kind == "status":
                idle = idle or content["execution_state"] == "idle"
            elif kind.endswith("_reply"):
                reply.status, reply.content = content.get("status"), content
                idle = idle or message["channel"] != "shell"
        return reply

    def close(self) -> None:
        self.conn.close()


async def _execute(server: JupyterServer, kernel_id: str, code: str) -> Reply:
    socket = await KernelSocket.open(server, kernel_id)
    try:
        return await socket.collect(socket.execute(code))
    finally:
        socket.close()


def ws_execute(server: JupyterServer, kernel_id: str, code: str) -> Reply:
    """``code`` run as JupyterLab runs a cell."""
    return asyncio.run(_execute(server, kernel_id, code))


async def _shutdown_request(server: JupyterServer, kernel_id: str) -> Reply:
    socket = await KernelSocket.open(server, kernel_id)
    try:
        return await socket.collect(socket.send("control", "shutdown_request", {"restart": False}))
    finally:
        socket.close()


def ws_facts(server: JupyterServer, kernel_id: str) -> KernelFacts:
    """Where the kernel lives on its host, told by the kernel over the websocket."""
    reply = ws_execute(server, kernel_id, _FACTS_CODE)
    assert reply.status == "ok", reply
    data = json.loads(reply.stdout.strip().splitlines()[-1])
    return KernelFacts(pid=data["pid"], agent_pid=data["agent_pid"], connection_file=Path(data["connection_file"]),
                       cwd=data["cwd"])


def open_notebook_on(server: JupyterServer, kernel_id: str) -> dict[str, Any]:
    """What JupyterLab does when a notebook picks a running kernel: a session on that kernel."""
    status, session = server.request("POST", "/api/sessions", {
        "path": "adopted.ipynb", "name": "adopted.ipynb", "type": "notebook", "kernel": {"id": kernel_id}})
    assert status == 201, (status, session)
    assert session["kernel"]["id"] == kernel_id, session
    return dict(session)


# --------------------------------------------------------------------------- listing and state


def test_a_server_started_with_allow_external_kernels_lists_a_detached_kernel_by_its_entry_name_and_runs_code(
        detached: dict[str, Any], tmp_path: Path) -> None:
    connection_file = Path(detached["connection_file"])
    assert connection_file.parent == Path(os.environ["JUPYTER_RUNTIME_DIR"]) / "external_kernels"
    assert json.loads(connection_file.read_text())["kernel_name"] == ENTRY
    with jupyter_server(server_root(tmp_path / "plain")) as server:
        assert listed(server) == []  # without the option a server adopts nothing
    with adopting_server(tmp_path / "lab") as server:
        kernel = the_adopted_kernel(server)
        assert kernel["name"] == ENTRY  # the connection file's kernel_name: the entry's (and its kernelspec's) name
        assert kernel["execution_state"] == "idle"
        reply = ws_execute(server, kernel["id"], "x = 42; print(x)")
        assert (reply.status, reply.stdout) == ("ok", "42\n")


def test_a_new_server_adopts_the_kernel_again_with_its_state_after_the_first_one_stopped(
        detached: dict[str, Any], tmp_path: Path) -> None:
    with adopting_server(tmp_path / "lab1") as server:
        first = the_adopted_kernel(server)["id"]
        assert ws_execute(server, first, "x = 42").status == "ok"
        facts = ws_facts(server, first)
    # A stopping server shuts down only the kernels it owns: the detached kernel and its file stay.
    assert Path(detached["connection_file"]).is_file()
    assert pid_alive(facts.pid), remote_leftovers(facts)
    with adopting_server(tmp_path / "lab2") as server:
        again = the_adopted_kernel(server)["id"]
        assert again != first  # a new server-side id for the same kernel
        assert ws_execute(server, again, "print(x)").stdout == "42\n"
        assert ws_facts(server, again).pid == facts.pid


# --------------------------------------------------------------------------- "shut down" from JupyterLab


def test_shut_down_from_jupyterlab_only_hides_an_adopted_kernel_in_that_server_and_the_kernel_lives_on(
        detached: dict[str, Any], config: Path, tmp_path: Path) -> None:
    # jupyter_client (8.10) does not own an adopted kernel, so its shutdown_kernel returns at once:
    # no shutdown_request is sent, nothing is killed; the server only drops the kernel from its list.
    with adopting_server(tmp_path / "lab1") as server:
        kernel_id = the_adopted_kernel(server)["id"]
        assert ws_execute(server, kernel_id, "x = 42").status == "ok"
        facts = ws_facts(server, kernel_id)
        assert server.request("DELETE", f"/api/kernels/{kernel_id}")[0] == 204  # the Kernels panel's "Shut Down"
        assert listed(server) == []
    with adopting_server(tmp_path / "lab2") as server:
        kernel_id = the_adopted_kernel(server)["id"]  # a new server lists it again
        session = open_notebook_on(server, kernel_id)
        # The notebook's "Shut Down Kernel" (and closing it with "shut down kernel"): DELETE of the session.
        assert server.request("DELETE", f"/api/sessions/{session['id']}")[0] == 204
        assert listed(server) == []
        assert pid_alive(facts.pid), remote_leftovers(facts)
        assert detached["id"] in detached_ids(config)
        client = connect_client(Path(detached["connection_file"]))
        try:
            assert execute(client, "print(x)").stdout == "42\n"
        finally:
            client.stop_channels()
        stopped = run_cli(["--config", str(config), "stop", detached["id"]], timeout=CLI_TIMEOUT)
        assert stopped.returncode == 0, stopped.stderr
        # The connection file is gone: a server that had hidden the kernel answers GET /api/kernels
        # once with a 500 (jupyter_client's list_kernel_ids deletes the hidden kernel a second time:
        # KeyError), then with the empty list.
        answers = [server.request("GET", "/api/kernels") for _ in range(2)]
        assert answers[-1] == (200, []), answers
        assert {status for status, _ in answers} <= {200, 500}, answers
    assert wait_remote_gone(facts) == []
    assert detached["id"] not in detached_ids(config)


@pytest.mark.parametrize("how", ["exit() in a cell", "shutdown_request"])
def test_a_kernel_asked_to_exit_over_the_websocket_stops_and_the_service_forgets_it(
        detached: dict[str, Any], config: Path, tmp_path: Path, how: str) -> None:
    connection_file = Path(detached["connection_file"])
    with adopting_server(tmp_path / "lab") as server:
        kernel_id = the_adopted_kernel(server)["id"]
        facts = ws_facts(server, kernel_id)
        open_notebook_on(server, kernel_id)
        if how == "shutdown_request":  # what a client that owns nothing may send (jupyter console's quit)
            reply = asyncio.run(_shutdown_request(server, kernel_id))
            assert reply.status == "ok", reply
        else:
            reply = ws_execute(server, kernel_id, "exit()")
            assert reply.content["payload"] == [{"source": "ask_exit", "keepkernel": False}], reply
        assert wait_remote_gone(facts) == []
        # The service saw the kernel end: its record and connection file go, so the server drops it.
        assert wait_until(lambda: not connection_file.exists(), timeout=15), connection_file
        assert not (records_dir() / f"{detached['id']}.json").exists()
        assert detached["id"] not in detached_ids(config)
        assert listed(server) == []
        assert server.request("GET", "/api/sessions") == (200, [])


# --------------------------------------------------------------------------- interrupt and restart


async def _interrupted_by_the_cli(server: JupyterServer, kernel_id: str, config: Path, detached_id: str) -> Reply:
    """A cell sleeping in the kernel, interrupted with `remote-kernel interrupt ID` once it printed."""
    socket = await KernelSocket.open(server, kernel_id)
    try:
        msg_id = socket.execute("import time; print('sleeping', flush=True); time.sleep(120)")
        await socket.collect(msg_id, until_stdout="sleeping")
        interrupted = await asyncio.to_thread(
            run_cli, ["--config", str(config), "interrupt", detached_id], timeout=CLI_TIMEOUT)
        assert interrupted.returncode == 0, interrupted.stderr
        return await socket.collect(msg_id)
    finally:
        socket.close()


def test_interrupt_and_restart_from_jupyterlab_fail_on_an_adopted_kernel_and_remote_kernel_interrupt_works(
        detached: dict[str, Any], config: Path, tmp_path: Path) -> None:
    with adopting_server(tmp_path / "lab") as server:
        kernel_id = the_adopted_kernel(server)["id"]
        assert ws_execute(server, kernel_id, "x = 42").status == "ok"
        # jupyter_client interrupts only a kernel it launched ("Cannot interrupt kernel. No kernel is
        # running!") and restarts only one it started: both are HTTP 500 in JupyterLab.
        assert server.request("POST", f"/api/kernels/{kernel_id}/interrupt") == (
            500, {"message": "Unhandled error", "reason": None, "traceback": ""})
        assert "Cannot interrupt kernel. No kernel is running!" in server.log()
        status, body = server.request("POST", f"/api/kernels/{kernel_id}/restart")
        assert (status, body["message"]) == (500, "Exception restarting kernel")
        assert the_adopted_kernel(server)["id"] == kernel_id
        reply = asyncio.run(_interrupted_by_the_cli(server, kernel_id, config, detached["id"]))
        assert (reply.status, reply.content.get("ename")) == ("error", "KeyboardInterrupt"), reply
        assert ws_execute(server, kernel_id, "print(x)").stdout == "42\n"
        # After that failed restart, "Shut Down" is a 500 as well (jupyter_client: "Exception is not
        # set", the restart left the adopted kernel's ready future pending) but hides the kernel all
        # the same; the kernel lives on.
        assert server.request("DELETE", f"/api/kernels/{kernel_id}")[0] == 500
        assert listed(server) == []
        assert detached["id"] in detached_ids(config)

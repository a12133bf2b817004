"""A real jupyter_server for tests: started as a subprocess on 127.0.0.1 with a token, in the test's
isolated Jupyter dirs; REST calls with urllib and one execute over the kernel websocket (tornado,
which jupyter_server brings). Stopped by PID."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sshd import free_port

START_TIMEOUT = 60.0


@dataclass
class JupyterServer:
    url: str
    token: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def request(self, method: str, path: str, body: Any = None, timeout: float = 90.0) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,  # noqa: S310 - http://127.0.0.1
                                     headers={"Authorization": f"token {self.token}",
                                              "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:  # noqa: S310 - our own server
                raw = response.read()
                return response.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                return exc.code, json.loads(raw)
            except ValueError:
                return exc.code, raw.decode(errors="replace")

    def execute(self, kernel_id: str, code: str, timeout: float = 60.0) -> dict[str, Any]:
        """Run ``code`` over the kernel's websocket; the stream text and the reply status."""
        return asyncio.run(self._execute(kernel_id, code, timeout))

    async def _execute(self, kernel_id: str, code: str, timeout: float) -> dict[str, Any]:
        from tornado.httpclient import HTTPRequest
        from tornado.websocket import websocket_connect

        ws_url = self.url.replace("http://", "ws://") + f"/api/kernels/{kernel_id}/channels"
        conn = await websocket_connect(HTTPRequest(ws_url, headers={"Authorization": f"token {self.token}"}))
        msg_id = uuid.uuid4().hex
        conn.write_message(json.dumps({
            "header": {"msg_id": msg_id, "msg_type": "execute_request", "username": "test", "session": uuid.uuid4().hex,
                       "date": "", "version": "5.3"},
            "parent_header": {}, "metadata": {}, "channel": "shell",
            "content": {"code": code, "silent": False, "store_history": False, "user_expressions": {},
                        "allow_stdin": False, "stop_on_error": True},
        }))
        out: dict[str, Any] = {"stdout": "", "status": None}
        idle = False  # iopub and shell are separate sockets: output may follow the reply, never the idle status
        deadline = time.monotonic() + timeout
        while (out["status"] is None or not idle) and time.monotonic() < deadline:
            raw = await asyncio.wait_for(conn.read_message(), timeout=max(0.1, deadline - time.monotonic()))
            if raw is None:
                break
            message = json.loads(raw)
            if message.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            if message["msg_type"] == "status":
                idle = idle or message["content"]["execution_state"] == "idle"
            elif message["msg_type"] == "stream":
                out["stdout"] += message["content"]["text"]
            elif message["msg_type"] == "execute_reply":
                out["status"] = message["content"]["status"]
        conn.close()
        return out


@contextlib.contextmanager
def jupyter_server(root: Path, *options: str) -> Iterator[JupyterServer]:
    """A started server in ``root``; ``options`` are more command-line options (``--ServerApp.x=y``)."""
    port, token = free_port(), secrets.token_hex(16)
    log_path = root / "jupyter_server.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "jupyter_server", "--no-browser", "--ServerApp.ip=127.0.0.1",
             f"--ServerApp.port={port}", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
             "--ServerApp.port_retries=0", "--allow-root", *options],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    server = JupyterServer(f"http://127.0.0.1:{port}", token, proc, log_path)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"jupyter_server exited:\n{server.log()[-3000:]}")
            with contextlib.suppress(OSError):
                if server.request("GET", "/api/status", timeout=2)[0] == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"jupyter_server did not answer in {START_TIMEOUT:g} s:\n{server.log()[-3000:]}")
            time.sleep(0.2)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)

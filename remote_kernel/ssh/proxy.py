"""A ProxyCommand from ~/.ssh/config: the process whose stdin/stdout carry the connection."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import threading
from collections import deque

from remote_kernel.errors import HostKeyError, SSHError
from remote_kernel.ssh.config import ResolvedHost
from remote_kernel.ssh.transport import HandshakeError

log = logging.getLogger("remote_kernel.ssh")  # one logger for the package: doctor quiets it, -v names it


class ProxyProcess:
    """A running ProxyCommand, started as OpenSSH starts one (``$SHELL -c "exec COMMAND"``) but
    in a session of its own: Jupyter interrupts a kernel by signalling the launcher's whole
    process group, which must not cut the connection. Its stdin and stdout are the far end of a
    socketpair, so paramiko gets a real socket; the tail of its stderr goes into error messages."""

    STDERR_LINES = 20

    def __init__(self, command: str, process: subprocess.Popen[bytes], sock: socket.socket) -> None:
        self.command = command
        self.process = process
        self.socket = sock
        self._stderr: deque[str] = deque(maxlen=self.STDERR_LINES)
        self._reader = threading.Thread(target=self._read_stderr, name="proxycommand-stderr", daemon=True)
        self._reader.start()

    @classmethod
    def start(cls, hop: ResolvedHost) -> ProxyProcess:
        command = hop.proxy_command or ""
        shell = os.environ.get("SHELL") or "/bin/sh"
        ours, theirs = socket.socketpair()
        try:
            process = subprocess.Popen(
                [shell, "-c", f"exec {command}"],
                stdin=theirs.fileno(),
                stdout=theirs.fileno(),
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as exc:
            ours.close()
            raise SSHError(
                f"cannot start the ProxyCommand for {hop.label} with {shell}: {exc.strerror or exc}",
                host=hop.label,
                hint="check $SHELL and ProxyCommand in ~/.ssh/config",
            ) from exc
        finally:
            theirs.close()
        log.debug("%s: ProxyCommand %r runs as pid %d", hop.label, command, process.pid)
        return cls(command, process, ours)

    def _read_stderr(self) -> None:
        if self.process.stderr is None:
            return
        for raw in iter(self.process.stderr.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip()
            if line:
                self._stderr.append(line)
                log.debug("ProxyCommand: %s", line)

    def is_to_blame(self, exc: SSHError) -> bool:
        """Did ``exc`` (connecting through the proxy) come from the proxy rather than the server?"""
        if isinstance(exc, HostKeyError):
            return False
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=0.5)  # it may be exiting right now
        return isinstance(exc, HandshakeError) or self.process.poll() is not None

    def failure(self, hop: ResolvedHost, cause: SSHError) -> SSHError:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=1.0)
        self._reader.join(timeout=1.0)  # its last words
        status = self.process.poll()
        if status is not None and status >= 0:
            what = f"exited (status {status}) before the SSH connection was set up"
        else:  # still running, or killed by our closing its socket (SIGPIPE)
            what = f"did not lead to an SSH server ({cause.message})"
        lines = [f"the ProxyCommand for {hop.label} {what}: {self.command}"]
        if self._stderr:
            lines += ["  its stderr:", *(f"    {line}" for line in self._stderr)]
        return SSHError(
            "\n".join(lines),
            host=hop.label,
            hint="run the command by hand to see what it does, then fix ProxyCommand in ~/.ssh/config",
        )

    def stop(self) -> None:
        """SIGHUP (what ssh sends its ProxyCommand when it exits), SIGKILL if it lingers."""
        self.socket.close()
        for sig in (signal.SIGHUP, signal.SIGKILL):
            if self.process.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, sig)  # its own session: a pipeline goes too
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=2.0)
        self._reader.join(timeout=1.0)
        if self.process.stderr is not None:
            self.process.stderr.close()



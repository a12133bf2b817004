"""A jupyter_client kernel provisioner: Jupyter starts the remote kernel in its own process.

Registered as ``remote-kernel-provisioner`` (entry point group ``jupyter_client.kernel_provisioners``)
and named by kernelspecs that ``sync --provisioner`` (or ``launcher = "provisioner"``) writes. It
serves the kernel with ``launcher.RemoteKernel`` instead of starting ``python -m remote_kernel
from-spec``: no launcher process, and a start that fails raises (JupyterLab shows a failed start,
not a kernel id that never answers: jupyter_client#960). The spec's argv stays the working
from-spec form, so clients that launch argv themselves (VS Code, jupyter_client < 7) still
start it; jupyter_client >= 7 without this package installed hides the spec (it refuses specs whose
provisioner it cannot load), which the README says.

The ports and the connection file come from LocalProvisioner.pre_launch, as for a local kernel.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.provisioning.local_provisioner import LocalProvisioner

from remote_kernel.entry import KernelEntry
from remote_kernel.errors import LaunchError
from remote_kernel.kernelspec import MARKER_KEY
from remote_kernel.launcher import RemoteKernel

WAIT_POLL = 0.1  # seconds between polls while jupyter_client waits for the kernel to end


class RemoteKernelProvisioner(LocalProvisioner):
    """Serves a remote-kernel entry in the Jupyter server's process."""

    _kernel: RemoteKernel | None = None

    @property
    def has_process(self) -> bool:
        return self._kernel is not None

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        """Start the remote kernel on the connection file pre_launch wrote; return once it answers
        (or raise the launch's error: unreachable host, python without ipykernel, ...)."""
        _forward_logs_to(self.log)
        manager = self.parent
        if manager is None:
            raise LaunchError("remote-kernel's provisioner needs its KernelManager (the connection file)")
        kernel = RemoteKernel(self._entry(), Path(manager.connection_file))
        kernel.start()
        self._kernel = kernel
        try:
            await asyncio.get_running_loop().run_in_executor(None, kernel.wait_ready)
        except BaseException:
            self._kernel = None
            await asyncio.get_running_loop().run_in_executor(None, kernel.close)
            raise
        return self.connection_info

    def _entry(self) -> KernelEntry:
        marker = (self.kernel_spec.metadata or {}).get(MARKER_KEY) or {}
        data = marker.get("entry") if isinstance(marker, dict) else None
        if not isinstance(data, dict):
            raise LaunchError(f"kernelspec {self.kernel_spec.display_name!r} names remote-kernel's provisioner but "
                              f"has no metadata.{MARKER_KEY}.entry", hint="write it with `remote-kernel sync`")
        return KernelEntry.from_dict(data)

    async def poll(self) -> int | None:
        if self._kernel is None:
            return 0
        return self._kernel.poll()

    async def wait(self) -> int | None:
        while (code := await self.poll()) is None:
            await asyncio.sleep(WAIT_POLL)
        return code

    async def send_signal(self, signum: int) -> None:
        if self._kernel is not None:
            self._kernel.send_signal(signum)

    async def kill(self, restart: bool = False) -> None:
        if self._kernel is not None:
            self._kernel.kill()

    async def terminate(self, restart: bool = False) -> None:
        if self._kernel is not None:
            self._kernel.terminate()

    async def cleanup(self, restart: bool = False) -> None:
        kernel, self._kernel = self._kernel, None
        if kernel is not None:
            await asyncio.get_running_loop().run_in_executor(None, kernel.close)
        await super().cleanup(restart=restart)


_forwarding: set[int] = set()


def _forward_logs_to(target: logging.Logger) -> None:
    """remote-kernel's log lines go to the Jupyter server's log (which owns the process's logging):
    our INFO steps and WARNINGs, each with the kernel's name."""
    if id(target) in _forwarding:
        return
    _forwarding.add(id(target))
    handler = _ServerLogHandler(target)
    for name in ("remote_kernel", ):
        ours = logging.getLogger(name)
        ours.addHandler(handler)
        ours.setLevel(min(ours.level or logging.INFO, logging.INFO))
        ours.propagate = False


class _ServerLogHandler(logging.Handler):
    def __init__(self, target: logging.Logger) -> None:
        super().__init__(logging.INFO)
        self._target = target

    def emit(self, record: logging.LogRecord) -> None:
        name = getattr(record, "rk_entry", None)
        prefix = f"[remote-kernel {name}] " if name else "[remote-kernel] "
        self._target.log(record.levelno, "%s%s", prefix, record.getMessage())

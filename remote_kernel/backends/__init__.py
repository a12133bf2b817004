"""How a kernel's agent is reached: one small interface (base.py), one module per way.

``direct`` runs the agent over an SSH exec channel on the host itself (today's path). A backend
never owns the SSH connection: a ``Connector`` hands one out (a fresh connection per use today;
a shared, already-authenticated one from a per-user service later).
"""

from __future__ import annotations

from remote_kernel.backends.base import AgentGoneError, Backend, Connector, DirectConnector, Locator
from remote_kernel.entry import KernelEntry

__all__ = ["AgentGoneError", "Backend", "Connector", "DirectConnector", "Locator", "backend_for"]


def backend_for(entry: KernelEntry) -> Backend:
    """The backend that runs ``entry``'s agent (recorded as ``Locator.kind``)."""
    if entry.slurm is not None:
        from remote_kernel.backends.slurm import SlurmBackend

        return SlurmBackend(entry.slurm)
    from remote_kernel.backends.direct import DirectBackend

    return DirectBackend()

"""What the argv launcher does with the signals Jupyter and terminals send it (shared by the
in-process launcher and the relay of a kernel the per-user service hosts; imports nothing)."""

from __future__ import annotations

import signal

RELAYED_SIGNALS = {signal.SIGINT: "interrupt"}  # never fatal: Jupyter signals the group before every shutdown
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)  # shut the remote kernel down

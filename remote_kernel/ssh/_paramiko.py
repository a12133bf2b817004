"""paramiko, imported lazily, and the one place that touches its private or undocumented names.

Every other module of remote_kernel uses paramiko's documented API only (tests/test_paramiko_seam.py
checks the source). pyproject.toml pins ``paramiko>=3.4,<6``: an upper bound at the next major,
since the names below may change there; the same test checks the installed version is in that
range and that every name below still exists (``missing_names``), so an upgrade that breaks one
fails a test, not a user's launch; CI runs the SSH tests on the lower bound too (.ci/run).

What we rely on, and why:

- ``Transport._send_user_message(message)``: sends a message as paramiko's own channel requests
  do (waiting while keys are re-exchanged). paramiko has no public way (1) to send the exec
  request without waiting for its reply (``exec_command`` waits: a round trip more per start,
  ``send_exec_request``) nor (2) to grant window for bytes it did not read itself (``grant_window``).
- ``Channel._check_add_window(n)``: the bookkeeping ``Channel.recv`` does after a read (how much
  window to grant back: nothing until a tenth of it is used), for bytes the tap handed to a sink.
- ``Channel.in_buffer`` (a ``BufferedPipe``: ``feed``, ``empty``): replaced by ``StdoutTap``, so
  stdout goes to a sink on paramiko's transport thread instead of through a buffer, its wake-up
  pipe and a reader thread (the launcher's CPU per `1+1` cell: 0.55 -> 0.40 ms, bench/README.md).
- ``Channel.remote_chanid``: the peer's number for the channel, in the two messages above.
- ``Channel.out_window_size``: how many bytes the peer lets us send now (``can_send``).
- ``Channel.eof_received`` and ``Channel.closed``: whether a read would end at once (``at_eof``).
- ``Transport.local_cipher``: the negotiated cipher, for the -v log and ``doctor``.
- ``Transport.banner_timeout``, ``handshake_timeout``, ``auth_timeout``: the bounds SSHClient
  sets from its arguments; we drive Transport ourselves (``set_timeouts``).
- ``paramiko.common.cMSG_CHANNEL_REQUEST``, ``cMSG_CHANNEL_WINDOW_ADJUST``: message type bytes.
- ``paramiko.key_classes``: the key classes to try when decrypting a key file (``key_classes``).
- ``paramiko.config.invoke`` / ``invoke_import_error``: the module globals its ``Match exec``
  uses; paramiko is imported without invoke (~30 ms) and gets it only when a config has ``exec``
  (``enable_match_exec``).
- At import: paramiko's ``importlib.metadata.version("paramiko")`` (~10 ms of imports for one
  call) is answered by a stand-in (``_VersionOnlyMetadata``).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import socket
import sys
import threading
import types
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import paramiko as paramiko  # noqa: PLC0414 - re-exported: the other modules import it from here
else:

    class _LazyParamiko:
        """``import paramiko`` costs ~0.1 s: load it on first use, not when remote_kernel.ssh is
        imported (mypy sees the real module above)."""

        def __getattr__(self, name: str) -> Any:
            return getattr(_load_paramiko(), name)

    paramiko = _LazyParamiko()

# The names listed in the docstring, by where they live: ``missing_names`` checks each.
CHANNEL_NAMES = ("_check_add_window", "in_buffer", "remote_chanid", "out_window_size", "eof_received", "closed")
TRANSPORT_NAMES = ("_send_user_message", "local_cipher", "banner_timeout", "handshake_timeout", "auth_timeout")
BUFFER_NAMES = ("feed", "empty")
COMMON_NAMES = ("cMSG_CHANNEL_REQUEST", "cMSG_CHANNEL_WINDOW_ADJUST")
PACKAGE_NAMES = ("key_classes",)
CONFIG_NAMES = ("invoke", "invoke_import_error")


def _load_paramiko() -> Any:
    """paramiko, imported without two costs it adds to every kernel start (bench/README.md):
    - invoke: paramiko.config imports it (~30 ms) only to run ``Match exec`` lines of an
      ssh_config; the config hands it over when a config has one (enable_match_exec);
    - importlib.metadata: paramiko imports it (~10 ms: email, zipfile, csv...) for one call,
      ``metadata.version("paramiko")``; a stand-in answers it from the dist-info directory name.
    Both stand-ins leave sys.modules as soon as paramiko is loaded.
    Locked: while one thread imports it, sys.modules holds a half-initialised paramiko that a
    second thread (two kernels starting at once in the service or the provisioner) must not use."""
    with _PARAMIKO_LOCK:
        return _import_paramiko()


_PARAMIKO_LOCK = threading.Lock()


def _import_paramiko() -> Any:
    module = sys.modules.get("paramiko")
    if module is not None:
        return module
    stand_ins: dict[str, Any] = {}
    if "invoke" not in sys.modules:
        stand_ins["invoke"] = None  # `import invoke` fails at once
    if "importlib.metadata" not in sys.modules:
        stand_ins["importlib.metadata"] = _VersionOnlyMetadata("importlib.metadata")
    sys.modules.update(stand_ins)
    try:
        return importlib.import_module("paramiko")
    finally:
        for name, stand_in in stand_ins.items():
            if name in sys.modules and sys.modules[name] is stand_in:
                del sys.modules[name]


class _VersionOnlyMetadata(types.ModuleType):
    """What paramiko's ``from importlib import metadata; metadata.version("paramiko")`` needs."""

    @staticmethod
    def version(distribution: str) -> str:
        spec = importlib.util.find_spec(distribution)
        if spec is not None and spec.origin:
            site_dir = Path(spec.origin).parent.parent
            prefix = distribution.lower().replace("-", "_") + "-"
            with contextlib.suppress(OSError):
                for name in os.listdir(site_dir):
                    if name.lower().startswith(prefix) and name.endswith(".dist-info"):
                        return name[len(prefix):-len(".dist-info")]
        # Not a plain wheel install (egg, zip...): ask the real module.
        if isinstance(sys.modules.get("importlib.metadata"), _VersionOnlyMetadata):
            del sys.modules["importlib.metadata"]
        real = importlib.import_module("importlib.metadata")
        return str(real.version(distribution))


def enable_match_exec() -> None:
    """Give paramiko.config the invoke that _load_paramiko kept from it (or, when invoke is not
    installed, the ImportError paramiko would have stored and raises for ``Match exec``)."""
    config_module = importlib.import_module("paramiko.config")
    if config_module.invoke is not None:
        return
    try:
        setattr(config_module, "invoke", importlib.import_module("invoke"))  # noqa: B010 - untyped global
    except ImportError as exc:
        setattr(config_module, "invoke_import_error", exc)  # noqa: B010 - untyped global


def missing_names() -> list[str]:
    """The names this module relies on that the installed paramiko lacks (``[]``: all there)."""
    _load_paramiko()
    config_module = importlib.import_module("paramiko.config")
    channel = paramiko.Channel(0)
    ours, theirs = socket.socketpair()
    try:
        transport = paramiko.Transport(ours)  # not started: no thread, nothing sent
        owners: list[tuple[str, object, tuple[str, ...]]] = [
            ("paramiko.Channel", channel, CHANNEL_NAMES),
            ("paramiko.Channel.in_buffer", getattr(channel, "in_buffer", None), BUFFER_NAMES),
            ("paramiko.Transport", transport, TRANSPORT_NAMES),
            ("paramiko.common", paramiko.common, COMMON_NAMES),
            ("paramiko", paramiko, PACKAGE_NAMES),
            ("paramiko.config", config_module, CONFIG_NAMES),
        ]
        return [f"{owner}.{name}" for owner, thing, names in owners for name in names if not hasattr(thing, name)]
    finally:
        ours.close()
        theirs.close()


# -- channels and transports -------------------------------------------------------------------


def set_timeouts(transport: paramiko.Transport, timeout: float) -> None:
    """Bound the banner, the key exchange and authentication by ``timeout`` (as SSHClient does)."""
    transport.banner_timeout = transport.handshake_timeout = transport.auth_timeout = timeout


def negotiated_cipher(transport: paramiko.Transport) -> str:
    """The cipher of the outgoing direction, once the key exchange is done."""
    return str(transport.local_cipher)


def key_classes() -> list[type[paramiko.PKey]]:
    """Every private key class of this paramiko (DSSKey only before 4.0)."""
    classes: list[type[paramiko.PKey]] = list(paramiko.key_classes)
    return classes


def send_exec_request(transport: paramiko.Transport, channel: paramiko.Channel, command: str) -> None:
    """The exec request, without waiting for its reply (as OpenSSH's client does): what the caller
    sends next (the script, the agent payload) travels right behind it, one round trip less per
    start. A refused request closes the channel, which the caller sees as the command's end (no
    exit status), as it would see a command that could not start. paramiko's exec_command is
    the same message followed by a wait for the reply."""
    message = paramiko.Message()
    message.add_byte(paramiko.common.cMSG_CHANNEL_REQUEST)
    message.add_int(channel.remote_chanid)
    message.add_string("exec")
    message.add_boolean(True)
    message.add_string(command)
    private: Any = transport  # paramiko has no public exec that does not wait (nor a stub for this)
    private._send_user_message(message)


def grant_window(channel: paramiko.Channel, consumed: int) -> None:
    """Grant the remote side window for ``consumed`` bytes read past paramiko: what
    ``Channel.recv`` does after a read (a WINDOW_ADJUST once a tenth of the window is used)."""
    private: Any = channel
    grant = private._check_add_window(consumed)
    if grant > 0:
        message = paramiko.Message()
        message.add_byte(paramiko.common.cMSG_CHANNEL_WINDOW_ADJUST)
        message.add_int(private.remote_chanid)
        message.add_int(grant)
        private.transport._send_user_message(message)


def can_send(channel: paramiko.Channel, size: int) -> bool:
    """True when ``size`` bytes fit in the peer's window: a send will not wait for it."""
    return not channel.closed and channel.out_window_size >= size


def at_eof(channel: paramiko.Channel) -> bool:
    """True once the peer sent EOF or the channel closed: a read returns at once."""
    return bool(channel.eof_received) or bool(channel.closed)


def is_closed(channel: paramiko.Channel) -> bool:
    return bool(channel.closed)


class StdoutTap:
    """Stands in for a paramiko Channel's stdout buffer (``Channel.in_buffer``) so that, once a
    sink is set, each arriving packet's bytes go straight to the sink on paramiko's transport
    thread instead of through the buffer, its wake-up pipe and a reader thread. Until a sink is
    set, and for everything but ``feed``, it is the original buffer (EOF and close still wake
    readers)."""

    def __init__(self, buffer: Any) -> None:
        self._buffer = buffer
        self._lock = threading.Lock()
        self._sink: Callable[[bytes], None] | None = None

    @classmethod
    def install(cls, channel: paramiko.Channel) -> StdoutTap | None:
        """Put a tap in place of ``channel``'s stdout buffer; None (and nothing changed) when this
        paramiko lacks one of the private names the tap and grant_window rely on."""
        needed = (hasattr(channel, "in_buffer") and hasattr(channel, "_check_add_window")
                  and hasattr(channel, "remote_chanid") and hasattr(channel.transport, "_send_user_message")
                  and hasattr(paramiko.common, "cMSG_CHANNEL_WINDOW_ADJUST"))
        if not needed or not all(hasattr(channel.in_buffer, name) for name in BUFFER_NAMES):
            return None
        tap = cls(channel.in_buffer)
        settable: Any = channel
        settable.in_buffer = tap
        return tap

    def __getattr__(self, name: str) -> Any:
        return getattr(self._buffer, name)

    def __len__(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes) -> None:
        """(paramiko's transport thread) One packet of stdout."""
        with self._lock:
            if self._sink is None:
                self._buffer.feed(data)
            else:
                self._sink(data)

    def set_sink(self, sink: Callable[[bytes], None]) -> None:
        """From now on, stdout goes to ``sink``, starting with what is already buffered."""
        with self._lock:  # held while the backlog goes out: a packet arriving now waits its turn
            backlog = self._buffer.empty()
            if backlog:
                sink(backlog)
            self._sink = sink

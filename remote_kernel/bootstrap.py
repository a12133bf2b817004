"""What the launcher asks the remote sshd to run, and the code it sends on stdin.

The exec command is a few shell lines: ``cd`` to the entry's cwd, the entry's ``setup`` lines
(shell by design: ``module load``, ``source venv/bin/activate``), then ``exec PYTHON -S -c BOOTSTRAP N``.
The bootstrap reads exactly N bytes from stdin — remote/spawn.py, protocol.py and remote/agent.py,
compressed — and runs them; the first frame after that (BOOT, read by remote/spawn.py) carries the
key, the token and the kernel command.
Nothing secret is ever on a command line, and nothing is installed on the remote host.
"""

from __future__ import annotations

import functools
import logging
import marshal
import math
import shlex
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from remote_kernel import protocol as P
from remote_kernel.entry import KernelEntry

log = logging.getLogger(__name__)

AGENT_MARKER = "remote-kernel-agent"
CWD_FAILED_EXIT = P.EXIT_CWD_FAILED
# Reads the payload length given as argv[1] from stdin, byte-exact (no buffered reader that
# could swallow the frames that follow), then runs it. Python 3.8+; the marker lets `gc` tell
# our agent from a recycled PID.
BOOTSTRAP = (
    f"# {AGENT_MARKER}\n"
    "import os,sys,zlib\n"
    "n=int(sys.argv[1]);b=b''\n"
    "while len(b)<n:\n"
    " c=os.read(0,n-len(b))\n"
    f" if not c:sys.exit({P.EXIT_SHORT_INPUT})\n"
    " b+=c\n"
    "exec(zlib.decompress(b))\n"
)

# Stage one (remote/spawn.py) is compiled and run first: it starts the kernel, whose ~150 ms of
# imports then overlap compiling and importing the rest of the agent.
_LOADER = """
import sys
def _rk_module(name, source, package=False):
    module = type(sys)(name)  # types.ModuleType
    module.__file__ = "<remote-kernel:%s>" % name
    if package:
        module.__path__ = []
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, module)
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    return module
_rk_module("remote_kernel", "", package=True)
_rk_module("remote_kernel.remote", "", package=True)
_rk_started = _rk_module("remote_kernel.remote.spawn", SPAWN_SOURCE).begin()
_rk_module("remote_kernel.protocol", PROTOCOL_SOURCE)
sys.exit(_rk_module("remote_kernel.remote.agent", AGENT_SOURCE).main(_rk_started))
"""


@functools.cache
def agent_payload() -> bytes:
    """remote/spawn.py + protocol.py + remote/agent.py as one compressed program (built once)."""
    package = Path(__file__).parent
    sources = {name: (package / path).read_text(encoding="utf-8") for name, path in (
        ("SPAWN_SOURCE", "remote/spawn.py"), ("PROTOCOL_SOURCE", "protocol.py"), ("AGENT_SOURCE", "remote/agent.py"))}
    program = "".join(f"{name} = {source!r}\n" for name, source in sources.items()) + _LOADER
    return zlib.compress(program.encode("utf-8"), 6)


def agent_input(request: dict[str, Any]) -> bytes:
    """What a session's stdin starts with: the agent program, then the BOOT frame with ``request``."""
    return agent_payload() + boot_frame(request)


def shell_word(value: str) -> str:
    """Quote a path for a POSIX shell, keeping a leading ``~/`` meaning the remote home."""
    if value == "~":
        return '"$HOME"'
    if value.startswith("~/"):
        return '"$HOME"/' + shlex.quote(value[2:])
    return shlex.quote(value)


@dataclass(frozen=True)
class RemoteCommand:
    """What starts the agent: ``exec`` is the SSH exec request, ``script`` the POSIX sh script
    it reads first from stdin (before the agent payload)."""

    exec: str
    script: bytes


# The exec request is run by the user's login shell, which may be sh, bash, zsh, dash, ksh, tcsh,
# csh or fish. It holds nothing but a dispatcher whose syntax all of them accept: csh-family
# shells (which define $shell) and fish (which defines $FISH_VERSION) exec /bin/sh; POSIX shells
# run the script themselves, so a bash or zsh login keeps what its rc files set up for `setup`
# (`module`, `conda`, exported bash functions that /bin/sh = dash would drop). The script itself
# arrives on stdin, read byte-exact by dd (a shell reading a script from a pipe reads ahead and
# would swallow the agent payload that follows it); csh stops at the first line that execs, and
# fish parses the POSIX line only as plain words (backticks are not special to it).
_DISPATCH = (
    "test -n \"$shell\" && exec /bin/sh -c 'eval \"$(dd bs=1 count={n} 2>/dev/null)\"'\n"
    "test -n \"$FISH_VERSION\" && exec /bin/sh -c 'eval \"$(dd bs=1 count={n} 2>/dev/null)\"'\n"
    "eval \"`dd bs=1 count={n} 2>/dev/null`\""
)
SETUP_DONE = "remote-kernel: setup done"  # the launcher's cue that the setup lines are over
SETUP_TIMEOUT_NOTE = "remote-kernel: setup lines still running after"


def remote_command(entry: KernelEntry, *, payload_size: int, with_cwd: bool = True,
                   setup_budget: float | None = None, spare: bool = False) -> RemoteCommand:
    """The exec request and the script it runs: ``cd`` to cwd, the setup lines (no stdin of
    ours, stopped after ``setup_budget`` seconds, default startup_timeout), then exec the agent's
    bootstrap (``spare``: a spare's agent, SPARE_MARKER on its command line too)."""
    lines: list[str] = []
    if with_cwd and entry.cwd:
        target = shell_word(entry.cwd)
        message = shlex.quote(f"remote-kernel: cannot change to the working directory {entry.cwd!r} (cwd)")
        lines.append(f"cd -- {target} || {{ echo {message} >&2; exit {CWD_FAILED_EXIT}; }}")
    if entry.setup and with_cwd:
        budget = entry.startup_timeout if setup_budget is None else setup_budget
        lines.extend(_bounded_setup(entry.setup, budget))
    # -S: the agent needs only the standard library, and a site-packages with many .pth files
    # (conda) can take longer than the agent itself (the kernel is started without -S).
    bootstrap = BOOTSTRAP + f"# {SPARE_MARKER}\n" if spare else BOOTSTRAP
    lines.append(f"exec {shell_word(entry.python)} -S -c {shlex.quote(bootstrap)} {payload_size}")
    script = ("\n".join(lines) + "\n").encode("utf-8")
    return RemoteCommand(exec=_DISPATCH.format(n=len(script)), script=script)


def _bounded_setup(setup: tuple[str, ...], timeout: float) -> list[str]:
    """The setup lines with stdin from /dev/null (a line that reads stdin would swallow the agent
    payload) under a watchdog: if they still run after ``timeout`` seconds, the watchdog stops the
    whole process group (the shell, the lines and their children), even when the SSH connection is
    gone. The shell is the group's leader (sshd starts it with setsid) and runs without job control,
    so every child stays in that group; the kernel, started later, gets a session of its own."""
    seconds = max(1, math.ceil(timeout))
    report = shlex.quote(f"{SETUP_TIMEOUT_NOTE} {seconds} s (startup_timeout); stopping them")
    return [
        "( trap 'kill $! 2>/dev/null; exit 0' TERM",
        f"  sleep {seconds} & wait $!",
        f"  echo {report} >&2; trap '' TERM; kill -TERM 0; sleep 2; kill -KILL 0 ) </dev/null >/dev/null &",
        "rk_watchdog=$!",
        "{",
        *setup,
        "} </dev/null",
        "kill $rk_watchdog 2>/dev/null",
        f"echo {shlex.quote(SETUP_DONE)} >&2",
    ]


def kernel_argv(entry: KernelEntry) -> list[str]:
    """The kernel command with ``{python}`` / ``{connection_file}`` left for the agent to fill."""
    if entry.command:
        argv = list(entry.command)
        if "{connection_file}" not in argv:
            argv += ["-f", "{connection_file}"]
    else:
        argv = ["{python}", "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    return argv + list(entry.kernel_args)


# A spare kernel (issue 14): the per-user service keeps one kernel of an entry started ahead, so the
# next start of that entry skips the kernel's imports (ipykernel, IPython, zmq, debugpy: ~0.3-0.5 s
# of a ~0.6 s start). This program does those imports, waits for its connection file's path on
# stdin, then runs as `python -m ipykernel_launcher -f PATH KERNEL_ARGS` would (sys.path, sys.argv
# alike). If a directory on sys.path changed since it began (a package installed or removed), it
# execs exactly that command instead: a spare never runs older code than a plain start would. What
# the imports print (debugpy's frozen-modules note) is dropped, as a plain start's kernel sends it
# to its own not yet subscribed iopub. Python 3.8+.
SPARE_MARKER = "remote-kernel-spare"
SPARE_KERNEL = f"""# {SPARE_MARKER}
import os, sys
if sys.path and sys.path[0] in ("", os.getcwd()):
    del sys.path[0]  # as ipykernel_launcher does; IPython puts the working directory back
def _rk_stamps():
    stamps = []
    for entry in sys.path:
        try:
            stamps.append(os.stat(entry or ".").st_mtime_ns)
        except OSError:
            stamps.append(None)
    return stamps
_rk_before = _rk_stamps()
_rk_stderr, sys.stderr = sys.stderr, open(os.devnull, "w")
try:
    import importlib.util
    _rk_launcher = importlib.util.find_spec("ipykernel_launcher").origin
    from ipykernel import kernelapp as _rk_app
    for _rk_name in ("ipykernel.ipkernel", "ipykernel.zmqshell", "ipykernel.debugger", "sqlite3"):
        try:
            __import__(_rk_name)
        except Exception:
            pass
except Exception:
    _rk_app = None  # a plain start says why, below
finally:
    sys.stderr.close()
    sys.stderr = _rk_stderr
_rk_line = b""
while not _rk_line.endswith(b"\\n"):
    _rk_chunk = os.read(0, 4096)
    if not _rk_chunk:
        sys.exit(0)  # the spare was given up
    _rk_line += _rk_chunk
_rk_null = os.open(os.devnull, os.O_RDONLY)
os.dup2(_rk_null, 0)
os.close(_rk_null)
_rk_args = ["-f", _rk_line[:-1].decode("utf-8")] + sys.argv[1:]
if _rk_app is None or _rk_stamps() != _rk_before:
    os.execv(sys.executable, [sys.executable, "-m", "ipykernel_launcher"] + _rk_args)
sys.argv = [_rk_launcher] + _rk_args
_rk_app.launch_new_instance()
"""


def spare_eligible(entry: KernelEntry) -> bool:
    """Whether ``entry`` may have a spare: ipykernel's default command (SPARE_KERNEL knows how
    it starts; another kernel's, not), on the host itself (a Slurm kernel's job is its own)."""
    return entry.spare_kernel and entry.command is None and entry.slurm is None


def spare_request(entry: KernelEntry, wait: float) -> dict[str, Any]:
    """The BOOT request of a spare: the kernel command without a connection file; ``wait``: how
    long the spare waits for a start before it ends itself."""
    return {"mode": "spare", "name": entry.name, "argv": ["{python}", "-c", SPARE_KERNEL, *entry.kernel_args],
            "env": dict(entry.env), "runtime_dir": entry.runtime_dir, "spare_wait": wait}


def boot_frame(request: dict[str, Any]) -> bytes:
    """The second BOOT frame a spare reads: the real start's request (key and token: the start's own)."""
    return P.encode(P.BOOT, 0, 0, marshal.dumps(request, P.BOOT_MARSHAL_VERSION))


@dataclass(frozen=True)
class ProgramResult:
    """What a stdlib program run on the remote host printed, and how it ended."""

    stdout: bytes
    stderr: bytes
    exit_status: int | None  # None: it did not end within the timeout (it was stopped)


def run_program(conn: Any, entry: KernelEntry, source: str, *, request: Any = None,
                timeout: float = 30.0) -> ProgramResult:
    """Run standard-library Python ``source`` on the remote host through the same dispatcher,
    ``cd``/``setup`` script and bootstrap as a kernel start (so it sees what the kernel would
    see), with the entry's ``python``. ``request`` (marshal-able data) is readable by the program
    as ``REQUEST``; it travels on stdin, never in argv. ``timeout`` bounds the whole run; a
    program still running then is stopped by closing its channel."""
    body = f"REQUEST = __import__('marshal').loads({marshal.dumps(request, P.BOOT_MARSHAL_VERSION)!r})\n{source}"
    payload = zlib.compress(body.encode("utf-8"), 6)
    command = remote_command(entry, payload_size=len(payload), setup_budget=timeout)
    channel = conn.open_exec(command.exec)
    try:
        channel.sendall(command.script + payload)
        channel.shutdown_write()
        return _collect(channel, time.monotonic() + timeout)
    finally:
        channel.close()


def _collect(channel: Any, deadline: float) -> ProgramResult:
    out, err = bytearray(), bytearray()
    channel.set_blocking(False)
    while time.monotonic() < deadline:
        progressed = False
        while channel.recv_stderr_ready():
            err += channel.recv_stderr(65536)
            progressed = True
        try:
            chunk = channel.recv(65536)
        except BlockingIOError:
            chunk = None
        if chunk == b"":
            break
        if chunk:
            out += chunk
            progressed = True
        if not progressed:
            time.sleep(0.02)
    else:
        return ProgramResult(bytes(out), bytes(err), None)
    while channel.recv_stderr_ready():
        err += channel.recv_stderr(65536)
    return ProgramResult(bytes(out), bytes(err), _exit_status(channel, deadline))


def _exit_status(channel: Any, deadline: float) -> int | None:
    """sshd may send the exit status just after EOF (or before it): wait for it, bounded."""
    status: int | None = channel.exit_status()
    limit = min(deadline, time.monotonic() + 2.0)
    while status is None and time.monotonic() < limit:
        time.sleep(0.02)
        status = channel.exit_status()
    return status

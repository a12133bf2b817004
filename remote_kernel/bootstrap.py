"""What the launcher asks the remote sshd to run, and the code it sends on stdin.

The exec command is a few shell lines: ``cd`` to the entry's cwd, the entry's ``setup`` lines
(shell by design: ``module load``, ``source venv/bin/activate``), then ``exec PYTHON -c BOOTSTRAP N``.
The bootstrap reads exactly N bytes from stdin — protocol.py and remote/agent.py, compressed — and
runs them; the first frame after that (a HELLO) carries the key, the token and the kernel command.
Nothing secret is ever on a command line, and nothing is installed on the remote host.
"""

from __future__ import annotations

import functools
import shlex
import zlib
from pathlib import Path

from remote_kernel.entry import KernelEntry

AGENT_MARKER = "remote-kernel-agent"
CWD_FAILED_EXIT = 97
# Reads the payload length given as argv[1] from stdin, byte-exact (no buffered reader that
# could swallow the frames that follow), then runs it. Python 3.8+; the marker lets `gc` tell
# our agent from a recycled PID.
BOOTSTRAP = (
    f"# {AGENT_MARKER}\n"
    "import os,sys,zlib\n"
    "n=int(sys.argv[1]);b=b''\n"
    "while len(b)<n:\n"
    " c=os.read(0,n-len(b))\n"
    " if not c:sys.exit(3)\n"
    " b+=c\n"
    "exec(zlib.decompress(b))\n"
)

_LOADER = """
import sys, types
def _rk_module(name, source):
    module = types.ModuleType(name)
    module.__file__ = "<remote-kernel:%s>" % name
    sys.modules[name] = module
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    return module
_rk_package = _rk_module("remote_kernel", "")
_rk_package.__path__ = []
_rk_package.protocol = _rk_module("remote_kernel.protocol", PROTOCOL_SOURCE)
sys.exit(_rk_module("remote_kernel_agent", AGENT_SOURCE).main())
"""


@functools.cache
def agent_payload() -> bytes:
    """protocol.py + remote/agent.py as one compressed program (built once per process)."""
    package = Path(__file__).parent
    protocol_source = (package / "protocol.py").read_text(encoding="utf-8")
    agent_source = (package / "remote" / "agent.py").read_text(encoding="utf-8")
    program = f"PROTOCOL_SOURCE = {protocol_source!r}\nAGENT_SOURCE = {agent_source!r}\n{_LOADER}"
    return zlib.compress(program.encode("utf-8"), 6)


def shell_word(value: str) -> str:
    """Quote a path for a POSIX shell, keeping a leading ``~/`` meaning the remote home."""
    if value == "~":
        return '"$HOME"'
    if value.startswith("~/"):
        return '"$HOME"/' + shlex.quote(value[2:])
    return shlex.quote(value)


def remote_command(entry: KernelEntry, *, payload_size: int, with_cwd: bool = True) -> str:
    """The exec request sent to sshd (run by the user's login shell, like `ssh host cmd`)."""
    lines: list[str] = []
    if with_cwd and entry.cwd:
        target = shell_word(entry.cwd)
        message = shlex.quote(f"remote-kernel: cannot change to the working directory {entry.cwd!r} (cwd)")
        lines.append(f"cd -- {target} || {{ echo {message} >&2; exit {CWD_FAILED_EXIT}; }}")
    lines.extend(entry.setup)
    lines.append(f"exec {shell_word(entry.python)} -c {shlex.quote(BOOTSTRAP)} {payload_size}")
    return "\n".join(lines)


def kernel_argv(entry: KernelEntry) -> list[str]:
    """The kernel command with ``{python}`` / ``{connection_file}`` left for the agent to fill."""
    if entry.command:
        argv = list(entry.command)
        if "{connection_file}" not in argv:
            argv += ["-f", "{connection_file}"]
    else:
        argv = ["{python}", "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    return argv + list(entry.kernel_args)

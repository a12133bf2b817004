"""Stage one of the remote agent: read the HELLO and start the kernel. Python 3.8+, stdlib only.

The kernel's own start (~150 ms of imports) is the longest step of a launch, so it begins before
anything else the agent needs: this module is compiled and run first, with the fewest imports
(os, sys, struct, marshal; the agent's full set costs ~20 ms more on a small machine, json alone
~5 ms, compiling the agent ~6 ms), then hands the running kernel to agent.py, which sets up
everything else while the kernel imports. It reads the session's BOOT frame, and in ``start`` mode
- makes a private 0700 directory under /tmp/remote-kernel-<uid>/, or <runtime_dir>/remote-kernel-<uid>/
  (refusing a base directory that is not ours and private), and writes the kernel's 0600 connection
  file there, IPC endpoints;
- stops the kernel a ``restart(now=True)`` left behind (its agent's socket, the token proves it);
- starts the kernel as the leader of its own session with JPY_PARENT_PID set to us.
In ``spare`` mode (the per-user service keeps one kernel of an entry started ahead, issue 14) it
starts the kernel command without a connection file (bootstrap.SPARE_KERNEL: the kernel's imports,
then a wait for the file's path on its stdin) and ``await_go`` later reads the second BOOT frame,
the real start's request, writes the connection file and lets the kernel go on.
"""

from __future__ import annotations

import marshal
import os
import struct
import sys
import time

TYPE_CHECKING = False  # typing is one of the imports this stage saves; mypy reads these anyway
if TYPE_CHECKING:
    from typing import Any, Dict, List, Optional, Tuple

# protocol.HEADER, HELLO and BOOT, not imported from there: protocol's imports (json, typing,
# collections) are what this stage saves. tests/test_agent_stages.py checks they agree.
FRAME_HEADER = struct.Struct(">BIQI")
HELLO = 20
BOOT = 24
BASE_PREFIX = "remote-kernel-"
IPC_PORTS = {"shell": 1, "iopub": 2, "stdin": 3, "control": 4, "hb": 5}  # protocol.IPC_PORTS
AGENT_SOCKET = "agent.sock"
CONNECTION_FILE = "kernel.json"
MAX_BASE_LENGTH = 40  # IPC socket paths are limited to ~107 bytes
EXIT_BAD_REQUEST = 2  # protocol.EXIT_BAD_REQUEST (this stage does not import protocol.py)
EXIT_NOT_FOUND = 127  # protocol.EXIT_NOT_FOUND


class AgentError(Exception):
    pass


class KernelProcess:
    """The kernel we forked: what the agent needs of subprocess.Popen, without importing it."""

    def __init__(self, pid: int, stdout: int, stderr: int) -> None:
        self.pid = pid
        self.stdout = stdout  # read ends of the kernel's stdout/stderr pipes
        self.stderr = stderr
        self.returncode: Optional[int] = None

    def poll(self) -> Optional[int]:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                pid, status = self.pid, 0
            if pid:
                # Popen's convention: a negative code is the signal that ended the process.
                self.returncode = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        return self.returncode

    def wait(self, timeout: float) -> Optional[int]:
        """The exit code, or None if the kernel still runs after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while self.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.returncode


class Started:
    """What stage one hands to the agent."""

    def __init__(self, config: Dict[str, Any], leftover: bytes) -> None:
        self.config = config  # the HELLO's fields
        self.leftover = leftover  # stdin bytes that followed the HELLO
        self.dir = ""
        self.kernel: Optional[KernelProcess] = None
        self.error = ""  # why the kernel could not be started
        self.go = -1  # spare mode: the write end of the waiting kernel's stdin (its connection file's path)


# --------------------------------------------------------------------------------------- files


def temp_root() -> str:
    """tempfile.gettempdir()'s choice, without importing tempfile (random, shutil...)."""
    for name in ("TMPDIR", "TEMP", "TMP"):
        value = os.environ.get(name)
        if value and os.path.isdir(value) and os.access(value, os.W_OK | os.X_OK):
            return value
    for value in ("/tmp", "/var/tmp", "/usr/tmp"):
        if os.path.isdir(value) and os.access(value, os.W_OK | os.X_OK):
            return value
    return os.getcwd()


def base_path(runtime_dir: Optional[str] = None) -> str:
    """<root>/remote-kernel-<uid>, not created: root is ``runtime_dir`` (the config key, with
    ``~`` and ``$VARS`` expanded here, on the remote host) or the temporary directory."""
    if runtime_dir:
        root = expand_runtime_dir(runtime_dir)
    else:
        root = temp_root()
        if len(root) > MAX_BASE_LENGTH:
            root = "/tmp"
    return os.path.join(root, BASE_PREFIX + str(os.getuid()))


def expand_runtime_dir(value: str) -> str:
    root = os.path.expandvars(os.path.expanduser(value))
    if "$" in root:
        raise AgentError("runtime_dir %r: %s is not set on this host; set runtime_dir to a directory "
                         "that exists here" % (value, root[root.index("$"):].split("/")[0]))
    if not os.path.isabs(root):
        raise AgentError("runtime_dir %r is %r here, not an absolute path; use an absolute path, "
                         "~/... or $VAR/..." % (value, root))
    root = os.path.normpath(root)
    if len(root) > MAX_BASE_LENGTH:
        # ipc://<root>/remote-kernel-<uid>/k-XXXXXXXX/k-N must fit in a Unix socket path (~107 bytes)
        raise AgentError("runtime_dir %r is %s here, %d characters long: kernel socket paths must fit in "
                         "107 bytes, so it may be at most %d; choose a shorter directory (or a symlink "
                         "to it)" % (value, root, len(root), MAX_BASE_LENGTH))
    return root


def base_dir(runtime_dir: Optional[str] = None) -> str:
    """The base of our kernel directories: must be ours and private, or we refuse to use it."""
    path = base_path(runtime_dir)
    try:
        if runtime_dir:
            os.makedirs(os.path.dirname(path), 0o700, exist_ok=True)
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise AgentError(no_room_message(path, exc)) from None
    info = os.lstat(path)
    if (info.st_mode & 0o170000) != 0o040000 or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise AgentError(
            "%s is not a private directory owned by uid %d (mode %o); refusing to use it. "
            "Remove it or fix its owner/mode (0700)." % (path, os.getuid(), info.st_mode & 0o7777)
        )
    return path


def no_room_message(path: str, exc: OSError) -> str:
    """What to do when the kernel's files cannot be written (a full or read-only /tmp)."""
    return ("cannot write the kernel's files in %s: %s. Free space there, or set runtime_dir in the "
            "kernel's config to a directory with room (e.g. \"$XDG_RUNTIME_DIR\" or a node-local "
            "scratch)" % (path, exc.strerror or exc))


def is_our_dir(path: str) -> bool:
    """A k-* directory inside a private remote-kernel-<uid> directory of ours, wherever its base is
    (the default temporary directory or a runtime_dir): told by its shape, not by configuration,
    so reattaching and stopping need no config."""
    real = os.path.realpath(path)
    parent = os.path.dirname(real)
    if not os.path.basename(real).startswith("k-") or os.path.basename(parent) != BASE_PREFIX + str(os.getuid()):
        return False
    try:
        info = os.lstat(parent)
    except OSError:
        return False
    return (info.st_mode & 0o170000) == 0o040000 and info.st_uid == os.getuid() and not info.st_mode & 0o077


def make_private_dir(runtime_dir: Optional[str] = None) -> str:
    """A new k-XXXXXXXX directory, 0700 (tempfile.mkdtemp's guarantee: created by us, new)."""
    base = base_dir(runtime_dir)
    for _ in range(100):
        path = os.path.join(base, "k-" + os.urandom(4).hex())
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            continue
        except OSError as exc:
            raise AgentError(no_room_message(base, exc)) from None
        os.chmod(path, 0o700)  # whatever the umask
        return path
    raise AgentError("could not create a kernel directory in %s" % base)


def write_private(path: str, data: bytes) -> None:
    """Create a new 0600 file (the kernel's connection file holds the HMAC key)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def write_connection_file(directory: str, config: Dict[str, Any]) -> str:
    connection: Dict[str, Any] = {
        "transport": "ipc",
        "ip": os.path.join(directory, "k"),
        "key": config["key"],
        "signature_scheme": config.get("signature_scheme", "hmac-sha256"),
        "kernel_name": str(config.get("name", "kernel")),
    }
    for channel, number in IPC_PORTS.items():
        connection[channel + "_port"] = number
    path = os.path.join(directory, CONNECTION_FILE)
    write_private(path, json_object(connection).encode())
    return path


def json_object(fields: Dict[str, Any]) -> str:
    """json.dumps for a flat object of strings and integers (the connection file), without json."""
    items = []
    for name, value in fields.items():
        text = str(value) if isinstance(value, int) else json_string(str(value))
        items.append(json_string(name) + ": " + text)
    return "{" + ", ".join(items) + "}"


def json_string(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + "".join(c if c >= " " else "\\u%04x" % ord(c) for c in escaped) + '"'


# --------------------------------------------------------------------------------------- kernel


def stop_previous(previous: Optional[Dict[str, str]]) -> None:
    """A restart whose old launcher was SIGKILLed: stop the old kernel now, not after its lease."""
    if not previous or not is_our_dir(previous["dir"]):
        return
    import json
    import socket

    hello = json.dumps({"token": previous["token"], "kill": True}).encode()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(2.0)
    try:
        sock.connect(os.path.join(previous["dir"], AGENT_SOCKET))
        sock.sendall(FRAME_HEADER.pack(HELLO, 0, 0, len(hello)) + hello)
    except OSError:
        pass  # already gone
    finally:
        sock.close()


def find_executable(name: str, env: Dict[str, str]) -> str:
    """``name`` as execvpe would find it, on the kernel's PATH (entry.env may change it)."""
    if os.sep in name:
        return name
    for directory in env.get("PATH", os.defpath).split(os.pathsep):
        candidate = os.path.join(directory or ".", name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise AgentError("cannot run %s: not found on PATH" % name)


def spawn_kernel(argv: List[str], env: Dict[str, str], stdin: int = -1) -> KernelProcess:
    """fork + exec, the kernel leading a new session, stdin from /dev/null (or ``stdin``),
    stdout/stderr to pipes. An exec failure comes back as AgentError (through a close-on-exec
    pipe, like subprocess)."""
    executable = find_executable(argv[0], env)
    out_r, out_w = os.pipe()  # os.pipe() fds are close-on-exec (PEP 446)
    err_r, err_w = os.pipe()
    check_r, check_w = os.pipe()
    devnull = os.open(os.devnull, os.O_RDONLY) if stdin < 0 else os.dup(stdin)
    pid = os.fork()
    if pid == 0:  # the child: only async-signal-safe work until exec
        try:
            os.setsid()
            _default_signals()
            os.dup2(devnull, 0)
            os.dup2(out_w, 1)
            os.dup2(err_w, 2)
            os.execve(executable, argv, env)  # noqa: S606 - the entry's command, as a list: no shell
        except OSError as exc:
            os.write(check_w, str(exc.errno or 0).encode())
        finally:
            os._exit(EXIT_NOT_FOUND)
    for fd in (out_w, err_w, check_w, devnull):
        os.close(fd)
    failure = os.read(check_r, 32)  # b"" once exec closed the pipe
    os.close(check_r)
    if failure:
        os.waitpid(pid, 0)
        os.close(out_r)
        os.close(err_r)
        code = int(failure)
        raise AgentError("cannot run %s: %s" % (argv[0], os.strerror(code)))
    return KernelProcess(pid, out_r, err_r)


def _default_signals() -> None:
    """What subprocess's restore_signals does: Python ignores SIGPIPE and SIGXFSZ, and a kernel
    that is not Python must not inherit that. The C module: ``signal`` imports enum (~3 ms)."""
    try:
        signals: Any = __import__("_signal")
    except ImportError:
        signals = __import__("signal")
    for name in ("SIGPIPE", "SIGXFSZ"):
        if hasattr(signals, name):
            signals.signal(getattr(signals, name), signals.SIG_DFL)


def start_kernel(started: Started) -> None:
    config = started.config
    stop_previous(config.get("replace"))
    started.dir = make_private_dir(config.get("runtime_dir"))
    try:
        connection_file = write_connection_file(started.dir, config)
    except OSError as exc:
        raise AgentError(no_room_message(started.dir, exc)) from None
    started.kernel = spawn_kernel(kernel_argv(config, connection_file), kernel_env(config))


def kernel_argv(config: Dict[str, Any], connection_file: str) -> List[str]:
    replace = {"{python}": sys.executable, "{connection_file}": connection_file}
    return [replace.get(arg, arg) for arg in config["argv"]]


def kernel_env(config: Dict[str, Any]) -> Dict[str, str]:
    env = dict(os.environ)
    env.update(config.get("env") or {})
    env["JPY_PARENT_PID"] = str(os.getpid())  # the kernel exits by itself if we die
    return env


# ------------------------------------------------------------------------------------ spare kernel

SPARE_STATE = "spare"  # agent.json's "state" while a spare waits (`ps` shows it, `gc` leaves it)


def start_spare(started: Started) -> None:
    """``spare`` mode: the kernel command (bootstrap.SPARE_KERNEL: imports, then it waits for its
    connection file's path on stdin) in a new private directory, and a record for `ps`/`gc`."""
    config = started.config
    started.dir = make_private_dir(config.get("runtime_dir"))
    go_r, go_w = os.pipe()
    try:
        started.kernel = spawn_kernel(kernel_argv(config, ""), kernel_env(config), stdin=go_r)
    except BaseException:
        os.close(go_w)
        raise
    finally:
        os.close(go_r)
    started.go = go_w
    record = {"name": str(config.get("name", "kernel")), "agent_pid": os.getpid(),
              "kernel_pid": started.kernel.pid, "started": int(time.time()), "state": SPARE_STATE}
    try:
        write_private(os.path.join(started.dir, "agent.json"), json_object(record).encode())
    except OSError:
        pass  # a full disk: the start that takes this spare writes the record (or says why not)


def await_go(started: Started) -> bool:
    """A spare waits for the real start's request (a second BOOT frame), at most ``spare_wait``
    seconds; then it writes the connection file and tells the kernel its path: ``started`` is a
    ``start`` mode start from there on. False: the spare was given up (the session ended, or the
    wait ran out) and is gone, directory and all."""
    deadline = time.monotonic() + float(started.config.get("spare_wait") or 900)
    frame = read_frame(started.leftover, deadline)
    if frame is None or frame[0] != BOOT:
        _give_up_spare(started)
        return False
    return _go(started, frame[1], frame[2])


def _go(started: Started, payload: bytes, leftover: bytes) -> bool:
    started.config.update(marshal.loads(payload))  # noqa: S302 - the launcher's request (see begin)
    started.config["mode"] = "start"
    started.leftover = leftover
    try:
        stop_previous(started.config.get("replace"))
        path = write_connection_file(started.dir, started.config)
        os.write(started.go, path.encode() + b"\n")
    except BrokenPipeError:
        pass  # the spare kernel died: the agent reports its exit (and stderr) as for any start
    except OSError as exc:  # a full disk
        started.error = no_room_message(started.dir, exc)
    finally:
        os.close(started.go)
        started.go = -1
    return True


def _give_up_spare(started: Started) -> None:
    os.close(started.go)  # the kernel reads EOF and exits
    started.go = -1
    kernel = started.kernel
    if kernel is not None and kernel.wait(2.0) is None:
        try:
            os.killpg(kernel.pid, 9)
        except OSError:
            pass
        kernel.wait(2.0)
    for name in os.listdir(started.dir):
        os.unlink(os.path.join(started.dir, name))
    os.rmdir(started.dir)


JOB_DIR_ENV = "RK_JOB_DIR"  # set by a batch job's script (backends/slurm.py): the directory it made


def take_job_dir(started: Started) -> None:
    """``await`` mode (a batch job's main process): the private directory the job's script made
    (named by the launcher, so it can find agent.sock there through `srun --overlap`)."""
    path = os.environ.pop(JOB_DIR_ENV, "")
    try:
        info = os.lstat(path) if path else None
    except OSError:
        info = None
    if info is None or not is_our_dir(path) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        started.error = "the job's directory %r is not a private directory of ours" % path
        return
    started.dir = path


# --------------------------------------------------------------------------------------- entry


def read_first_frame() -> Tuple[int, bytes, bytes]:
    """Read exactly the first frame from stdin: (kind, payload, the bytes that followed it).
    Nothing more: what follows belongs to the agent's frame decoder."""
    frame = read_frame()
    if frame is None:
        raise SystemExit(EXIT_BAD_REQUEST)
    return frame


def read_frame(buffer: bytes = b"", deadline: Optional[float] = None) -> Optional[Tuple[int, bytes, bytes]]:
    """One whole frame from ``buffer`` and then stdin: (kind, payload, the bytes after it); None at
    the end of stdin or, with ``deadline`` (time.monotonic()), when it passes first."""
    while True:
        if len(buffer) >= FRAME_HEADER.size:
            kind, _sid, _seq, length = FRAME_HEADER.unpack_from(buffer)
            end = FRAME_HEADER.size + length
            if len(buffer) >= end:
                return kind, buffer[FRAME_HEADER.size:end], buffer[end:]
        if deadline is not None and not _readable_before(deadline):
            return None
        data = os.read(0, 65536)
        if not data:
            return None
        buffer += data


def _readable_before(deadline: float) -> bool:
    import select  # only a spare waits with a deadline: the plain start's path saves the import

    remaining = deadline - time.monotonic()
    return remaining > 0 and bool(select.select([0], [], [], remaining)[0])


def begin() -> Started:
    """Read the BOOT frame; in ``start`` mode, start the kernel. Failures are the agent's to report."""
    kind, payload, leftover = read_first_frame()
    if kind != BOOT:
        sys.stderr.write("remote-kernel: unexpected first frame %d\n" % kind)
        raise SystemExit(EXIT_BAD_REQUEST)
    # marshal: the launcher's own request, on the session it authenticated (and the program
    # that runs here came the same way).
    started = Started(marshal.loads(payload), leftover)  # noqa: S302 - see above
    if started.config.get("mode") == "await":
        take_job_dir(started)
    mode = started.config.get("mode")
    if mode in ("start", "spare"):
        try:
            (start_kernel if mode == "start" else start_spare)(started)
        except (AgentError, OSError) as exc:
            started.error = str(exc)
    return started

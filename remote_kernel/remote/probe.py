"""What a kernel start would find on the remote host, for ``remote-kernel doctor``. Python 3.8+,
standard library only.

doctor sends this through ``bootstrap.run_program``: it runs after the same dispatcher, ``cd`` and
setup lines as a kernel, with the entry's python started as the agent is (``-S``). It writes MARKER
first, so whatever precedes it on stdout came from the login shell's rc files or the setup lines
(bytes that would land in the middle of the agent's frames); its findings follow as one JSON line.
ipykernel and pyzmq are imported by a child of the same python without ``-S`` (as the kernel
starts), bounded in time. The private directory's base is computed by remote/spawn.py's own
``base_path``, whose source comes in the request, so the answer is the agent's.

No ``from __future__`` import: run_program puts ``REQUEST = ...`` before this text.
"""

import json
import os
import pwd
import subprocess
import sys
import time
from typing import Any, Dict, Optional

MARKER = "remote-kernel-doctor-probe"
MIB = 1024 * 1024

KERNEL_IMPORTS = """
import json
found = {}
try:
    import ipykernel
    found["ipykernel"] = ipykernel.__version__
except Exception as exc:
    found["ipykernel_error"] = "%s: %s" % (type(exc).__name__, exc)
try:
    import zmq
    found["pyzmq"] = zmq.__version__
    found["libzmq"] = zmq.zmq_version()
    found["ipc"] = bool(zmq.has("ipc"))
except Exception as exc:
    found["pyzmq_error"] = "%s: %s" % (type(exc).__name__, exc)
print(json.dumps(found))
"""


def login() -> Dict[str, Any]:
    entry = pwd.getpwuid(os.getuid())
    return {"user": entry.pw_name, "uid": os.getuid(), "login_shell": entry.pw_shell,
            "shell_env": os.environ.get("SHELL", ""), "home": os.environ.get("HOME", entry.pw_dir)}


def python() -> Dict[str, Any]:
    return {"version": "%d.%d.%d" % sys.version_info[:3], "executable": sys.executable,
            "implementation": sys.implementation.name, "cwd": os.getcwd()}


def kernel_imports(env: Dict[str, str], timeout: float) -> Dict[str, Any]:
    """Import ipykernel and zmq in a child python without -S, with the kernel's env."""
    child_env = dict(os.environ)
    child_env.update(env)
    try:
        done = subprocess.run([sys.executable, "-c", KERNEL_IMPORTS], check=False, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": "importing ipykernel and zmq took more than %g s" % timeout}
    except OSError as exc:
        return {"error": "cannot run %s: %s" % (sys.executable, exc)}
    try:
        found = json.loads(done.stdout.decode("utf-8", "replace").strip().splitlines()[-1])
    except (ValueError, IndexError):
        tail = done.stderr.decode("utf-8", "replace").strip().splitlines()[-3:]
        return {"error": "the import check exited %d: %s" % (done.returncode, " | ".join(tail))}
    return dict(found)


def load_spawn(source: str) -> Dict[str, Any]:
    namespace: Dict[str, Any] = {"__name__": "remote_kernel_spawn"}
    exec(compile(source, "<remote-kernel:spawn>", "exec"), namespace)  # noqa: S102 - our own code, sent by us
    return namespace


def private_base(spawn_source: str, runtime_dir: Optional[str]) -> Dict[str, Any]:
    """Where the agent would make its k-XXXX directories, and what that place is like."""
    spawn = load_spawn(spawn_source)
    try:
        base = spawn["base_path"](runtime_dir)
    except spawn["AgentError"] as exc:
        return {"error": str(exc)}
    root = os.path.dirname(base)
    found: Dict[str, Any] = {"base": base, "root": root, "root_from": "runtime_dir" if runtime_dir else "TMPDIR"}
    found.update(describe_dir(root, "root_"))
    if os.path.lexists(base):
        found.update(describe_dir(base, "base_"))
    return found


def describe_dir(path: str, prefix: str) -> Dict[str, Any]:
    try:
        info = os.lstat(path)
    except OSError as exc:
        return {prefix + "error": "%s: %s" % (path, exc.strerror)}
    found: Dict[str, Any] = {prefix + "uid": info.st_uid, prefix + "mode": info.st_mode & 0o7777,
             prefix + "is_dir": os.path.isdir(path) and not os.path.islink(path),
             prefix + "writable": os.access(path, os.W_OK | os.X_OK)}
    try:
        found[prefix + "owner"] = pwd.getpwuid(info.st_uid).pw_name
    except KeyError:
        found[prefix + "owner"] = str(info.st_uid)
    try:
        stats = os.statvfs(path)
    except OSError:
        return found
    found[prefix + "free_mib"] = stats.f_bavail * stats.f_frsize // MIB
    found[prefix + "noexec"] = bool(stats.f_flag & getattr(os, "ST_NOEXEC", 0))
    found[prefix + "read_only"] = bool(stats.f_flag & getattr(os, "ST_RDONLY", 0))
    return found


def main(request: Dict[str, Any]) -> int:
    sys.stdout.write(MARKER + "\n")
    sys.stdout.flush()
    found: Dict[str, Any] = {"login": login(), "python": python()}
    found["kernel"] = kernel_imports(dict(request.get("env") or {}), float(request.get("import_timeout", 30)))
    found["private"] = private_base(str(request.get("spawn_source", "")), request.get("runtime_dir"))
    found["time"] = time.time()  # last: doctor compares it with its own clock when the answer arrives
    sys.stdout.write(json.dumps(found) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(dict(globals().get("REQUEST") or {})))

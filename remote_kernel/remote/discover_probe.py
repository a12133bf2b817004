"""`discover` on the remote host: find Python environments that could run a kernel. Python 3.8+, stdlib only.

Sent by remote_kernel.discover through bootstrap.run_program (one SSH exec, the program on stdin);
``REQUEST`` is ``{"search": [DIR, ...], "budget": seconds, "python_timeout": seconds}``. It looks
at conda/mamba environments (``conda env list --json`` when a conda is found,
``~/.conda/environments.txt``, the common install roots and their ``envs/``), pyenv versions, venvs
and conda envs a few levels under each search directory, and ``python3`` on the login PATH. Each
environment's own python is then run once with a short ``-c`` (in parallel, each bounded) to report
its version and whether ``ipykernel`` is importable: that honours .pth files, user site-packages
and PYTHONPATH exactly as the kernel will, and never imports ipykernel itself (``find_spec`` and
the distribution metadata only).

The answer is one JSON document after a marker line on stdout, so a login shell that prints
something (an echoing ``.bashrc``) cannot corrupt it. No ``from __future__`` import: run_program
puts the REQUEST line first, so annotations are quoted instead.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

TYPE_CHECKING = False  # typing is not needed at run time; mypy reads these anyway
if TYPE_CHECKING:
    from typing import Any, Deque, Dict, List, Optional, Set, Tuple

MARKER = "@@remote-kernel-discover@@"
CONDA_ROOTS = (
    "~/miniconda3", "~/anaconda3", "~/miniforge3", "~/mambaforge", "~/micromamba", "~/.conda",
    "/opt/conda", "/opt/miniconda3", "/opt/anaconda3", "/opt/miniforge3", "/opt/mambaforge",
    "/usr/local/miniconda3", "/usr/local/anaconda3",
)
CONDA_COMMANDS = ("conda", "mamba", "micromamba")
CONDA_TIMEOUT = 20.0  # `conda env list` imports all of conda: 1-3 s normally, much more on NFS
PYTHON_TIMEOUT = 10.0  # one environment's python answering the -c below
PYTHON_WORKERS = 4
SEARCH_DEPTH = 3  # DIR/a/b/c: ~/projects/foo/.venv is depth 3 under ~
SEARCH_SECONDS = 10.0
SEARCH_ENTRIES = 20000
MAX_ENVIRONMENTS = 200
# Never worth descending into; an environment found is not descended into either.
SKIP_DIRS = frozenset(("node_modules", ".git", ".hg", ".svn", "__pycache__", "site-packages", ".cache", "proc", "sys"))
VENV_NAMES = frozenset((".venv", "venv", "env", ".env", "virtualenv", ".virtualenv"))

# Run by each environment's python: valid Python 2.7 and 3.x so an old interpreter still reports
# its version. find_spec locates ipykernel without importing it (an import takes ~1 s).
PYTHON_PROBE = r"""
import sys, json, os
found = False
try:
    import importlib.util
    found = importlib.util.find_spec("ipykernel") is not None
except Exception:
    try:
        import imp
        imp.find_module("ipykernel")
        found = True
    except Exception:
        found = False
version = None
if found:
    version = ""
    try:
        from importlib.metadata import version as _v
        version = _v("ipykernel")
    except Exception:
        import glob
        for entry in sys.path:
            names = glob.glob(os.path.join(entry or ".", "ipykernel-*.dist-info"))
            if names:
                version = os.path.basename(names[0])[len("ipykernel-"):-len(".dist-info")]
                break
sys.stdout.write(json.dumps({"version": "%d.%d.%d" % tuple(sys.version_info[:3]), "ipykernel": version,
                             "prefix": sys.prefix, "executable": sys.executable}))
"""


def env_python(prefix: str) -> "Optional[str]":
    for name in ("bin/python", "bin/python3"):
        path = os.path.join(prefix, name)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def is_environment(path: str) -> bool:
    marked = os.path.isfile(os.path.join(path, "pyvenv.cfg")) or os.path.isdir(os.path.join(path, "conda-meta"))
    return marked and env_python(path) is not None


def conda_name(prefix: str) -> str:
    """``ROOT/envs/NAME`` -> NAME; an installation's root (it has condabin/ or envs/) is conda's
    ``base``; an environment made with ``conda create -p DIR`` is named after DIR."""
    path = prefix.rstrip("/")
    is_root = os.path.isdir(os.path.join(path, "condabin")) or os.path.isdir(os.path.join(path, "envs"))
    return "base" if is_root and os.path.basename(os.path.dirname(path)) != "envs" else os.path.basename(path)


def venv_name(prefix: str) -> str:
    """``~/proj/.venv`` -> proj (the project says more than ``.venv``); ``~/envs/ml`` -> ml."""
    path = prefix.rstrip("/")
    name = os.path.basename(path)
    return (os.path.basename(os.path.dirname(path)) or name) if name in VENV_NAMES else name


class Finder:
    """Collects candidate environments in order, once each (by the real path of their prefix)."""

    def __init__(self) -> None:
        self.found: "List[Dict[str, Any]]" = []
        self.seen: "Set[str]" = set()
        self.notes: "List[str]" = []
        self.capped = False

    def add(self, kind: str, name: str, prefix: str, python: "Optional[str]" = None) -> None:
        python = python or env_python(prefix)
        key = os.path.realpath(prefix)
        if python is None or key in self.seen:
            return
        if len(self.found) >= MAX_ENVIRONMENTS:
            if not self.capped:
                self.capped = True
                self.notes.append("only the first %d environments are listed" % MAX_ENVIRONMENTS)
            return
        self.seen.add(key)
        self.found.append({"kind": kind, "name": name, "prefix": prefix, "python": python})


# --- conda ---------------------------------------------------------------------------------------


def conda_roots() -> "List[str]":
    roots = [os.path.expanduser(root) for root in CONDA_ROOTS]
    for variable in ("CONDA_EXE", "MAMBA_EXE"):
        exe = os.environ.get(variable)
        if exe:
            roots.insert(0, os.path.dirname(os.path.dirname(exe)))
    for variable in ("MAMBA_ROOT_PREFIX", "CONDA_ROOT"):
        if os.environ.get(variable):
            roots.insert(0, os.environ[variable])
    return [root for root in roots if os.path.isdir(root)]


def conda_executable(roots: "List[str]") -> "Optional[str]":
    for name in CONDA_COMMANDS:
        found = shutil.which(name)
        if found:
            return found
    for root in roots:
        for name in ("condabin/conda", "bin/conda", "bin/mamba", "bin/micromamba"):
            path = os.path.join(root, name)
            if os.path.isfile(path) and os.access(path, os.X_OK):
                return path
    return None


def start_conda_list(executable: "Optional[str]") -> "Optional[subprocess.Popen[bytes]]":
    """Started first and read last: it is the slowest step and runs while the rest is scanned."""
    if executable is None:
        return None
    try:
        return subprocess.Popen([executable, "env", "list", "--json"], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except OSError:
        return None


def finish_conda_list(process: "Optional[subprocess.Popen[bytes]]", executable: "Optional[str]", deadline: float,
                      notes: "List[str]") -> "List[str]":
    if process is None:
        return []
    command = "%s env list --json" % executable
    try:
        out, err = process.communicate(timeout=max(0.1, min(CONDA_TIMEOUT, deadline - time.monotonic())))
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        notes.append("`%s` did not answer in time; its environments may be missing" % command)
        return []
    try:
        envs = json.loads(out.decode("utf-8", "replace")).get("envs", [])
    except (ValueError, AttributeError):
        tail = err.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no JSON on stdout"]
        notes.append("`%s` failed (exit %s): %s" % (command, process.returncode, tail[0]))
        return []
    return [env for env in envs if isinstance(env, str)]


def environments_txt() -> "List[str]":
    """``~/.conda/environments.txt``: conda records every environment it creates here."""
    try:
        with open(os.path.expanduser("~/.conda/environments.txt")) as handle:
            lines = [line.strip() for line in handle]
    except (OSError, UnicodeDecodeError):
        return []
    return [line for line in lines if line and not line.startswith("#")]


def add_conda(finder: Finder, roots: "List[str]", listed: "List[str]") -> None:
    prefixes = list(roots)
    for root in roots:
        envs = os.path.join(root, "envs")
        if os.path.isdir(envs):
            prefixes.extend(os.path.join(envs, name) for name in sorted(os.listdir(envs)))
    for prefix in prefixes + listed:
        if os.path.isdir(prefix):
            finder.add("conda", conda_name(prefix), prefix)


# --- pyenv, venvs, PATH --------------------------------------------------------------------------


def add_pyenv(finder: Finder) -> None:
    versions = os.path.join(os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv"), "versions")
    try:
        names = sorted(os.listdir(versions), key=version_key)
    except OSError:
        return
    for name in names:
        finder.add("pyenv", name, os.path.join(versions, name))


def version_key(name: str) -> "List[Any]":
    """3.9.18 before 3.10.13: numbers compare as numbers."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)]


def add_searched(finder: Finder, directories: "List[str]", deadline: float) -> None:
    """Environments up to SEARCH_DEPTH below each directory, breadth first, bounded in entries and time."""
    budget = min(deadline, time.monotonic() + SEARCH_SECONDS)
    entries = 0
    queue: "Deque[Tuple[str, int]]" = deque()
    for directory in directories:
        path = os.path.abspath(os.path.expanduser(directory))
        if os.path.isdir(path):
            queue.append((path, 0))
        else:
            finder.notes.append("--search %s: no such directory on the host (%s)" % (directory, path))
    while queue:
        if time.monotonic() > budget or entries > SEARCH_ENTRIES:
            finder.notes.append("--search stopped after %d directory entries (%.0f s): give a narrower "
                                "directory to search deeper" % (entries, SEARCH_SECONDS))
            return
        path, depth = queue.popleft()
        if is_environment(path):
            kind = "conda" if os.path.isdir(os.path.join(path, "conda-meta")) else "venv"
            finder.add(kind, conda_name(path) if kind == "conda" else venv_name(path), path)
            continue
        if depth < SEARCH_DEPTH:
            entries += scan(path, depth, queue)


def scan(path: str, depth: int, queue: "Deque[Tuple[str, int]]") -> int:
    """Queue the subdirectories of path (never through a symlink: no loops); return entries seen."""
    seen = 0
    try:
        with os.scandir(path) as listing:
            for entry in listing:
                seen += 1
                try:
                    if entry.name not in SKIP_DIRS and entry.is_dir(follow_symlinks=False):
                        queue.append((entry.path, depth + 1))
                except OSError:
                    continue
    except OSError:
        pass  # unreadable: skipped, like find(1) would after its message
    return seen


def add_path_python(finder: Finder) -> None:
    python = shutil.which("python3")
    if python:
        finder.add("path", "python3", os.path.dirname(os.path.dirname(python)), python)


# --- asking each python --------------------------------------------------------------------------


def ask_python(environment: "Dict[str, Any]", deadline: float, limit: float) -> "Dict[str, Any]":
    timeout = min(limit, deadline - time.monotonic())
    if timeout <= 0:
        return dict(environment, error="not checked: the time for discover ran out")
    try:
        done = subprocess.run([environment["python"], "-c", PYTHON_PROBE], stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return dict(environment, error="its python did not answer within %.0f s" % timeout)
    except OSError as exc:
        return dict(environment, error="cannot run its python: %s" % (exc.strerror or exc))
    try:
        answer = json.loads(done.stdout.decode("utf-8", "replace"))
    except ValueError:
        lines = done.stderr.decode("utf-8", "replace").strip().splitlines() or ["no output"]
        return dict(environment, error="its python failed (exit %s): %s" % (done.returncode, lines[-1][:200]))
    return dict(environment, version=answer.get("version"), ipykernel=answer.get("ipykernel"),
                sys_prefix=answer.get("prefix"), executable=answer.get("executable"))


def ask_all(environments: "List[Dict[str, Any]]", deadline: float, limit: float) -> "List[Dict[str, Any]]":
    if not environments:
        return []
    with ThreadPoolExecutor(max_workers=PYTHON_WORKERS) as pool:
        return list(pool.map(lambda environment: ask_python(environment, deadline, limit), environments))


def without_path_duplicate(environments: "List[Dict[str, Any]]") -> "List[Dict[str, Any]]":
    """python3 on PATH is often one of the environments already found (an activated env)."""
    known = {os.path.realpath(env["prefix"]) for env in environments if env["kind"] != "path"}
    return [env for env in environments
            if env["kind"] != "path" or os.path.realpath(env.get("sys_prefix") or env["prefix"]) not in known]


def discover(request: "Dict[str, Any]") -> "Dict[str, Any]":
    started = time.monotonic()
    deadline = started + float(request.get("budget") or 40)
    finder = Finder()
    roots = conda_roots()
    executable = conda_executable(roots)
    conda = start_conda_list(executable)
    add_conda(finder, roots, environments_txt())
    add_pyenv(finder)
    add_searched(finder, [str(d) for d in request.get("search") or ()], deadline)
    add_path_python(finder)
    listed = finish_conda_list(conda, executable, deadline, finder.notes)
    add_conda(finder, [], listed)
    order = {"conda": 0, "pyenv": 1, "venv": 2, "path": 3}
    candidates = sorted(finder.found, key=lambda env: order[env["kind"]])  # stable: found order within a kind
    limit = float(request.get("python_timeout") or PYTHON_TIMEOUT)
    environments = without_path_duplicate(ask_all(candidates, deadline, limit))
    return {"environments": environments, "notes": finder.notes, "home": os.path.expanduser("~"),
            "conda": executable, "seconds": round(time.monotonic() - started, 3)}


def main(request: "Dict[str, Any]") -> None:
    answer = discover(request)
    sys.stdout.write("\n" + MARKER + "\n" + json.dumps(answer) + "\n")
    sys.stdout.flush()


if "REQUEST" in globals():
    main(REQUEST)  # type: ignore[name-defined]  # noqa: F821 - defined by bootstrap.run_program

"""Applies a SyncPlan: the only module that writes or removes kernelspecs.

Safety rules (issue 3): never modify or delete a spec we do not own; atomic writes so an
interrupted sync leaves the old or the new spec, never half of one; one sync at a time per kernels
dir (flock); no pruning after any failure; names that could escape the kernels dir are refused;
symlinked spec dirs are never followed.

How atomicity is achieved without a moment where a spec is missing:
- create: the spec is built in a private staging dir inside the kernels dir (same filesystem),
  fsynced, then renamed into place in one step;
- update: only files inside our own spec dir change, each written to a temp file, fsynced, then
  renamed over the old one (kernel.json last), so the directory never disappears;
- prune: the spec dir is first renamed into the staging dir (it vanishes from Jupyter in one
  step), then deleted.
The staging dir is ``.remote-kernel-tmp-*``: Jupyter lists only directories that contain a
kernel.json, and a spec in the making sits one level deeper, so Jupyter never sees it.
Leftovers of a killed sync are removed by the next one, under the lock.

jupyter_client's ``remove_kernel_spec`` rescans every kernelspec dir per call (1000 removals took
4.5 s); we scan the one target dir once with os.scandir and read only kernel.json files.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from remote_kernel.entry import KernelEntry
from remote_kernel.errors import KernelspecError, UsageError
from remote_kernel.kernelspec import (
    CREATE,
    PRUNE,
    RESERVED_PREFIX,
    UPDATE,
    DesiredSpec,
    InstalledSpec,
    PlannedAction,
    SyncPlan,
    check_spec_name,
    desired_specs,
    owner_config_of,
    plan_sync,
)

log = logging.getLogger(__name__)

LOCK_NAME = RESERVED_PREFIX + ".lock"
STAGING_PREFIX = RESERVED_PREFIX + "-tmp-"
LOGO_FILES = ("logo-32x32.png", "logo-64x64.png", "logo-svg.svg")
FILE_MODE = 0o644  # kernelspecs hold no secrets; images need them readable by every user
DIR_MODE = 0o755
LOCK_TIMEOUT = 60.0


@dataclass
class SyncResult:
    """What apply_plan did. ``prune_skipped`` says why pruning did not run (empty: it ran)."""

    applied: list[PlannedAction] = field(default_factory=list)
    failed: list[tuple[PlannedAction, str]] = field(default_factory=list)
    prune_skipped: str = ""

    @property
    def ok(self) -> bool:
        return not self.failed

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "applied": [{"name": item.name, "action": item.action} for item in self.applied],
            "failed": [
                {"name": item.name, "action": item.action, "error": error}
                for item, error in self.failed
            ],
            "prune_skipped": self.prune_skipped or None,
        }


# --- where kernelspecs go ------------------------------------------------------------------------


def user_kernels_dir() -> Path:
    """``jupyter kernelspec install --user``: honours JUPYTER_DATA_DIR like jupyter_client."""
    from jupyter_core.paths import jupyter_data_dir

    return Path(jupyter_data_dir()).absolute() / "kernels"


def sys_prefix_kernels_dir() -> Path:
    return Path(sys.prefix).absolute() / "share" / "jupyter" / "kernels"


def prefix_kernels_dir(prefix: str | os.PathLike[str]) -> Path:
    return Path(prefix).absolute() / "share" / "jupyter" / "kernels"


def kernels_dir_for(*, sys_prefix: bool = False, prefix: str | None = None) -> Path:
    """The target kernels dir for the --user (default) / --sys-prefix / --prefix DIR options."""
    if prefix is not None:
        if not prefix.strip():
            raise UsageError("--prefix needs a directory", hint="e.g. --prefix /usr/local")
        return prefix_kernels_dir(prefix)
    if sys_prefix:
        return sys_prefix_kernels_dir()
    return user_kernels_dir()


def launcher_python(value: str | None) -> str:
    """The absolute interpreter for kernel.json argv (VS Code hides specs whose python is missing).

    Default: the python running us, not resolved (a venv's bin/python symlink selects the venv).
    An absolute path is taken as given, even if missing here: images are built elsewhere.
    """
    if value is None:
        return os.path.abspath(sys.executable)
    if os.path.isabs(value):
        if not os.path.exists(value):
            log.warning("--launcher-python %s does not exist here; the kernels work only where it"
                        " does", value)
        return value
    found = shutil.which(value)
    if found is None:
        raise UsageError(f"--launcher-python {value!r} was not found on PATH",
                         hint="give an absolute path")
    return os.path.abspath(found)


def is_on_jupyter_path(kernels_dir: Path) -> bool:
    """Whether Jupyter will look in kernels_dir (JUPYTER_PATH, user, env and system dirs)."""
    from jupyter_core.paths import jupyter_path

    target = os.path.realpath(kernels_dir)
    return any(os.path.realpath(path) == target for path in jupyter_path("kernels"))


def find_logo_files() -> dict[str, Path]:
    """The kernelspec logos shipped as package data (copies of ipykernel's, BSD-3-Clause).

    Not taken from ipykernel itself: the local side needs no ipykernel, so a plain
    `pip install .` wrote specs without logos (issue 12, item 9).
    """
    resources = Path(__file__).resolve().parent / "resources"
    return {name: resources / name for name in LOGO_FILES if (resources / name).is_file()}


# --- reading the installed state -----------------------------------------------------------------


def scan_installed(kernels_dir: Path) -> dict[str, InstalledSpec]:
    """Classify every entry of kernels_dir once (no rescans, no jupyter_client).

    Symlinks are recorded as such and never followed; a kernel.json that is itself a symlink or
    is not valid JSON makes the spec foreign.
    """
    try:
        entries = os.scandir(kernels_dir)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        message = f"cannot read the kernels directory {kernels_dir}: {exc.strerror}"
        raise KernelspecError(message) from exc
    installed: dict[str, InstalledSpec] = {}
    config_exists: dict[str, bool] = {}
    with entries:
        for item in entries:
            if item.name.startswith(RESERVED_PREFIX):
                continue
            installed[item.name] = _classify(kernels_dir, item, config_exists)
    return installed


def _classify(
    kernels_dir: Path, item: os.DirEntry[str], config_exists: dict[str, bool],
) -> InstalledSpec:
    path = kernels_dir / item.name
    if item.is_symlink():
        return InstalledSpec(name=item.name, path=path, is_symlink=True)
    if not item.is_dir(follow_symlinks=False):
        return InstalledSpec(name=item.name, path=path)
    kernel_json = read_kernel_json(path)
    owner = owner_config_of(kernel_json) if kernel_json is not None else None
    if owner is not None and owner not in config_exists:
        config_exists[owner] = os.path.exists(owner)
    return InstalledSpec(
        name=item.name, path=path, kernel_json=kernel_json, owner_config=owner,
        owner_config_exists=config_exists.get(owner, True) if owner else True,
    )


def read_kernel_json(spec_dir: Path) -> dict[str, Any] | None:
    """The parsed kernel.json of spec_dir, or None when missing, a symlink, or not a JSON object."""
    try:
        fd = os.open(spec_dir / "kernel.json", os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        with os.fdopen(fd, "rb") as handle:
            document = json.loads(handle.read())
    except (OSError, ValueError):
        return None
    return document if isinstance(document, dict) else None


# --- the lock ------------------------------------------------------------------------------------


@contextlib.contextmanager
def sync_lock(kernels_dir: Path, timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
    """Hold ``<kernels_dir>/.remote-kernel.lock`` exclusively (flock; released if we die).

    The lock file is never deleted: unlinking a locked file would let a third process lock a new
    inode while the second still holds the old one.
    """
    import fcntl

    lock_path = kernels_dir / LOCK_NAME
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, FILE_MODE)
    except OSError as exc:
        raise KernelspecError(f"cannot open the sync lock {lock_path}: {exc.strerror}") from exc
    try:
        _acquire(fd, lock_path, timeout, fcntl)
        yield
    finally:
        os.close(fd)


def _acquire(fd: int, lock_path: Path, timeout: float, fcntl: Any) -> None:
    deadline = time.monotonic() + timeout
    waiting = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise KernelspecError(
                    f"another remote-kernel sync has held {lock_path} for over {timeout:.0f} s",
                    hint=f"wait for it to finish, or find it with `fuser {lock_path}`",
                ) from None
            if not waiting:
                log.info("waiting for another sync to release %s", lock_path)
                waiting = True
            time.sleep(0.05)
        else:
            return


# --- the whole operation -------------------------------------------------------------------------


def sync_kernelspecs(
    desired: Mapping[str, DesiredSpec],
    *,
    kernels_dir: Path,
    config_path: Path,
    prune: bool,
    dry_run: bool = False,
    logos: Mapping[str, Path] | None = None,
) -> tuple[SyncPlan, SyncResult | None]:
    """Plan, then (unless dry_run or nothing to change) apply under the lock.

    Returns the plan that was applied and the result (None when nothing was attempted).
    Nothing is created on disk, not even the lock file, when there is nothing to write.
    """
    def make_plan() -> SyncPlan:
        installed = scan_installed(kernels_dir)
        return plan_sync(desired, installed, config_path, prune, kernels_dir=kernels_dir)

    plan = make_plan()
    if dry_run or not plan.has_changes:
        return plan, None
    _make_dirs(kernels_dir)
    with sync_lock(kernels_dir):
        # Re-plan under the lock: another sync may have changed the dir since the first scan.
        plan = make_plan()
        return plan, apply_plan(plan, logos=find_logo_files() if logos is None else logos)


def _make_dirs(path: Path) -> None:
    try:
        path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    except OSError as exc:
        raise KernelspecError(
            f"cannot create the kernels directory {path}: {exc.strerror}",
            hint="choose another target (--user, --sys-prefix, --prefix DIR) or fix permissions",
        ) from exc


def apply_plan(plan: SyncPlan, *, logos: Mapping[str, Path]) -> SyncResult:
    """Carry out creates and updates, then prunes if nothing failed. The caller holds the lock."""
    result = SyncResult()
    if not plan.has_changes:
        return result
    try:
        remove_leftovers(plan.kernels_dir)
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=plan.kernels_dir))
    except OSError as exc:
        raise KernelspecError(f"cannot write in {plan.kernels_dir}: {exc.strerror or exc}",
                              hint="fix its permissions, or choose --user/--prefix DIR") from exc
    try:
        _apply_writes(plan, staging, logos, result)
        _apply_prunes(plan, staging, result)
        _fsync_path(plan.kernels_dir)
    except OSError as exc:  # an fsync failed: the disk, not one spec, is in trouble
        raise KernelspecError(f"writing kernelspecs in {plan.kernels_dir} failed: {exc}",
                              hint="check the disk, then run sync again") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result


def remove_leftovers(kernels_dir: Path) -> None:
    """Delete staging dirs left by a sync that was killed (we hold the lock: none is in use)."""
    with os.scandir(kernels_dir) as entries:
        for item in entries:
            if item.name.startswith(STAGING_PREFIX) and item.is_dir(follow_symlinks=False):
                log.info("removing %s, left over by an interrupted sync", item.path)
                shutil.rmtree(item.path, ignore_errors=True)


@dataclass
class _Staged:
    """One create/update, written but not yet visible: ``renames`` publish it, in order."""

    item: PlannedAction
    written: list[Path] = field(default_factory=list)
    renames: list[tuple[Path, Path]] = field(default_factory=list)


def _apply_writes(
    plan: SyncPlan, staging: Path, logos: Mapping[str, Path], result: SyncResult,
) -> None:
    """Write every new file, make them all durable at once, then publish each spec by rename.

    fsync-per-file made 1000 creates take 1.2 s; fsyncing them from a thread pool after all
    writes lets the filesystem commit them together (ext4 group commit), about 3x faster.
    """
    staged: list[_Staged] = []
    for item in plan.of(CREATE, UPDATE):
        stage = _Staged(item)
        if _attempt(item, result, functools.partial(_stage, stage, staging, logos)):
            staged.append(stage)
    _fsync_all([path for stage in staged for path in stage.written])
    for stage in staged:
        if _attempt(stage.item, result, functools.partial(_publish, stage)):
            log.info("%sd kernelspec %s", stage.item.action.removesuffix("e"), stage.item.path)
            result.applied.append(stage.item)
    _fsync_all([stage.item.path for stage in staged if stage.item.action == UPDATE])


def _attempt(item: PlannedAction, result: SyncResult, step: Callable[[], None]) -> bool:
    """Run one step for item; record a failure instead of raising (other specs still proceed)."""
    try:
        step()
    except (OSError, KernelspecError) as exc:
        message = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        log.warning("could not %s kernelspec %s: %s", item.action, item.path, message)
        result.failed.append((item, message))
        return False
    return True


def _stage(stage: _Staged, staging: Path, logos: Mapping[str, Path]) -> None:
    if stage.item.action == CREATE:
        _stage_create(stage, staging, logos)
    else:
        _stage_update(stage, logos)


def _publish(stage: _Staged) -> None:
    for source, target in stage.renames:
        # For a create, rename() refuses to replace a non-empty directory, so a spec that appeared
        # since the scan (e.g. from `jupyter kernelspec install`) makes it fail, never clobbered.
        os.rename(source, target)


def _fsync_all(paths: list[Path]) -> None:
    if len(paths) < 8:
        for path in paths:
            _fsync_path(path)
        return
    from concurrent.futures import ThreadPoolExecutor

    workers = 16  # enough concurrent fsyncs for the filesystem to commit them together
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(_fsync_paths, [paths[start::workers] for start in range(workers)]))


def _fsync_paths(paths: list[Path]) -> None:
    for path in paths:
        _fsync_path(path)


def _apply_prunes(plan: SyncPlan, staging: Path, result: SyncResult) -> None:
    prunes = plan.of(PRUNE)
    if not prunes:
        return
    if result.failed or plan.conflicts:
        # pipx's rule: after any failure, keep everything (a rename could be half-done).
        result.prune_skipped = "some kernelspecs could not be written" if result.failed else (
            "conflicts must be resolved first")
        log.warning("not pruning %d kernelspec(s): %s", len(prunes), result.prune_skipped)
        return
    for item in prunes:
        try:
            _prune(item, plan, staging)
        except (OSError, KernelspecError) as exc:
            message = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            log.warning("could not prune kernelspec %s: %s", item.path, message)
            result.failed.append((item, message))
        else:
            log.info("pruned kernelspec %s", item.path)
            result.applied.append(item)


# --- one spec ------------------------------------------------------------------------------------


def _spec_path(kernels_dir: Path, name: str) -> Path:
    """kernels_dir/name, after refusing any name that could point elsewhere."""
    check_spec_name(name)
    path = kernels_dir / name
    if path.parent != kernels_dir:
        raise KernelspecError(f"invalid kernel name {name!r}: it would leave {kernels_dir}")
    return path


def _kernel_json_bytes(item: PlannedAction) -> bytes:
    if item.spec is None:
        raise KernelspecError(f"internal error: no kernel.json rendered for {item.name}")
    return (json.dumps(item.spec.kernel_json, indent=1, sort_keys=True) + "\n").encode()


def _stage_create(stage: _Staged, staging: Path, logos: Mapping[str, Path]) -> None:
    item = stage.item
    target = _spec_path(staging.parent, item.name)
    building = staging / item.name
    building.mkdir()
    # mkdir honours the umask; images need world-readable specs. (chmod only when needed: every
    # metadata change waits on the filesystem journal, which is what a busy disk makes slow.)
    if stat.S_IMODE(building.stat().st_mode) != DIR_MODE:
        os.chmod(building, DIR_MODE)
    for name, source in logos.items():
        if not _link_logo(source, building / name):
            stage.written.append(_write_file(building / name, source.read_bytes()))
    stage.written += [_write_file(building / "kernel.json", _kernel_json_bytes(item)), building]
    stage.renames.append((building, target))


def _stage_update(stage: _Staged, logos: Mapping[str, Path]) -> None:
    item = stage.item
    spec_dir = _spec_path(item.path.parent, item.name)
    if spec_dir.is_symlink() or not spec_dir.is_dir():
        raise KernelspecError(f"{spec_dir} changed since it was scanned; run sync again")
    files = {name: source.read_bytes() for name, source in logos.items()
             if not (spec_dir / name).exists()}
    files["kernel.json"] = _kernel_json_bytes(item)  # last: it is what makes the update visible
    for name, data in files.items():
        temp = spec_dir / f"{STAGING_PREFIX}{name}"
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()  # left by a killed sync
        stage.written.append(_write_file(temp, data))
        stage.renames.append((temp, spec_dir / name))


def _prune(item: PlannedAction, plan: SyncPlan, staging: Path) -> None:
    spec_dir = _spec_path(plan.kernels_dir, item.name)
    # Re-check ownership right before deleting: a spec replaced by hand since the scan survives.
    current = read_kernel_json(spec_dir) if not spec_dir.is_symlink() else None
    if current is None or owner_config_of(current) != str(plan.config_path):
        raise KernelspecError(f"{spec_dir} changed since it was scanned; left in place")
    os.rename(spec_dir, staging / item.name)
    shutil.rmtree(staging / item.name)


# --- files ---------------------------------------------------------------------------------------


def _write_file(path: Path, data: bytes) -> Path:
    """Create path with data, mode 0644 (the caller fsyncs it before publishing)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, FILE_MODE)
    with os.fdopen(fd, "wb") as handle:
        if stat.S_IMODE(os.fstat(fd).st_mode) != FILE_MODE:
            os.fchmod(fd, FILE_MODE)  # the umask must not make a spec unreadable in an image
        handle.write(data)
    return path


def _link_logo(source: Path, target: Path) -> bool:
    """Hard-link an ipykernel logo instead of copying it: no data to write or fsync, which made
    1000 creates about twice as fast on a busy disk. Only world-readable sources are linked (a
    link shares the source's mode); other filesystems or modes fall back to a copy."""
    try:
        if source.stat().st_mode & 0o777 != FILE_MODE:
            return False
        os.link(source, target)  # follows a symlinked source: never link a relative symlink
    except OSError:
        return False
    return True


def _fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory's fsync makes its new entries durable)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- state for `remote-kernel list` --------------------------------------------------------------

_STATE_OF_ACTION = {"unchanged": "in sync", "update": "outdated", "create": "missing",
                    "conflict": "conflict"}


def sync_states(entries: Iterable[KernelEntry], *, config_path: Path) -> dict[str, str]:
    """Entry name -> "in sync" / "outdated" / "missing" / "conflict", judged on the kernelspec
    Jupyter would actually pick for that name (the first one on its kernel search path)."""
    from jupyter_core.paths import jupyter_path

    scans = []
    for directory in dict.fromkeys(jupyter_path("kernels")):
        try:
            installed = scan_installed(Path(directory))
        except KernelspecError:
            continue
        scans.append((Path(directory), {name.lower(): spec for name, spec in installed.items()}))
    python = launcher_python(None)
    states: dict[str, str] = {}
    for entry in entries:
        where = next(((path, found) for path, found in scans if entry.name.lower() in found), None)
        if where is None:
            states[entry.name] = "missing"
            continue
        kernels_dir, found = where
        desired = desired_specs([entry], kernels_dir=kernels_dir, config_path=config_path,
                                python=python)
        current = found[entry.name.lower()]
        plan = plan_sync(desired, {current.name: current}, config_path, False,
                         kernels_dir=kernels_dir)
        states[entry.name] = _STATE_OF_ACTION.get(plan.actions[0].action, "unknown")
    return states

"""The JSON forms we persist, and the one writer of the local files that hold them.

Schema: ``Record`` gives a frozen dataclass ``to_dict``/``from_dict`` derived from its fields and
their annotations, so a new field is declared once (with its default) and can neither be left out of
the stored form nor out of ``KernelEntry.fingerprint()``. ``from_dict`` takes a missing key as the
field's default (a dict written by an older version loads) and ignores unknown keys (one written by
a newer version loads too).

Files: connection files, restart records and saved remote stderr are private (an HMAC key, a
reattach token, the user's output). ``write_private`` is how all of them reach the disk: a temp file
created 0600 with O_EXCL in a 0700 directory, then ``os.replace``, so no reader ever sees a partial
or briefly world-readable file (jupyter_client's ``secure_write`` has the same concern).

Standard library only: ``from-spec`` imports this before the kernel starts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Self

# Under the Jupyter runtime dir: restart records (<digest>.json) and saved stderr (<name>.stderr.log).
RECORDS_DIR = "remote-kernel"

# --- schema -------------------------------------------------------------------------------------


class Record:
    """Mixin for frozen dataclasses stored as JSON: ``to_dict``/``from_dict`` from the fields.

    Field types understood: str, int, float, bool, ``X | None``, ``tuple[X, ...]``,
    ``Mapping[str, X]``, nested Records, and ``Any`` (JSON kept as it is). Tuples are stored as
    lists, mappings with sorted keys.
    """

    def to_dict(self) -> dict[str, Any]:
        return {field.name: _dump(getattr(self, field.name)) for field in dataclasses.fields(self)}  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """Build from a stored dict: absent keys take the field's default, unknown keys are ignored;
        a required key that is absent raises KeyError, a value of the wrong type TypeError."""
        if not isinstance(data, Mapping):
            raise TypeError(f"{cls.__name__}: expected a JSON object, found {type(data).__name__}")
        hints = _field_hints(cls)
        values = {name: _load(hint, data[name], f"{cls.__name__}.{name}")
                  for name, hint in hints.items() if name in data}
        missing = [field.name for field in dataclasses.fields(cls)  # type: ignore[arg-type]
                   if field.name not in values and _is_required(field)]
        if missing:
            raise KeyError(missing[0])
        return cls(**values)


_HINTS: dict[type, dict[str, Any]] = {}


def _field_hints(cls: type) -> dict[str, Any]:
    """Each field's annotation, evaluated (they are strings under ``from __future__ import annotations``)."""
    if cls not in _HINTS:
        hints = typing.get_type_hints(cls)
        _HINTS[cls] = {field.name: hints[field.name] for field in dataclasses.fields(cls)}
    return _HINTS[cls]


def _is_required(field: dataclasses.Field[Any]) -> bool:
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


def _dump(value: Any) -> Any:
    if isinstance(value, Record):
        return value.to_dict()
    if isinstance(value, tuple | list):
        return [_dump(item) for item in value]
    if isinstance(value, Mapping):
        return {str(key): _dump(item) for key, item in sorted(value.items())}
    return value


_SCALARS: dict[type, tuple[type, ...]] = {str: (str,), int: (int,), float: (int, float), bool: (bool,)}


def _load(hint: Any, value: Any, where: str) -> Any:
    """``value`` (JSON) as the annotated type ``hint``; TypeError naming ``where`` if it is not one."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:  # a nested JSON document kept as it is (a record of another schema)
        return value
    if origin in (typing.Union, types.UnionType):
        return _load_optional(args, value, where)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis and isinstance(value, list | tuple):
        return tuple(_load(args[0], item, f"{where}[{index}]") for index, item in enumerate(value))
    if origin in (Mapping, dict) and isinstance(value, Mapping):
        return {_load(args[0], key, where): _load(args[1], item, f"{where}.{key}") for key, item in value.items()}
    if isinstance(hint, type) and issubclass(hint, Record) and isinstance(value, hint | Mapping):
        return _load_record(hint, value)
    if hint in _SCALARS and isinstance(value, _SCALARS[hint]) and (hint is bool or not isinstance(value, bool)):
        return hint(value)
    raise _mismatch(hint, value, where)


def _load_optional(args: tuple[Any, ...], value: Any, where: str) -> Any:
    if value is None and type(None) in args:
        return None
    inner = [arg for arg in args if arg is not type(None)]
    if len(inner) != 1:
        raise _mismatch(args, value, where)
    return _load(inner[0], value, where)


def _load_record(hint: type[Record], value: Record | Mapping[str, Any]) -> Record:
    # A value already of the type is taken as is: config.py passes resolved HostEntry objects.
    return hint.from_dict(value) if isinstance(value, Mapping) else value


def _mismatch(hint: Any, value: Any, where: str) -> TypeError:
    return TypeError(f"{where}: expected {_type_name(hint)}, found {type(value).__name__} {value!r:.60}")


def _type_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


# --- private files ------------------------------------------------------------------------------


def write_private(path: Path, content: str, *, staging: Path | None = None) -> None:
    """Write ``path`` so that only its owner can ever read it, atomically.

    The directory is created 0700 if missing (an existing one is the user's and is left as it is);
    the temp file is created 0600 with O_EXCL (never an existing file or a planted symlink), and
    replaces ``path`` only once complete. Its name is random so that kernels served by one process
    (the provisioner) never collide, and does not end in .json (``gc`` globs the records).
    ``staging``: write the temp file there instead (same file system), for a directory that
    another program reads file by file (jupyter_server's external_kernels would adopt it).
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    import secrets  # here: ~4 ms of every argv launcher's start, which writes no file

    temporary = (staging or path.parent) / f".{path.name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(content)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise


def write_private_json(path: Path, data: Any, *, indent: int | None = None, staging: Path | None = None) -> None:
    write_private(path, json.dumps(data, indent=indent), staging=staging)


def save_stderr_log(runtime_dir: Path, kernel_name: str, lines: list[str]) -> Path | None:
    """The remote stderr of a failed start, kept whole (the error shows its tail); None if it
    cannot be written (the error is still raised, just without the file's name)."""
    path = runtime_dir / RECORDS_DIR / f"{kernel_name}.stderr.log"
    try:
        write_private(path, "\n".join(lines) + "\n")
    except OSError:
        return None
    return path


# --- the restart record -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RestartRecord(Record):
    """What a launcher leaves for the one that replaces it on a restart: the running kernel's agent
    (host label and directory), the token that proves ownership to it, and the launcher's pid (a
    live pid means the old launcher still stops its kernel itself)."""

    pid: int
    host: str
    dir: str
    token: str
    job_id: str | None = None  # a batch backend's job holding the agent (a restart reuses it)
    job_dir: str | None = None  # ... and the name of the job's directory (its agent.sock)

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        return {name: value for name, value in data.items() if value is not None}  # the stable form


def restart_record_path(runtime_dir: Path, connection_file: Path) -> Path:
    """Keyed by the connection file, which Jupyter keeps across a restart."""
    import hashlib  # here, as secrets above

    digest = hashlib.sha256(str(connection_file.resolve()).encode()).hexdigest()[:24]
    return runtime_dir / RECORDS_DIR / f"{digest}.json"


def save_restart_record(path: Path, record: RestartRecord) -> None:
    write_private_json(path, record.to_dict())  # holds the reattach token


def load_restart_record(path: Path) -> RestartRecord | None:
    """The record at ``path``; None if there is none or it is unreadable (it is only a hint)."""
    try:
        return RestartRecord.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def forget_restart_record(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


__all__ = [
    "RECORDS_DIR",
    "Record",
    "RestartRecord",
    "forget_restart_record",
    "load_restart_record",
    "restart_record_path",
    "save_restart_record",
    "save_stderr_log",
    "write_private",
    "write_private_json",
]

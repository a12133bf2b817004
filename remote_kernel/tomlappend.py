"""Adding tables to a TOML file the user owns, without rewriting a byte of what they wrote.

tomllib/tomli-w cannot round-trip comments or layout, so we never re-serialise the user's file:
new tables are rendered with tomli-w and appended as text. The only edit of existing text is
``remove_table`` (for ``install --force``), which cuts out exactly one table's header and body and
proves the cut by re-parsing: the result must equal the old document minus that table, or nothing
is changed.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from typing import Any

import tomli_w

KeyPath = tuple[str, ...]


def render_tables(tables: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> str:
    """``{"hosts": {"lab": {...}}, "kernels": {...}}`` -> ``[hosts.lab]``... text (via tomli-w)."""
    return tomli_w.dumps({kind: dict(named) for kind, named in tables.items() if named})


def joined(original: str, addition: str) -> str:
    """original + addition, separated by one blank line; original is kept byte for byte."""
    return original + separator(original) + addition


def separator(original: str) -> str:
    if not original:
        return ""
    if original.endswith("\n\n"):
        return ""
    return "\n" if original.endswith("\n") else "\n\n"


class TableNotFoundError(ValueError):
    """The table is not defined by a plain ``[a.b]`` header (dotted keys, inline tables...)."""


def remove_table(text: str, path: KeyPath) -> str:
    """Cut the ``[path]`` table (and its ``[path.sub]`` tables right after it) out of text.

    Comments between this table and the next stay (they usually describe what follows).
    Raises TableNotFoundError when the cut cannot be proven exact by re-parsing.
    """
    lines = text.splitlines(keepends=True)
    headers = _table_headers(lines)
    start = next((index for index, key in headers if key == path), None)
    if start is None:
        raise TableNotFoundError(f"no [{'.'.join(path)}] header")
    after = (index for index, key in headers if index > start and key[: len(path)] != path)
    end = next(after, len(lines))
    body_end = end
    while body_end > start + 1 and _is_blank_or_comment(lines[body_end - 1]):
        body_end -= 1
    # Trailing comments stay with what follows; the blank lines before them go with the table.
    while body_end < end and not lines[body_end].strip():
        body_end += 1
    end = body_end
    result = "".join(lines[:start] + lines[end:])
    _verify_removal(text, result, path)
    return result


def _verify_removal(before: str, after: str, path: KeyPath) -> None:
    expected = tomllib.loads(before)
    parent = expected
    for part in path[:-1]:
        parent = parent[part]
    del parent[path[-1]]
    try:
        actual = tomllib.loads(after)
    except tomllib.TOMLDecodeError as exc:
        raise TableNotFoundError(f"cutting [{'.'.join(path)}] would break the file: {exc}") from exc
    if _without_empty(actual) != _without_empty(expected):
        raise TableNotFoundError(f"[{'.'.join(path)}] is not defined in one place")


def _without_empty(document: dict[str, Any]) -> dict[str, Any]:
    # Removing the last [kernels.x] also removes the implicit [kernels] table; that is no change.
    return {key: value for key, value in document.items() if value != {}}


def _table_headers(lines: list[str]) -> list[tuple[int, KeyPath]]:
    """(line index, key path) of each ``[table]``/``[[array]]`` header outside multi-line strings."""
    headers: list[tuple[int, KeyPath]] = []
    open_quote = ""
    for index, line in enumerate(lines):
        if open_quote:
            if line.count(open_quote) % 2 == 1:
                open_quote = ""
            continue
        stripped = line.lstrip()
        if stripped.startswith("["):
            key = _header_key(stripped)
            if key is not None:
                headers.append((index, key))
            continue
        open_quote = _opens_multiline_string(line)
    return headers


def _header_key(line: str) -> KeyPath | None:
    try:
        document: Any = tomllib.loads(line)
    except tomllib.TOMLDecodeError:
        return None
    key: list[str] = []
    while isinstance(document, dict) and len(document) == 1:
        name, document = next(iter(document.items()))
        key.append(name)
        if isinstance(document, list):  # [[array.of.tables]]
            document = document[-1]
    return tuple(key)


def _opens_multiline_string(line: str) -> str:
    """The delimiter of a multi-line string that this line opens and does not close, or ''.

    Heuristic; remove_table's re-parse check catches any line it misjudges.
    """
    for quote in ('"""', "'''"):
        if line.count(quote) % 2 == 1:
            return quote
    return ""


def _is_blank_or_comment(line: str) -> bool:
    stripped = line.strip()
    return not stripped or stripped.startswith("#")

""""Did you mean ...?" for names the user typed: kernel entries, kernelspecs, hosts (stdlib only)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def close_matches(word: str, choices: Iterable[str]) -> list[str]:
    """Up to three choices that look like ``word`` (case-insensitive; kernel names are lower-case)."""
    by_folded = {choice.lower(): choice for choice in choices}
    return [by_folded[match] for match in difflib.get_close_matches(word.lower(), by_folded, n=3, cutoff=0.6)]


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """``did you mean 'lab-py311'?`` (or ``'a' or 'b'``), or "" when nothing is close."""
    matches = close_matches(word, choices)
    if not matches:
        return ""
    return f"did you mean {' or '.join(repr(match) for match in matches)}?"

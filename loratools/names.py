"""Tensor names: glob selection patterns and the natural order (``layers.2`` before ``layers.10``)."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable


def matches(name: str, patterns: Iterable[str]) -> str | None:
    """The first pattern matching the tensor `name` or its module name (glob; plain words as substrings)."""
    candidates = (name, name.rsplit(".", 1)[0])
    for pattern in patterns:
        glob = pattern if any(c in pattern for c in "*?[") else f"*{pattern}*"
        if any(fnmatch.fnmatchcase(c, glob) for c in candidates):
            return pattern
    return None


def natural_key(name: str) -> tuple:
    """Sort key that orders the numbers inside names by value: ``layers.2`` before ``layers.10``."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name))


def short_list(names: list[str], limit: int = 4) -> str:
    """The first `limit` names, comma-separated, and how many more: ``a, b, c, d … (+3)``."""
    return ", ".join(names[:limit]) + (f" … (+{len(names) - limit})" if len(names) > limit else "")

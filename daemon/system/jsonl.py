"""The one JSON-lines reader: status sidecars, history and notices are all read through it."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def read_json_lines(path: Path, last: int | None = None) -> list[dict[str, Any]]:
    """The objects of `path`'s lines that parse (of the `last` lines, if given); none if it is missing.

    A line being appended right now is skipped, not an error; so is anything not an object.
    Other errors (permission, I/O) are raised: readers on a share suppress them, `storyreel
    status` turns them into advice.
    """
    try:
        lines = path.read_text("utf-8").splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines[-last:] if last else lines:
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            out.append(value)
    return out


def now_iso() -> str:
    """The time stamp of every line the daemon writes: ISO 8601, UTC, to the millisecond."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")

"""`state/current.json`: what the daemon says it is doing right now (written by
daemon/queue/activity.py, read by `storyreel status`, the page and the box's commands)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from daemon.system.jsonl import now_iso
from pipeline.fsutil import atomic_write_json

CURRENT = "current.json"


def write_current(state: Path, current: dict[str, Any]) -> None:
    atomic_write_json(state / CURRENT, {"time": now_iso(), "pid": os.getpid(), **current})


def read_current(state: Path) -> dict[str, Any]:
    """What the daemon last said (a stopped daemon's last word included); {} if it never said.

    Whether it is still running is `running(current)`: the file outlives the process.
    """
    try:
        value = json.loads((state / CURRENT).read_text("utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def running(current: dict[str, Any]) -> bool:
    """Whether the daemon that wrote `current` is alive."""
    return pid_alive(current.get("pid"))


def pid_alive(pid: object) -> bool:
    """Whether a process with this pid exists (ours or another user's)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

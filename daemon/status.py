"""What people see: the per-story status sidecar and the daemon's own status.

`outbox/NAME.status.jsonl` is append-only, one JSON object per line, each line
flushed and fsynced as it is written, so `tail -f` shows progress live and the
last line is always the current state. `state/current.json` says what the
daemon is doing right now, for `storyreel status`.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from daemon.spool import Spool, now_iso
from pipeline.fsutil import atomic_write_json

STATES = ("queued", "processing", "waiting", "done", "failed", "expired")


def sidecar_path(outbox: Path, name: str) -> Path:
    return outbox / f"{name}.status.jsonl"


def append_status(
    outbox: Path, name: str, state: str, scene: int, scenes: int, **extra: Any
) -> dict[str, Any]:
    """Append one line; raises OSError if the outbox cannot take it (the caller waits)."""
    assert state in STATES, state
    line: dict[str, Any] = {
        "time": now_iso(),
        "story": name,
        "state": state,
        "scene": scene,
        "scenes": scenes,
    }
    line.update({k: v for k, v in extra.items() if v is not None})
    data = (json.dumps(line, ensure_ascii=False) + "\n").encode("utf-8")
    fd = os.open(sidecar_path(outbox, name), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    return line


def last_status(outbox: Path, name: str) -> dict[str, Any] | None:
    try:
        lines = sidecar_path(outbox, name).read_text("utf-8").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        with contextlib.suppress(ValueError):
            value: dict[str, Any] = json.loads(line)
            return value
    return None


def write_current(state: Path, current: dict[str, Any]) -> None:
    atomic_write_json(state / "current.json", {"time": now_iso(), "pid": os.getpid(), **current})


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fmt_eta(seconds: float | None) -> str:
    if seconds is None:
        return "ETA unknown"
    m, s = divmod(int(seconds), 60)
    return f"ETA {m}m{s:02d}s" if m else f"ETA {s}s"


def describe(state: Path, outbox: Path, spool: Spool, history: int = 10) -> str:
    """The human-readable report of `storyreel status`."""
    lines: list[str] = []
    try:
        current = json.loads((state / "current.json").read_text("utf-8"))
    except (OSError, ValueError):
        current = None
    if current and _alive(int(current.get("pid", 0))):
        lines.append(f"daemon: running (pid {current['pid']}), {current.get('activity', 'idle')}")
        story = current.get("story")
        if story:
            scene = f"scene {current.get('scene')}/{current.get('scenes')}"
            eta = _fmt_eta(current.get("eta_seconds"))
            lines.append(f"current: {story} (#{current.get('seq')}) {scene}, {eta}")
        held = current.get("held")
        for name, reason in held.items() if isinstance(held, dict) else ():
            lines.append(f"held: {name}, retried with back-off ({reason})")
    else:
        lines.append("daemon: not running")
    claims = spool.claims()
    lines.append(f"queue: {len(claims)} stor{'y' if len(claims) == 1 else 'ies'}")
    for c in claims:
        last = last_status(outbox, c.name) or {}
        lines.append(f"  #{c.seq:<6} {c.name:<40} {last.get('state', 'queued')}  (from {c.identity.source})")
    recent = spool.history(history)
    lines.append(f"recent: {len(recent)}")
    for h in reversed(recent):
        err = f" — {h['error']}" if h.get("error") else ""
        lines.append(
            f"  #{h.get('seq', '?'):<6} {h.get('story', '?'):<40} {h.get('state')}  {h.get('time')}{err}"
        )
    return "\n".join(lines)

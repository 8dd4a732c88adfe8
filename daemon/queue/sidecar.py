"""`outbox/NAME.status.jsonl`, the per-story status sidecar people `tail -f`.

Append-only, one JSON object per line, each line flushed and fsynced as it is written, so
`tail -f` shows progress live and the last line is always the current state. Only the ledger
(daemon/queue/ledger.py) writes here; the report reads.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from pathlib import Path
from typing import Any

from daemon.queue.states import State
from daemon.system.jsonl import now_iso, read_json_lines
from pipeline.names import sidecar_name


def sidecar_path(outbox: Path, name: str) -> Path:
    return outbox / sidecar_name(name)


def append_status(
    outbox: Path, name: str, state: State | str, scene: int, scenes: int, **extra: Any
) -> dict[str, Any]:
    """Append one line; raises OSError if the outbox cannot take it (the caller waits).

    A short write (a filesystem that filled up in the middle of the line) is cut back off,
    so the file never holds half a line.
    """
    line: dict[str, Any] = {
        "time": now_iso(),
        "story": name,
        "state": State(state).value,
        "scene": scene,
        "scenes": scenes,
    }
    line.update({k: v for k, v in extra.items() if v is not None})
    data = (json.dumps(line, ensure_ascii=False) + "\n").encode("utf-8")
    path = sidecar_path(outbox, name)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        size = os.fstat(fd).st_size
        try:
            written = os.write(fd, data)
            if written != len(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            os.fsync(fd)
        except OSError as err:
            _cut_back(fd, size, path)
            if err.filename is None:  # os.write names no file: say which one could not take the line
                raise OSError(err.errno, err.strerror, str(path)) from None
            raise
    finally:
        os.close(fd)
    return line


def _cut_back(fd: int, size: int, path: Path) -> None:
    """Undo a failed append: no half line, and no empty sidecar (it would take the name)."""
    with contextlib.suppress(OSError):
        os.ftruncate(fd, size)
        if size == 0:
            path.unlink()


def read_status(outbox: Path, name: str) -> list[dict[str, Any]]:
    """Every readable line of NAME's sidecar (none if it cannot be read: it is on a share)."""
    with contextlib.suppress(OSError):
        return read_json_lines(sidecar_path(outbox, name))
    return []


def last_status(outbox: Path, name: str) -> dict[str, Any] | None:
    """NAME's last readable status line, if any."""
    lines = read_status(outbox, name)
    return lines[-1] if lines else None

"""`state/notices.jsonl`: controls that changed nothing (an unknown name, a story already ended),
written by the steering, shown under `notices:` in `storyreel status`."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from daemon.system.jsonl import now_iso, read_json_lines

NOTICES = "notices.jsonl"


def append_notice(state: Path, text: str) -> None:
    line = json.dumps({"time": now_iso(), "notice": text}, ensure_ascii=False) + "\n"
    with contextlib.suppress(OSError), open(state / NOTICES, "a", encoding="utf-8") as fh:
        fh.write(line)


def recent_notices(state: Path, last: int = 5) -> list[dict[str, Any]]:
    with contextlib.suppress(OSError):
        return read_json_lines(state / NOTICES, last)
    return []

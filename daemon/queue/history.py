"""`state/history.jsonl`: one line per finished claim, kept small without forgetting what matters.

Each line carries the identity (name, size, mtime, inode) of the inbox file it
came from; `Spool.open` reads them all so a file is never claimed twice (see
daemon/queue/spool.py). An identity only matters while a file of that name can still
be in the inbox: the original is removed right after its claim, and only a crash
in between leaves it there. So compaction keeps every line whose file name is in
the inbox now, plus the most recent `keep` lines (what `storyreel status` and
the page show), and folds everything else into one leading summary line of
totals - stories by outcome and scenes made - so the metrics' counters, which
are recomputed from history at start, stay equal to what the sidecars say.

The summary line has no identity and a state of its own ("compacted"): the spool
and the page skip it; `storyreel status` never reaches it because at least
`keep` lines follow it. The file is replaced atomically, so a crash during
compaction leaves the old history or the new one, and repeating it is harmless.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon.system.jsonl import now_iso, read_json_lines
from pipeline.fsutil import atomic_write_bytes

HISTORY = "history.jsonl"  # in the state folder
SUMMARY = "compacted"
COMPACT_OVER_BYTES = 256 << 10  # ~1000 lines; the file read at every start stays this small
KEEP_LINES = 200


@dataclass
class Totals:
    """Stories by how they ended, and scenes of published stories, over the whole history."""

    outcomes: Counter[str] = field(default_factory=Counter)
    scenes: int = 0

    def add(self, line: dict[str, Any]) -> None:
        if line.get("state") == SUMMARY:
            self.outcomes.update({str(k): int(v) for k, v in dict(line.get("totals") or {}).items()})
            self.scenes += int(line.get("scenes") or 0)
            return
        state = str(line.get("state") or "")
        if not state:
            return
        self.outcomes[state] += 1
        outputs = line.get("outputs")
        if state == "done" and isinstance(outputs, dict):
            self.scenes += len(outputs.get("images") or [])


def read_history(path: Path, last: int | None = None) -> list[dict[str, Any]]:
    """History's lines, oldest first (the `last` ones, if given); none while there is no history."""
    return read_json_lines(path, last)


def totals(path: Path) -> Totals:
    result = Totals()
    for line in read_history(path):
        result.add(line)
    return result


def _source(line: dict[str, Any]) -> str | None:
    identity = line.get("identity")
    return str(identity.get("source")) if isinstance(identity, dict) else None


def compact(path: Path, inbox: Path, keep: int = KEEP_LINES, over_bytes: int = COMPACT_OVER_BYTES) -> int:
    """Compact `path` if it is over `over_bytes`; returns how many lines were folded away.

    Call it only while holding the spool's lock (the daemon, between stories): it
    rewrites the file the spool appends to. Does nothing if the inbox cannot be
    listed, since then it cannot tell which identities still matter.
    """
    try:
        if path.stat().st_size <= over_bytes:
            return 0
        in_inbox = set(os.listdir(inbox))
    except OSError:
        return 0
    lines = read_history(path)
    recent = max(0, len(lines) - keep)
    kept, folded = [], Totals()
    dropped = 0
    for index, line in enumerate(lines):
        if line.get("state") != SUMMARY and (index >= recent or _source(line) in in_inbox):
            kept.append(line)
        else:
            folded.add(line)
            dropped += line.get("state") != SUMMARY
    if not dropped:
        return 0
    summary = {
        "time": now_iso(),
        "state": SUMMARY,
        "totals": dict(sorted(folded.outcomes.items())),
        "scenes": folded.scenes,
    }
    text = "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in [summary, *kept])
    atomic_write_bytes(path, text.encode("utf-8"))
    return dropped

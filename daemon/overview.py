"""The daemon at a glance, read from its local truth: what the page (and the metrics) show.

Nothing here is a second record of anything: the queue is the spool's claims, the
story in progress and the daemon's activity are `state/current.json`, the endings
are `state/history.jsonl` and each story's sidecar. Reading them costs a few small
reads, which is why the page is written at most once every few seconds.
"""

from __future__ import annotations

import contextlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from daemon.page import DaemonState, InProgress, PageSnapshot, Queued, Result, SceneThumb
from daemon.spool import Claim, Spool
from daemon.status import last_status, pid_alive

TITLES_READ = 100  # queued stories whose input is read for the title
_TITLE_BYTES = 1_000_000  # inputs over the story size limit never ran; their title is not worth reading


def _parse_time(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def _story_facts(path: Path) -> tuple[str, int]:
    """(title, number of scenes) of a story file, ("", 0) when it cannot be read: never an error."""
    try:
        with open(path, "rb") as fh:
            doc = json.loads(fh.read(_TITLE_BYTES + 1))
    except (OSError, ValueError):
        return "", 0
    if not isinstance(doc, dict):
        return "", 0
    title = doc.get("title")
    scenes = doc.get("scenes")
    return (title if isinstance(title, str) else ""), (len(scenes) if isinstance(scenes, list) else 0)


def read_current(state: Path) -> dict[str, Any]:
    try:
        value = json.loads((state / "current.json").read_text("utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def daemon_state(current: dict[str, Any]) -> tuple[DaemonState, str]:
    """(state, reason) from `current.json`'s activity line (see daemon/worker.py)."""
    activity = str(current.get("activity", ""))
    if activity == "stopped" or not pid_alive(current.get("pid")):
        return "stopped", ""
    if activity.startswith("processing"):
        return "running", ""
    if activity.startswith("paused"):
        by = "; ".join(f"by {p.get('by')} since {p.get('since')}" for p in current.get("paused") or [])
        return "paused", str(current.get("reason") or by)
    if activity.startswith("waiting") and current.get("waiting"):
        return "waiting", str(current["waiting"])  # daemon/ledger.py keeps the reason apart
    if activity.startswith("waiting"):
        # "waiting (REASON), retry in Ns"
        inner = activity[len("waiting") :].strip()
        reason = inner[1 : inner.rfind(")")] if inner.startswith("(") and ")" in inner else inner
        return "waiting", reason
    return "idle", ""


def _in_progress(claim: Claim, current: dict[str, Any]) -> InProgress:
    title, scenes = _story_facts(claim.input)
    images = claim.work / "out" / "images"  # pipeline.render.StoryJob.out: PNGs appear there finished
    finished = []
    with contextlib.suppress(OSError):
        for png in sorted(images.glob("scene_*.png")):
            with contextlib.suppress(ValueError):
                finished.append(SceneThumb(int(png.stem.removeprefix("scene_")), png))
    eta = current.get("eta_seconds")
    return InProgress(
        name=claim.name,
        title=title,
        scene=int(current.get("scene") or len(finished) + 1),
        scenes=int(current.get("scenes") or scenes),
        eta_seconds=float(eta) if isinstance(eta, int | float) else None,
        finished=tuple(finished),
    )


def _result(outbox: Path, line: dict[str, Any]) -> Result | None:
    name = line.get("story")
    if not isinstance(name, str) or "identity" not in line:
        return None
    last = last_status(outbox, name) or {}
    outputs: dict[str, Any] = line["outputs"] if isinstance(line.get("outputs"), dict) else {}
    ended = str(last.get("state") or line.get("state") or "")
    if ended == "done":
        present = {k: v for k, v in outputs.items() if isinstance(v, str) and (outbox / v).exists()}
        title, scenes = _story_facts(outbox / name / "story.json")
        return Result(
            name=name,
            state=ended,
            title=title,
            finished=_parse_time(line.get("time")),
            scenes=len(outputs.get("images") or []) or scenes,
            film=present.get("film"),
            poster=next((p for p in (outputs.get("images") or [])[:1] if (outbox / p).exists()), None),
            contact_sheet=present.get("contact_sheet"),
            zip=present.get("zip"),
            folder=present.get("folder"),
        )
    kept = line.get("kept")
    title = _story_facts(Path(kept))[0] if isinstance(kept, str) and kept.endswith(".json") else ""
    return Result(
        name=name,
        state=ended,
        title=title,
        finished=_parse_time(last.get("time") or line.get("time")),
        scenes=int(last.get("scenes") or 0),
        error=str(last.get("error") or line.get("error") or ""),
    )


def read_snapshot(
    spool: Spool,
    outbox: Path,
    history: int = 20,
    now: datetime | None = None,
    current: dict[str, Any] | None = None,
) -> PageSnapshot:
    """The page's view of the daemon, from the spool, `current.json`, history and sidecars.

    `current`: what `current.json` says, given by the daemon itself (its ledger's view),
    which then need not read back the file it wrote; read from the file when None."""
    if current is None:
        current = read_current(spool.state)
    state, reason = daemon_state(current)
    claims = spool.claims()
    running: InProgress | None = None
    if state in ("running", "waiting") and claims and current.get("story") == claims[0].name:
        running = _in_progress(claims[0], current)
        claims = claims[1:]
    queue = []
    for i, claim in enumerate(claims):
        # Titles of the first few only: the page is written during a story, and the queue may
        # hold thousands (those further back show their name and the spool's scene count).
        title, scenes = _story_facts(claim.input) if i < TITLES_READ else ("", claim.scenes or 0)
        queue.append(Queued(claim.name, title, scenes, _parse_time(claim.claimed)))
    results = [r for line in reversed(spool.history(history)) if (r := _result(outbox, line))]
    return PageSnapshot(
        time=now or datetime.now(UTC).astimezone(),
        state=state,
        reason=reason,
        current=running,
        queue=tuple(queue),
        results=tuple(results),
    )

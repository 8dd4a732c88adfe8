"""The page's view of a snapshot (daemon/report/snapshot.py): what the page and the metrics show.

Besides the snapshot it reads a few small files for people: the titles of the first queued
stories, the story in progress's finished images, each recent ending's sidecar. That is why
the page is written at most once every few seconds.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from daemon.queue.claim import Claim
from daemon.queue.sidecar import last_status
from daemon.report.page import InProgress, PageSnapshot, Queued, Result, SceneThumb
from daemon.report.snapshot import Snapshot
from pipeline.render import WorkFolder

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


def _in_progress(claim: Claim, current: dict[str, Any]) -> InProgress:
    title, scenes = _story_facts(claim.input)
    finished = [SceneThumb(number, png) for number, png in WorkFolder(claim.work).finished_images()]
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


def page_view(snapshot: Snapshot, outbox: Path | None) -> PageSnapshot:
    """The page's view of the daemon: its state, the story in progress, the queue, the recent results.

    The results read each ending's sidecar on the outbox (a share: on its lane); `outbox` None
    leaves them out (what the metrics need reads only the state folder)."""
    current = snapshot.current
    state, reason = snapshot.state()
    claims = list(snapshot.claims)
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
    results = (
        [] if outbox is None else [r for line in reversed(snapshot.history) if (r := _result(outbox, line))]
    )
    return PageSnapshot(
        time=snapshot.time,
        state=state,
        reason=reason,
        current=running,
        queue=tuple(queue),
        results=tuple(results),
    )

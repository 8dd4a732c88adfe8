"""`storyreel status`: the daemon, its queue with positions and estimated starts, notices and
recent results, in words, from one snapshot (daemon/report/snapshot.py)."""

from __future__ import annotations

import statistics
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from daemon.queue.claim import Claim, queue_folder, read_claims
from daemon.queue.controls import as_source, box_pause, pause_text
from daemon.queue.notices import recent_notices
from daemon.queue.states import State
from daemon.report.snapshot import Snapshot, read_snapshot


def _fmt_seconds(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f}s"
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def _fmt_eta(seconds: float | None) -> str:
    return "ETA unknown" if seconds is None else f"ETA {_fmt_seconds(seconds)}"


def pace(history: list[dict[str, Any]], last: int = 10) -> float | None:
    """Seconds per scene: the median over the last stories made (robust to one odd story)."""
    paces = [h["pace"] for h in history if h.get("state") == State.DONE and h.get("pace")][-last:]
    return statistics.median(paces) if paces else None


def estimated_starts(
    claims: list[Claim], current: dict[str, Any] | None, per_scene: float | None
) -> dict[int, float | None]:
    """Seconds from now until each queued claim starts: what runs before it, at the recent pace.

    The story in progress counts with its own ETA (or its remaining scenes); a claim
    whose scene count is not known yet makes every start after it unknown.
    """
    ahead: float | None = 0.0
    running = current.get("seq") if current and current.get("story") else None
    out: dict[int, float | None] = {}
    for c in claims:
        if c.seq == running:
            assert current is not None
            eta = current.get("eta_seconds")
            if eta is None and per_scene is not None and current.get("scenes"):
                eta = (int(current["scenes"]) - int(current.get("scene") or 1) + 1) * per_scene
            ahead = None if eta is None or ahead is None else ahead + float(eta)
            continue
        if c.ending is not None:
            continue  # only its status line and history are left to write
        out[c.seq] = ahead
        if ahead is not None and per_scene is not None and c.scenes is not None:
            ahead += c.scenes * per_scene
        else:
            ahead = None
    return out


def _when(seconds: float | None, paused: bool, waiting: bool) -> str:
    if paused:
        return "starts once resumed"
    if waiting:
        return "starts once the wait is over"
    if seconds is None:
        return "start unknown (no pace yet)"
    at = datetime.fromtimestamp(time.time() + seconds).astimezone()
    return f"starts ~{at:%H:%M:%S} (in {_fmt_seconds(seconds)})"


def _daemon_lines(current: dict[str, Any] | None) -> list[str]:
    if current is None:
        return ["daemon: not running"]
    activity = current.get("activity", "idle")
    if current.get("waiting"):
        activity = f"waiting: {current['waiting']}"
        if current.get("retry_in_seconds") is not None:
            activity += f" (next try within {_fmt_seconds(current['retry_in_seconds'])})"
    lines = [f"daemon: running (pid {current['pid']}), {activity}"]
    if current.get("paused"):
        lines.append(f"paused: {pause_text(current['paused'])}")
    if current.get("story"):
        scene = (
            f"scene {current.get('scene')}/{current.get('scenes')}, {_fmt_eta(current.get('eta_seconds'))}"
        )
        lines.append(f"current: {current['story']} (#{current.get('seq')}) {scene}")
    held = current.get("held")
    for name, reason in held.items() if isinstance(held, dict) else ():
        lines.append(f"held: {name}, retried with back-off ({reason})")
    return lines


def worker_lines(current: dict[str, Any] | None, claims: dict[str, Claim]) -> list[str]:
    """The image workers (`[workers]`): node, device, state, the scene in hand, images, last error."""
    rows = (current or {}).get("workers")
    if not isinstance(rows, list) or not rows:
        return []
    lines = [f"workers: {len(rows)}"]
    for w in rows:
        claim = claims.get(str(w.get("claim")))
        doing = ""
        if w.get("scene") is not None:
            story = f"{claim.name} (#{claim.seq})" if claim else f"claim {w.get('claim')}"
            doing = f" {story} scene {w.get('scene')}"
        pid = f" pid {w['pid']}" if w.get("pid") else ""
        error = f"; last error: {w['last_error']}" if w.get("last_error") else ""
        lines.append(
            f"  {w.get('id')}  {w.get('node')}{pid}  {w.get('device')}  {w.get('state')}{doing}, "
            f"{w.get('images', 0)} images{error}"
        )
    return lines


def _claim_state(c: Claim, current: dict[str, Any] | None) -> str:
    if c.ending is not None:
        return f"ending {c.ending.get('state')} (its status line is still to be written)"
    if current and current.get("story") and current.get("seq") == c.seq:
        return (
            f"{current.get('activity', 'processing')}, scene {current.get('scene')}/{current.get('scenes')}"
        )
    return "paused" if c.paused else "queued"


def status_report(state: Path, history: int = 10) -> str:
    """`storyreel status` for the state folder `state`, read from disk as a command does."""
    snapshot = read_snapshot(state, read_claims(queue_folder(state)), max(history, 50))
    return describe(snapshot, state, history)


def describe(snapshot: Snapshot, state: Path, history: int = 10) -> str:
    """The human-readable report of `storyreel status`: daemon, queue with positions and
    estimated starts, notices, recent results. `snapshot` holds at least the last 50 endings
    (the pace); the last `history` are listed."""
    if not queue_folder(state).is_dir():
        return "\n".join([f"daemon: never run with state {state}", *_stopped_lines(snapshot, state)])
    current = snapshot.live
    lines = _daemon_lines(current)
    if current is None:
        lines += _stopped_lines(snapshot, state)
    claims = list(snapshot.claims)
    lines += worker_lines(current, {c.tag: c for c in claims})
    recent = list(snapshot.history)
    per_scene = pace(recent)
    paused = bool(current and current.get("paused")) or (current is None and box_pause(state) is not None)
    n = len(claims)
    speed = f"pace {per_scene:.1f} s per scene" if per_scene else "no pace yet"
    lines.append(f"queue: {n} stor{'y' if n == 1 else 'ies'} ({speed})")
    starts = estimated_starts(claims, current, per_scene)
    waiting = bool(current and current.get("waiting"))
    position = 0
    for c in claims:
        what = _claim_state(c, current)
        if c.seq not in starts:  # running, or only its ending left to write
            lines.append(f"  {'end' if c.ending else 'now'}  #{c.seq:<6} {c.name:<32} {what}")
            continue
        position += 1
        scenes = f", {c.scenes} scene{'s' if c.scenes != 1 else ''}" if c.scenes is not None else ""
        when = _when(starts[c.seq], paused, waiting)
        if current is None and not paused:
            when = "starts when the daemon runs"
        lines.append(f"  {position:>3}. #{c.seq:<6} {c.name:<32} {what}{scenes}, {when}")
    notices = recent_notices(state)
    if notices:
        lines.append("notices:")
        lines += [f"  {x.get('time')}  {x.get('notice')}" for x in notices]
    shown = recent[-history:]
    lines.append(f"recent: {len(shown)}")
    for h in reversed(shown):
        err = f" — {h['error']}" if h.get("error") else ""
        lines.append(
            f"  #{h.get('seq', '?'):<6} {h.get('story', '?'):<40} {h.get('state')}  {h.get('time')}{err}"
        )
    return "\n".join(lines)


def _stopped_lines(snapshot: Snapshot, state: Path) -> list[str]:
    """What a stopped daemon left said: a pause that will hold at the next start, a story it interrupted."""
    lines = []
    pause = box_pause(state)
    if pause is not None:
        lines.append(f"paused: {pause_text([as_source(pause)])} (holds when the daemon starts)")
    if snapshot.current.get("interrupted"):
        lines.append(f"interrupted: {snapshot.current['interrupted']}")
    return lines

"""`storyreel status | pause | resume | cancel | retry`: the daemon's state read, requests left for it.

Each checks what it can against the daemon's state first (an unknown NAME, a story that already
ended) and says so in one line with exit 1; otherwise it leaves its request in the state folder
(daemon/queue/controls.py), rings the doorbell and returns. A state folder this user may not
read gets advice on which group to join (exit 2).
"""

from __future__ import annotations

import sys
from pathlib import Path

from daemon.commands.usage import UsageError, permission_hint
from daemon.queue.claim import queue_folder, read_claims
from daemon.queue.controls import pause_from_box, pause_text, pending, refusal, resume_from_box, submit
from daemon.queue.current import read_current, running
from daemon.queue.history import HISTORY, read_history
from daemon.report.status import status_report
from pipeline.names import sanitize_name
from pipeline.settings import Settings


def status(settings: Settings) -> int:
    state = settings.paths.state
    try:
        report = status_report(state, settings.daemon.history)
    except PermissionError as err:
        raise UsageError(permission_hint(Path(err.filename or state))) from None
    print(report)
    return 0


def pause(settings: Settings, who: str) -> int:
    state = settings.paths.state
    try:
        existing = pause_from_box(state, who)
        alive = running(read_current(state))
    except PermissionError as err:
        raise UsageError(permission_hint(Path(err.filename or state))) from None
    if existing is not None:
        print(f"already paused {pause_text([existing])}")
    else:
        print("paused: the scene in progress finishes, then nothing new starts (storyreel resume goes on)")
    if not alive:
        print("the daemon is not running: it starts paused")
    return 0


def resume(settings: Settings) -> int:
    """Lifts the box's pause. An inbox/PAUSE is someone else's to remove: exit 1 while it holds."""
    state = settings.paths.state
    try:
        lifted = resume_from_box(state)
        current = read_current(state)
    except PermissionError as err:
        raise UsageError(permission_hint(Path(err.filename or state))) from None
    paused = current.get("paused") if running(current) else None
    share = [p for p in paused or [] if str(p.get("by", "")).startswith("inbox/")]
    if share:
        held = share[0]
        print(
            f"storyreel resume: still paused by {held['by']} (since {held.get('since')}); "
            "remove that file from the share to go on",
            file=sys.stderr,
        )
        return 1
    print("resumed" if lifted else "not paused")
    return 0


def control(settings: Settings, action: str, name: str, who: str) -> int:
    """cancel NAME / retry NAME: checked against the spool here, carried out by the daemon."""
    state = settings.paths.state
    try:
        claims = {c.name: c for c in read_claims(queue_folder(state))}
        ended = {h["story"]: h for h in read_history(state / HISTORY) if "story" in h}
        current = read_current(state)
        alive = running(current)
        if name not in claims and name not in ended:
            name = sanitize_name(name, settings.limits.max_name_chars)  # as a dropped NAME.json is called
        claim = claims.get(name)
        in_progress = claim is not None and alive and current.get("seq") == claim.seq
        problem = refusal(action, name, claim, ended.get(name), in_progress)
        if problem is not None:
            print(f"storyreel {action}: {problem}", file=sys.stderr)
            return 1
        if pending(state, action, name):
            print(f"{name}: a {action} is already requested and waiting for the daemon")
            return 0
        submit(state, action, name, who)
    except PermissionError as err:
        raise UsageError(permission_hint(Path(err.filename or state))) from None
    if action == "cancel":
        what = (
            "it stops after the scene in progress, then ends cancelled"
            if in_progress
            else "it ends cancelled"
        )
    else:
        what = "it re-enters the queue at its end"
    later = "" if alive else " once the daemon starts (it is not running)"
    print(f"{name}: {action} requested; {what}{later}")
    return 0

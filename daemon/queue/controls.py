"""Operators' controls: pause/resume, cancel, retry, from the box and from the share.

From the box, `storyreel pause|resume|cancel|retry` writes into the state folder,
rings the doorbell and returns; a request made while the daemon is down waits for it:

    state/pause.json                      present while paused from the box: {"by", "since"}
    state/control/<ns>-<pid>.<action>.json one request {"action", "name", "by", "time"}, tmp+rename
    state/doorbell                        a FIFO the daemon listens on: one byte wakes its loop,
                                          which then reads the files above (the files are the
                                          request; the byte only says "look now", and is lost
                                          harmlessly when nobody listens)

From the share, files in the inbox (which names count: `daemon.inbox.scan.control_of`):

    inbox/PAUSE                           paused while it exists
    inbox/NAME.cancel, inbox/NAME.retry   one request each, removed once acted on

The daemon reads both on every loop turn and while a story renders; an idle daemon
sleeps until the doorbell, a watch event on the inbox or its next rescan wakes it. Whether a
request can be carried out is decided by `refusal`, the same rule for the command
(which says it and exits 1) and for the daemon (a log line and a notice in status).
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from daemon.inbox.scan import Candidate, control_of
from daemon.queue.claim import Claim
from daemon.queue.states import State
from daemon.system.jsonl import now_iso
from pipeline.fsutil import atomic_write_json, fsync_dir

PAUSE_FILE = "pause.json"
CONTROL_DIR = "control"
DOORBELL = "doorbell"
SHARE_PAUSE = "inbox/PAUSE"


@dataclass(frozen=True)
class Request:
    """One cancel or retry, from the box or the share."""

    action: str  # "cancel" | "retry"
    name: str
    by: str  # who asked, for people: "ana@studio (storyreel cancel)", "inbox/NAME.cancel"
    id: str  # tells this request apart from any other, also after a restart
    path: Path  # removed once the request is acted on
    share: bool

    def consume(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        if not self.share:
            with contextlib.suppress(OSError):
                fsync_dir(self.path.parent)


def refusal(
    action: str, name: str, claim: Claim | None, ended: Mapping[str, Any] | None, running: bool
) -> str | None:
    """Why `action` cannot be done to NAME, in one line; None when it can."""
    if action == "cancel":
        if claim is not None:
            if claim.ending is not None:  # only its last records are left to write
                return f"{name} already ended {claim.ending.get('state')}; nothing to cancel"
            return None
        if ended is not None:
            return f"{name} already ended {ended.get('state')} at {ended.get('time')}; nothing to cancel"
        return f"no story named {name!r} is queued, running or ended; `storyreel status` lists them"
    if claim is not None and claim.ending is not None and claim.ending.get("state") != State.DONE:
        return f"{name} is still ending ({claim.ending.get('state')}); retry it once it has"
    if claim is not None and claim.ending is None:
        return f"{name} is {'running' if running else 'queued'}; nothing to retry"
    if claim is not None:  # done, its last records still being written
        return f"{name} is done; drop the file again to redo it"
    if ended is None:
        return f"no story named {name!r} ever ended here; `storyreel status` lists recent ones"
    state = State(ended.get("state", "failed"))
    if state is State.DONE:
        return f"{name} is done; drop the file again to redo it"
    if state is State.EXPIRED:
        return f"{name} expired (its outputs were removed); drop the file again to redo it"
    if ended.get("refused"):
        return f"{name} was refused unread ({ended.get('error')}); drop the file itself again"
    kept = ended.get("kept")
    if not kept or not Path(kept).is_file():
        return f"{name}: its kept input {kept} is gone; drop the file again to redo it"
    return None


# -- the box side: what the commands write ------------------------------------------------


def pause_from_box(state: Path, by: str) -> dict[str, str] | None:
    """Pause (a file that survives restarts); returns the pause already in place, if any."""
    existing = box_pause(state)
    if existing is not None:
        return existing
    state.mkdir(parents=True, exist_ok=True)
    atomic_write_json(state / PAUSE_FILE, {"by": by, "since": now_iso()})
    ring(state)
    return None


def resume_from_box(state: Path) -> dict[str, str] | None:
    """Lift the box's pause; returns it, or None if there was none."""
    existing = box_pause(state)
    with contextlib.suppress(FileNotFoundError):
        (state / PAUSE_FILE).unlink()
        ring(state)
    return existing


def box_pause(state: Path) -> dict[str, str] | None:
    try:
        value: dict[str, str] = json.loads((state / PAUSE_FILE).read_text("utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"by": "storyreel pause", "since": "?"}  # unreadable still means paused
    return value


def submit(state: Path, action: str, name: str, by: str) -> Path:
    """Drop one request where the daemon looks for it: written aside, then renamed in."""
    folder = state / CONTROL_DIR
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{time.time_ns()}-{os.getpid()}.{action}.json"
    atomic_write_json(final, {"action": action, "name": name, "by": by, "time": now_iso()})
    ring(state)
    return final


def ring(state: Path) -> None:
    """Wake a running daemon: one byte into its doorbell. No daemon listening (ENXIO), no
    doorbell, a full one (a wake-up is pending anyway): nothing to do, the request waits."""
    try:
        fd = os.open(state / DOORBELL, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return
    try:
        if stat.S_ISFIFO(os.fstat(fd).st_mode):  # never write into anything else of that name
            os.write(fd, b"!")
    except OSError:
        pass
    finally:
        os.close(fd)


def open_doorbell(state: Path) -> int:
    """The daemon's end of the doorbell (made if missing): a non-blocking fd to sleep on.

    Opened read-write, so the daemon is always a writer too: the FIFO never reads as
    closed (EOF) between two commands, and a command's open never blocks or fails."""
    path = state / DOORBELL
    try:
        os.mkfifo(path, 0o666)  # the umask applies, as to the request files
    except FileExistsError:
        if not stat.S_ISFIFO(os.lstat(path).st_mode):
            path.unlink()
            os.mkfifo(path, 0o666)
    return os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)


def pending(state: Path, action: str, name: str) -> bool:
    """Whether a request for `action` on NAME is already waiting for the daemon."""
    return any(r.action == action and r.name == name for r in box_requests(state))


# -- the daemon side: what it reads each turn ----------------------------------------------


def box_requests(state: Path) -> list[Request]:
    """Requests from the commands, oldest first. A file that cannot be read is skipped
    (and left for people to look at); one being written is under a hidden name."""
    folder = state / CONTROL_DIR
    try:
        names = sorted(
            e.name for e in os.scandir(folder) if not e.name.startswith(".") and e.name.endswith(".json")
        )
    except FileNotFoundError:
        return []
    out = []
    for entry in names:
        path = folder / entry
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            req = json.loads(path.read_text("utf-8"))
            if req["action"] in ("cancel", "retry"):
                by = f"{req.get('by', '?')} (storyreel {req['action']})"
                out.append(Request(req["action"], str(req["name"]), by, f"box:{entry}", path, share=False))
    return out


def share_requests(controls: Mapping[str, Candidate]) -> list[Request]:
    """NAME.cancel and NAME.retry files seen in the inbox, oldest first. The id names the
    file's identity too, so the same name dropped again later is a new request."""
    out = []
    for cand in sorted(controls.values(), key=lambda c: (c.mtime_ns, c.name)):
        found = control_of(cand.name)
        if found is None or found[0] == "pause":
            continue
        action, name = found
        ident = f"share:{cand.name}@{cand.inode[1]}:{cand.mtime_ns}"
        out.append(Request(action, name, f"inbox/{cand.name}", ident, cand.path, share=True))
    return out


def pause_text(sources: list[dict[str, Any]]) -> str:
    """Who holds the queue paused, in words: "by ana@studio (storyreel pause) since …; by inbox/PAUSE …"."""
    return "; ".join(f"by {p.get('by')} since {p.get('since')}" for p in sources)


def as_source(box: Mapping[str, str]) -> dict[str, str]:
    """The box's pause.json as people see it."""
    return {"by": f"{box.get('by')} (storyreel pause)", "since": str(box.get("since"))}


def pause_sources(state: Path, controls: Mapping[str, Candidate]) -> list[dict[str, str]]:
    """Who holds the queue paused, and since when: the box's pause.json, the share's PAUSE."""
    box = box_pause(state)
    sources = [] if box is None else [as_source(box)]
    for cand in controls.values():
        found = control_of(cand.name)
        if found is not None and found[0] == "pause":
            since = datetime.fromtimestamp(cand.mtime_ns / 1e9, UTC).isoformat(timespec="seconds")
            sources.append({"by": f"inbox/{cand.name}", "since": since})
    return sources

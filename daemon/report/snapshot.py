"""The daemon at one moment, read once from its local truth: what every report shows.

Nothing here is a second record of anything: the queue is the spool's claims, the story in
progress and the daemon's activity are `state/current.json` (or, inside the daemon, its own
view of it), the endings are `state/history.jsonl`. The status page (overview.py, page.py),
the metrics and `storyreel status` (status.py) are each rendered from one `Snapshot`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from daemon.queue.claim import Claim
from daemon.queue.controls import pause_text
from daemon.queue.current import read_current, running
from daemon.queue.history import HISTORY, read_history

DaemonState = Literal["running", "idle", "paused", "waiting", "stopped"]


@dataclass(frozen=True)
class Snapshot:
    time: datetime  # when this was true
    current: dict[str, Any]  # what the daemon last said ({} if it never ran); see `alive`
    alive: bool  # the daemon that said it is running
    claims: tuple[Claim, ...]  # the queue, in the order stories run
    history: tuple[dict[str, Any], ...]  # the last endings, oldest first

    @property
    def live(self) -> dict[str, Any] | None:
        """What a running daemon says it is doing; None when none is running."""
        return self.current if self.alive else None

    def state(self) -> tuple[DaemonState, str]:
        """(state, reason) from the daemon's activity: what the page and the metrics show."""
        current = self.current
        activity = str(current.get("activity", ""))
        if activity == "stopped" or not self.alive:
            return "stopped", ""
        if activity == "processing":
            return "running", ""
        if activity == "paused":
            return "paused", str(current.get("reason") or pause_text(current.get("paused") or []))
        if activity == "waiting":
            return "waiting", str(current.get("waiting") or "")  # daemon/queue/activity.py keeps the reason
        return "idle", ""


def read_snapshot(
    state: Path,
    claims: Sequence[Claim],
    history: int,
    *,
    current: dict[str, Any] | None = None,
    now: datetime | None = None,
) -> Snapshot:
    """One look at the daemon: `claims` as the caller holds them (the spool in the daemon, read
    from disk by a command), the last `history` endings, and `current`, given by the daemon
    itself (its own view, which it then need not read back), else read from `current.json`."""
    if current is None:
        current = read_current(state)
    return Snapshot(
        time=now or datetime.now(UTC).astimezone(),
        current=current,
        alive=running(current),
        claims=tuple(claims),
        history=tuple(read_history(state / HISTORY, history)),
    )

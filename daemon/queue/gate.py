"""What holds the queue: a share gone, a back-off while the world is broken, an ending pending.

Nothing new starts while the inbox or outbox is not the folder (mount) it was at start, while
the last failure's back-off runs, while an ending interrupted by a full or vanished outbox is
still to be finished, while paused, or while stopping (`held_by`, a pure rule). A wait is said
once per try, with the reason, in the log, current.json and the story's sidecar.

A share that does not answer (daemon/system/share.py) is a wait of its own (`check_shares`, every
turn, also while a story renders): said at once, with the reason, in current.json and STATUS=,
and in the sidecar of the story in progress (a line owed until the share answers); nothing is
held up by it that does not need the share: the story goes on, its publishing waits.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import structlog

from daemon.inbox.folders import FolderGuard
from daemon.queue.claim import Claim
from daemon.queue.ledger import Ledger
from daemon.queue.spool import Spool
from daemon.queue.states import State
from daemon.system.backoff import Backoff
from daemon.system.share import Shares
from pipeline.settings import DaemonSettings

log = structlog.get_logger("storyreel")


def held_by(
    *, stopping: bool, paused: bool, ending_pending: bool, backing_off: bool, outbox_gone: bool
) -> str | None:
    """Why no story may start now, in a word; None when the next one may."""
    if stopping:
        return "stopping"
    if paused:
        return "paused"
    if ending_pending:
        return "an ending is pending"
    if backing_off:
        return "backing off"
    if outbox_gone:
        return "the outbox is gone"  # never publish onto a bare mount point
    return None


class Gate:
    def __init__(
        self,
        ledger: Ledger,
        settings: DaemonSettings,
        folders: FolderGuard | None = None,
        clock: Callable[[], float] = time.monotonic,
        shares: Shares | None = None,
    ) -> None:
        """`folders`: the inbox and outbox as they were at start (the loop sets it then)."""
        self.ledger = ledger
        self.folders = folders or FolderGuard({})
        self.shares = shares or Shares({})
        self.problems: dict[str, str] = {}  # what is wrong with the inbox or outbox, by key
        self.not_answering: dict[str, str] = {}  # which shares do not answer, and why, by key
        self.backoff = Backoff(settings.retry_min_seconds, settings.retry_max_seconds, clock)

    @property
    def outbox_ok(self) -> bool:
        """Claims, endings, controls and the page write there: nothing while it is gone."""
        return "outbox" not in self.problems

    def next_claim(self, spool: Spool, *, stopping: bool, paused: bool) -> Claim | None:
        """The claim to run now, if any: the oldest, unless something holds the queue."""
        reason = held_by(
            stopping=stopping,
            paused=paused,
            ending_pending=bool(spool.endings()),
            backing_off=not self.backoff.due(),
            outbox_gone=not self.outbox_ok,
        )
        return spool.head() if reason is None else None

    def check_folders(self) -> None:
        """Inbox and outbox still the folders from start? If not: waiting, and nothing written there."""
        was, self.problems = self.problems, self.folders.problems()
        if self.problems and self.backoff.due():
            self.wait(None, "; ".join(self.problems.values()))
        elif was and not self.problems:
            log.info("folders back", was="; ".join(was.values()))
            self.backoff.retry_now()

    def wait(self, claim: Claim | None, reason: str, scene: int = 0, scenes: int = 0) -> float:
        """Not the story's fault: wait with back-off, said in the log, current.json and the
        story's sidecar (unless its ending is under way, or the outbox itself is what is gone)."""
        delay = self.backoff.failed()
        log.warning("waiting", story=claim.name if claim else None, reason=reason, retry_in=delay)
        self.ledger.activity.waiting(reason, delay)
        if claim is not None and claim.ending is None and "outbox" not in self.problems:
            with contextlib.suppress(OSError):
                self.ledger.move(
                    claim, State.WAITING, scene, scenes, error=reason, retry_in_seconds=round(delay, 1)
                )
        return delay

    def check_shares(self, running: Claim | None, scene: int = 0, scenes: int = 0) -> None:
        """Every turn: a share that stopped answering is said at once (and its end), with the
        story in progress (`running`, at `scene` of `scenes`) told in its sidecar. No I/O."""
        was, self.not_answering = self.not_answering, self.shares.reasons()
        story = running if running is not None and running.ending is None else None
        if self.not_answering:
            reason = "; ".join(self.not_answering.values())
            if self.ledger.activity.view.get("waiting") != reason:
                self.ledger.activity.waiting(reason, None)
            if not was:
                log.warning("waiting", story=story.name if story else None, reason=reason)
                if story is not None:
                    with contextlib.suppress(OSError):  # owed until the share answers
                        self.ledger.move(story, State.WAITING, scene, scenes, error=reason)
        elif was:
            log.info("shares answering again", was="; ".join(was.values()))
            self.ledger.activity.recovered()
            if story is not None and scene:
                with contextlib.suppress(OSError):  # the sidecar's last line says what is true again
                    self.ledger.move(story, State.PROCESSING, scene, scenes)

    def recovered(self) -> None:
        self.backoff.reset()
        self.ledger.activity.recovered()

"""Steering: pause, cancel and retry applied to the queue, from the box and from the share.

Read on every loop turn, also between the scenes and denoising steps of the story in progress:
who holds the queue paused (every queued story's sidecar says "paused" once per pause, and
"queued" again after it, written in budgeted slices), and each cancel or retry request, decided
by `decide` (a pure rule, with `daemon.queue.controls.refusal` for what cannot be done) and
consumed once its effect is recorded. The story in progress is known here (`running`): a cancel
of it is carried out after its scene in progress, by the recorder (daemon/run/recorder.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import structlog

from daemon.inbox.watch import InboxWatcher
from daemon.queue import controls
from daemon.queue.claim import Claim
from daemon.queue.controls import Request
from daemon.queue.ledger import Ledger
from daemon.queue.notices import append_notice
from daemon.queue.spool import Spool
from daemon.queue.states import State
from daemon.system.share import NotAnswering, Shares
from pipeline.names import name_of_drop, sanitize_name
from pipeline.settings import Settings

log = structlog.get_logger("storyreel")

Action = Literal["consume", "wait", "refuse", "cancel running", "cancel", "retry"]


@dataclass(frozen=True)
class Decision:
    action: Action
    problem: str | None = None  # for "refuse": why, in one line


def decide(
    req: Request,
    name: str,
    claim: Claim | None,
    ended: dict[str, Any] | None,
    *,
    running: bool,
    cancel_asked: bool,
    arriving: Callable[[], bool],
) -> Decision:
    """What to do with one request for NAME: its claim (queued or running), its last ending, whether
    it is the story in progress and a cancel of it is asked already, and whether NAME.json is
    still arriving in the inbox (asked only when that matters: it reads the inbox's listing)."""
    if (claim is not None and claim.request == req.id) or (
        ended is not None and ended.get("request") == req.id
    ):
        return Decision("consume")  # carried out before a crash took the process before this
    if (
        claim is not None
        and claim.ending is not None
        and claim.ending.get("record", {}).get("request") == req.id
    ):
        return Decision("wait")  # under way; consumed once the ending is through
    if running and cancel_asked:
        return Decision("wait")  # already asked; the story stops after its scene in progress
    problem = controls.refusal(req.action, name, claim, ended, running=running)
    if problem is not None:
        if req.share and claim is None and ended is None and arriving():
            return Decision("wait")  # NAME.json and NAME.cancel dropped together: not claimed yet
        return Decision("refuse", problem)
    if req.action == "cancel":
        return Decision("cancel running" if running else "cancel")
    return Decision("retry")


class Steering:
    def __init__(
        self,
        settings: Settings,
        spool: Spool,
        ledger: Ledger,
        validate: Callable[[Claim], None],
        shares: Shares | None = None,
    ) -> None:
        """`validate`: a story back in the queue is checked as a new claim is (daemon/queue/claiming.py).
        `shares`: the inbox's, on whose lane a share's request file is removed."""
        self.shares = shares or Shares({})
        self.settings = settings
        self.spool = spool
        self.ledger = ledger
        self.validate = validate
        self.pause: list[dict[str, str]] = []  # who holds the queue paused (empty: not paused)
        self.running: Claim | None = None  # the story being made
        self.cancel_running: Request | None = None  # asked to cancel it after the scene in progress
        self.lines_owed = False  # some claim's last line does not say it is paused/queued yet
        self._acted: set[str] = set()  # share requests acted on, until their file is gone from a look
        self._left: set[str] = set()  # ... whose file could not be removed yet (the share did not answer)

    @property
    def paused(self) -> bool:
        return bool(self.pause)

    def holds(self) -> bool:
        """Nothing new may start: paused, or the story in progress is to be cancelled."""
        return bool(self.pause) or self.cancel_running is not None

    # -- the story in progress ---------------------------------------------------------
    def story_started(self, claim: Claim) -> None:
        self.running, self.cancel_running = claim, None

    def story_over(self) -> None:
        """A cancel that came too late is refused on the next turn."""
        self.running = self.cancel_running = None

    def take_cancel(self) -> Request | None:
        req, self.cancel_running = self.cancel_running, None
        return req

    def claimed(self) -> None:
        """New claims: each owes a "paused" line while the queue is paused."""
        self.lines_owed |= self.paused

    # -- each turn -----------------------------------------------------------------------
    def read(self, watcher: InboxWatcher, budget: float) -> bool:
        """Apply the pause and every request; True when pause lines are left for the next turn."""
        sources = controls.pause_sources(self.settings.paths.state, watcher.controls)
        if sources != self.pause:
            if bool(sources) != bool(self.pause):
                log.info("paused" if sources else "resumed", by=[s["by"] for s in sources] or None)
                self.lines_owed = True
            self.pause = sources
            self.ledger.activity.paused(sources)
        share = controls.share_requests(watcher.controls)
        self._acted &= {r.id for r in share}  # a file gone from the listing cannot come back as itself
        self._left &= {r.id for r in share}
        for req in controls.box_requests(self.settings.paths.state) + share:
            if req.id in self._acted:
                inbox = self.shares.get("inbox")
                if req.id in self._left and (inbox is None or inbox.answering):
                    self.consume(req)
                continue
            try:
                self._act(req, watcher)
            except OSError as err:  # the effect could not be written: the request stays for a later turn
                log.warning("control not carried out yet", request=req.by, story=req.name, error=str(err))
            except Exception as err:  # a bug must not stop the queue: say so, drop the request
                log.exception("control failed", request=req.by, story=req.name)
                self.notice(f"{req.by}: could not be carried out ({err}); see the log")
                self.consume(req)
        return self._write_pause_lines(budget) if self.lines_owed else False

    def _act(self, req: Request, watcher: InboxWatcher) -> None:
        """Carry out one cancel or retry; the request is consumed once its effect is recorded."""
        name = self._story_name(req)
        claim, ended = self.spool.queued(name), self.spool.last_ended(name)
        running = claim is not None and claim is self.running
        decision = decide(
            req,
            name,
            claim,
            ended,
            running=running,
            cancel_asked=self.cancel_running is not None,
            arriving=lambda: self._still_arriving(watcher, name),
        )
        if decision.action == "wait":
            return
        if decision.action == "refuse":
            log.warning("control refused", request=req.by, story=name, reason=decision.problem)
            self.notice(f"{req.by}: {decision.problem}")
        elif decision.action == "cancel running":
            self.cancel_running = req
            log.info("cancel requested, stopping after the scene in progress", story=name, by=req.by)
            return
        elif decision.action == "cancel":
            assert claim is not None
            log.info("cancelling", story=name, seq=claim.seq, by=req.by)
            by, record = req.by, {"request": req.id}
            self.ledger.move(claim, State.CANCELLED, 0, claim.scenes or 0, by=by, record=record)
        elif decision.action == "retry":
            assert ended is not None
            claim = self.spool.requeue(dict(ended), req.id)
            log.info("retry: back in the queue", story=name, seq=claim.seq, by=req.by, was=ended.get("state"))
            self.validate(claim)
            self.claimed()
        self.consume(req)

    def _story_name(self, req: Request) -> str:
        """NAME as the request gives it, else as a dropped file of that name would be called."""
        if req.name in self.spool.names_in_use() or self.spool.last_ended(req.name) is not None:
            return req.name
        return sanitize_name(req.name, self.settings.limits.max_name_chars)

    def _still_arriving(self, watcher: InboxWatcher, name: str) -> bool:
        """Whether NAME.json is in the inbox, not claimed yet (a control dropped with its story)."""
        limit = self.settings.limits.max_name_chars
        return any(name_of_drop(n, limit) == name for n in watcher.entries)

    def consume(self, req: Request) -> None:
        """The request's file goes (a share's on the inbox's lane: one that does not answer now
        goes later, and the request is not acted on twice meanwhile)."""
        inbox = self.shares.get("inbox") if req.share else None
        self._left.discard(req.id)
        try:
            inbox.call(req.consume, f"removing {req.path.name}") if inbox is not None else req.consume()
        except NotAnswering as err:
            log.warning("control file not removed yet", request=req.by, error=str(err))
            self._left.add(req.id)  # removed on a later turn
        if req.share:
            self._acted.add(req.id)

    def notice(self, text: str) -> None:
        append_notice(self.settings.paths.state, text)

    def _write_pause_lines(self, budget: float) -> bool:
        """Every queued story's sidecar says "paused" once per pause, and "queued" again after it.
        True when the budget ran out first (the rest on the next turn)."""
        state, paused = (State.PAUSED, True) if self.pause else (State.QUEUED, False)
        deadline = time.monotonic() + budget
        for claim in self.spool.claims():
            if claim is self.running or claim.ending is not None or claim.paused == paused:
                continue
            if time.monotonic() > deadline:
                return True
            try:
                self.ledger.move(claim, state, 0, claim.scenes or 0)
            except OSError as err:
                log.warning("status not written", story=claim.name, error=str(err))
                return False  # owed still: tried again next turn
        self.lines_owed = False
        return False

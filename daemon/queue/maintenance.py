"""What piles up, dealt with between stories, never inside a scene.

    finish_endings   endings a full or vanished outbox (or a crash) interrupted, oldest first,
                     before anything new starts (also between scenes: quietly)
    retain           `[retention]` and history compaction, at most every RETENTION_SECONDS; what
                     goes from the outbox goes on its lane (daemon/system/share.py), never
                     waited for: its report is taken in on a later turn
    compact_history  at start: the history read whole at every start stays small

Queued and running stories are never touched.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field

import structlog

from daemon.queue import history, retention
from daemon.queue.gate import Gate
from daemon.queue.ledger import Ledger
from daemon.queue.sidecar import expire_line
from daemon.queue.spool import Spool
from daemon.system.errors import os_error_text
from pipeline.settings import Settings

log = structlog.get_logger("storyreel")

RETENTION_SECONDS = 600.0  # [retention] at most this often: on idle turns and after endings


@dataclass
class Maintenance:
    settings: Settings
    spool: Spool
    ledger: Ledger
    gate: Gate
    clock: Callable[[], float] = time.monotonic
    _retain_at: float = field(default=0.0, init=False)  # when [retention] may run next
    _retaining: Future[retention.Report] | None = field(default=None, init=False)  # on the outbox's lane

    def compact_history(self) -> None:
        keep = max(history.KEEP_LINES, self.settings.daemon.history)
        with contextlib.suppress(OSError):  # a full disk: compacted another time
            history.compact(self.spool.history_path, self.settings.paths.inbox, keep)

    def finish_endings(self, quiet: bool) -> None:
        """Finish endings a full or vanished outbox (or a crash) interrupted, oldest first.
        `quiet` while a story renders: it goes on, and the loop waits after it."""
        endings = self.spool.endings()
        if not endings or not self.gate.backoff.due() or "outbox" in self.gate.not_answering:
            return  # (not answering: its status lines wait; the gate says so)
        for claim in endings:
            try:
                self.ledger.finish_ending(claim)
            except OSError as err:
                reason = f"cannot finish the ending of {claim.name}: {os_error_text(err)}"
                if quiet:
                    log.warning("ending pending", story=claim.name, error=reason)
                else:
                    self.gate.wait(None, reason)
                return
        self.gate.recovered()

    def retain(self) -> None:
        """`[retention]` and history compaction, at most every RETENTION_SECONDS, while nothing is
        owed to the outbox (its lines, an ending) and it answers."""
        self._taken_in()
        now = self.clock()
        outbox = self.gate.shares.get("outbox")
        if now < self._retain_at or self.spool.endings() or not self.gate.outbox_ok or self._retaining:
            return
        if len(self.ledger.lines) or (outbox is not None and (outbox.busy or not outbox.answering)):
            return
        self._retain_at = now + RETENTION_SECONDS
        busy, path = frozenset(self.spool.names_in_use()), self.settings.paths.outbox

        def outbox_part() -> retention.Report:
            return retention.enforce_outbox(
                self.settings, busy, lambda name, why: expire_line(path, name, why)
            )

        report = retention.Report()
        try:
            if outbox is None:
                report = outbox_part()
            else:
                self._retaining = outbox.submit(outbox_part, "retention")
            retention.enforce_state(self.settings, report)
        except OSError as err:  # the outbox or state cannot be listed or written: next time
            log.warning("retention not applied", error=os_error_text(err))
            return
        self._said(report)

    def _taken_in(self) -> None:
        """The outbox's part of retention, once its lane is through with it."""
        fut = self._retaining
        if fut is None or not fut.done():
            return
        self._retaining = None
        try:
            report = fut.result()
        except OSError as err:
            log.warning("retention not applied", error=os_error_text(err))
            return
        except Exception:  # a bug there must not take the loop down
            log.exception("retention failed")
            return
        if report.expired:
            self.ledger.listener.changed()
        self._said(report)

    def _said(self, report: retention.Report) -> None:
        if report.expired or report.failed_inputs or report.history_lines_folded:
            log.info("retention applied", **asdict(report))

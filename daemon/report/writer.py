"""The report writer: the status page and the metrics textfile, written when something changed.

The ledger (daemon/queue/ledger.py) is the one place a story changes state; after each
change it tells `ReportWriter`, which only notes that something changed (and counts
what the metrics count). The loop calls `tick()` on every turn, and the page and the
metrics are written from one snapshot of the daemon (daemon/report/snapshot.py) when a
change is pending, at most once every `interval` seconds (`Throttle`); `flush()` at stop
writes the last state at once. So a burst of changes costs one write, and an idle daemon,
where nothing changes, writes nothing.

Both are output for people: a write that fails is logged, tried again after the
interval, and never stops a story. The page is not written while the outbox is
not the folder it was at start (`outbox_ok`): a share gone leaves a bare mount
point, where nothing may be written. The metrics file lives elsewhere and is
written then too: "waiting" is what the sysadmin's alert is about.

The page is read and written on the outbox's lane (daemon/system/share.py): one page at a
time, waited for (deadline-guarded) only when nothing else is under way there, so a share
that does not answer holds up the page and nothing else; the next page follows once it does.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import structlog

from daemon.queue.claim import Claim
from daemon.queue.states import State
from daemon.report.metrics import OUTCOMES, Metrics, cuda_peak_bytes
from daemon.report.overview import page_view
from daemon.report.page import clean_stale_temps, write_page
from daemon.report.snapshot import Snapshot, read_snapshot
from daemon.system.share import NotAnswering, Share

log = structlog.get_logger("storyreel")

INTERVAL_SECONDS = 3.0  # the page and the metrics: at most one write per this many seconds

Clock = Callable[[], float]


class Throttle:
    """At most one action per `interval` seconds; a request in between is kept, never dropped."""

    def __init__(self, interval: float, clock: Clock = time.monotonic) -> None:
        self.interval = interval
        self.clock = clock
        self.pending = False
        self._last: float | None = None

    def request(self) -> None:
        self.pending = True

    def due(self) -> bool:
        return self.pending and (self._last is None or self.clock() - self._last >= self.interval)

    def done(self) -> None:
        self.pending = False
        self._last = self.clock()

    def next_deadline(self) -> float | None:
        """When a pending request becomes due (clock time), for the caller's sleep; None if none."""
        if not self.pending:
            return None
        return self.clock() if self._last is None else self._last + self.interval


class ReportWriter:
    """The ledger's listener: `changed` on every change, `tick` each loop turn, `flush` at stop."""

    def __init__(
        self,
        outbox: Path,
        state: Path,
        claims: Callable[[], Sequence[Claim]],
        *,
        metrics: Metrics | None = None,
        history: int = 20,
        outbox_ok: Callable[[], bool] = lambda: True,
        check: Callable[[], None] = lambda: None,
        interval: float = INTERVAL_SECONDS,
        clock: Clock = time.monotonic,
        share: Share | None = None,
    ) -> None:
        """`claims`: the queue as the daemon holds it (the spool's, in memory). `share`: the
        outbox's, whose lane writes the page (its own, when none is given). `check`: raises
        unless the outbox is still the folder it was at start; run on the lane, just before the
        page is written, since `outbox_ok` may say what the last look saw, before a share went."""
        self.outbox = outbox
        self.state = state
        self.claims = claims
        self.metrics = metrics or Metrics("")
        self.history = history  # recent results on the page
        self.outbox_ok = outbox_ok
        self.check = check
        self.throttle = Throttle(interval, clock)
        self.view: dict[str, Any] = {}  # the ledger's view of the daemon (what current.json says)
        self.writes = 0  # pages written (a page unchanged since the last write is not rewritten)
        self._page_owed = False  # the outbox could not take the last page: written once it can
        self._started = False  # nothing is written before the counters are read (a failed start)
        self.share = share or Share("outbox", outbox)
        self._page: Future[bool] | None = None  # the page being written on the outbox's lane

    def started(self) -> None:
        """Counters from history (the spool's lock held), then a first page."""
        self.metrics.start(self.state)
        if self.outbox_ok():
            outbox = self.outbox

            def clean() -> None:
                try:
                    self.check()
                    clean_stale_temps(outbox)
                except OSError as err:  # never stops the daemon: the leftovers go at the next start
                    log.warning("page temporaries not cleaned", error=str(err))

            with contextlib.suppress(NotAnswering):
                self.share.submit(clean, "cleaning the page's leftovers")
        self._started = True
        self.throttle.request()

    # -- what the ledger tells ---------------------------------------------------------
    def changed(self, view: dict[str, Any] | None = None) -> None:
        if view is not None:
            self.view = dict(view)
        self.throttle.request()

    def story_ended(self, state: State, scenes: int) -> None:
        """Counted once per ending recorded in history (the counters' truth at the next start)."""
        if state.value in OUTCOMES:
            self.metrics.story_ended(state.value, scenes if state is State.DONE else 0)
        self.throttle.request()

    def scene_done(self, record: Mapping[str, Any]) -> None:
        """A finished scene's record (pipeline/render/records.py): its timings, its OOM retries."""
        timings = record.get("timings") or {}
        image, clip = timings.get("total"), timings.get("save_and_clip")
        self.metrics.scene_timed(
            float(image) if isinstance(image, int | float) else None,
            float(clip) if isinstance(clip, int | float) else None,
        )
        for _ in range(int((record.get("generation") or {}).get("oom_retries") or 0)):
            self.metrics.oom_retry()
        self.metrics.vram_peak(cuda_peak_bytes())
        self.throttle.request()

    # -- writing -----------------------------------------------------------------------
    def tick(self) -> None:
        self._collect()
        if self._page_owed and self.outbox_ok():
            self.throttle.request()  # the outbox is back: the page it missed
        if self.throttle.due():
            self.flush()

    def next_deadline(self) -> float | None:
        """When a pending write becomes due (monotonic clock), for the loop's sleep; None if none."""
        return self.throttle.next_deadline()

    def flush(self) -> None:
        """Write the page and the metrics now, if anything changed since the last write."""
        if not self.throttle.pending or not self._started:
            return
        self.throttle.done()
        try:
            current = {"pid": os.getpid(), **self.view}
            snapshot = read_snapshot(self.state, self.claims(), self.history, current=current)
            self.metrics.observe(page_view(snapshot, None))
        except Exception:  # a bug here must not reach the story in progress
            log.exception("status page and metrics not written")
            return
        self.metrics.write()  # logs its own failures
        if not self.outbox_ok():
            self._page_owed = True
            return
        self._write_page(snapshot)

    def _write_page(self, snapshot: Snapshot) -> None:
        """On the outbox's lane; waited for a moment (a page behind a long publish is not)."""
        self._collect()
        if self._page is not None:  # one page at a time: this change is in the next one
            self.throttle.request()
            return
        outbox, check = self.outbox, self.check

        def page() -> bool:
            check()  # FolderGone (an OSError): not written, owed, tried again after the interval
            return write_page(outbox, page_view(snapshot, outbox))

        try:
            self._page = self.share.submit(page, "the status page")
        except NotAnswering:
            self._page_owed = True
            return
        with contextlib.suppress(Exception):  # its own errors are taken in by _collect
            self.share.wait(self._page, patience=self.share.deadline)  # never behind a long publish
        if not self._page.done():  # the outbox is not answering: it is written once it does
            self._page_owed = True
        self._collect()

    def _collect(self) -> None:
        fut = self._page
        if fut is None or not fut.done():
            return
        self._page = None
        try:
            if fut.result():
                self.writes += 1
            self._page_owed = False
        except OSError as err:  # the share is full or gone: the page is output, the work goes on
            log.warning("status page not written", error=str(err))
            self._page_owed = True  # written once the outbox is back
            self.throttle.request()  # tried again after the interval
        except Exception:
            log.exception("status page not written")

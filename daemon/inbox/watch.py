"""Finding complete story files in the inbox: the watcher the loop polls.

Watch events are only hints that make us look sooner; a full scan of the inbox
is the truth, so nothing here depends on an event arriving: a lost event costs
at most one rescan interval. `InboxWatcher` decides *when* to look and puts the
parts together, the way watchdog splits emitter from dispatcher:

    scan.py        one look at the inbox, run on its own thread with a deadline
    settle.py      which files have settled (pure: no threads, times passed in)
    supervisor.py  the watchdog observer, kept alive, and the watch mode
    fstype.py      which filesystem holds the inbox (auto mode: polling on shares)

Threads: the watchdog observer and the one-shot scan thread report back through
a lock-protected flag and the caller's wake-up; everything else runs in the
caller's thread inside `poll_ready()`, timed with the injected monotonic clock
so tests can drive it.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import structlog

from daemon.inbox.fstype import Mode
from daemon.inbox.scan import Candidate, InboxScan, ScanInFlight
from daemon.inbox.settle import SettleTracker
from daemon.inbox.supervisor import ObserverSupervisor, WriterHints
from daemon.system.share import Share
from pipeline.settings import WatchSettings

log = structlog.get_logger("storyreel.watch")

Clock = Callable[[], float]
WakeTarget = threading.Event | Callable[[], None] | None


def _wake_callable(wake: WakeTarget) -> Callable[[], None]:
    if wake is None:
        return lambda: None
    if isinstance(wake, threading.Event):
        return wake.set
    return wake


def _describe_oserror(inbox: Path, err: OSError) -> str:
    code = errno.errorcode.get(err.errno or 0, "")
    reason = err.strerror or str(err)
    return f"inbox {inbox} unavailable: {reason}" + (f" ({code})" if code else "")


class InboxWatcher:
    """Offers each complete story file in the inbox once, in arrival order.

    Main-loop use (one thread calls poll_ready/next_deadline; the watcher only ever
    sets `wake`, the caller clears it):

        watcher = InboxWatcher(settings.paths.inbox, settings.watch, wake=wake)
        watcher.start()
        while running:
            for cand in watcher.poll_ready():
                ...claim (cand.kind tells non-regular entries apart)...
            timeout = watcher.seconds_until_next()
            wake.wait(timeout)
            wake.clear()
        watcher.stop()
    """

    def __init__(
        self,
        inbox: Path,
        settings: WatchSettings,
        *,
        clock: Clock = time.monotonic,
        wake: WakeTarget = None,
        debounce_seconds: float = 0.1,
        scan_timeout_seconds: float = 10.0,
        writer_hint_max_seconds: float | None = None,
        share: Share | None = None,
    ) -> None:
        """`share`: the inbox's (daemon/system/share.py), whose lane runs the scans."""
        self.inbox = Path(os.path.abspath(inbox))
        self._settings = settings
        self._clock = clock
        self._notify = _wake_callable(wake)
        self._debounce = debounce_seconds
        # A writer that still holds the file open after this long without a write
        # (or whose close event was lost in an overflow) stops blocking the file.
        hint_max = (
            writer_hint_max_seconds
            if writer_hint_max_seconds is not None
            else max(60.0, 10 * settings.settle_seconds)
        )
        self._hints = WriterHints(hint_max)
        self.supervisor = ObserverSupervisor(self.inbox, settings, self._hints, self._request_look, clock)
        self._tracker = SettleTracker(settings.settle_seconds)
        self._scan = ScanInFlight(
            self.inbox,
            scan_timeout_seconds,
            submit=share.submit if share is not None else None,
            beat=share.beat if share is not None else lambda: None,
        )

        self.error: str | None = None  # what is wrong with the inbox; None when healthy
        # The controls (PAUSE, NAME.cancel, NAME.retry) and story files seen at the last good look.
        self.controls: dict[str, Candidate] = {}
        self.entries: dict[str, Candidate] = {}
        self._running = False
        self._stopped = False
        self._lock = threading.Lock()  # guards _hint (set from the observer and scan threads)
        self._hint = True  # a look is wanted as soon as the debounce allows
        self._inbox_id: tuple[int, int] | None = None  # (st_dev, st_ino) at the last look
        self._last_scan: float | None = None
        self._next_scan_at = 0.0

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Start watching. Never raises for a missing inbox: that is reported in `error`."""
        self._running = True
        self.supervisor.start()
        self._request_look()

    def stop(self) -> None:
        self._running = False
        self._stopped = True
        self.supervisor.stop()

    def __enter__(self) -> InboxWatcher:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def mode(self) -> Mode:
        return self.supervisor.mode

    @property
    def restarts(self) -> int:
        return self.supervisor.restarts

    @property
    def observer_alive(self) -> bool:
        return self.supervisor.alive

    def pending(self) -> int:
        """Entries seen at the last look that are not offered yet (still settling or being written).

        What `--once` needs to tell "inbox empty" from "a file is still arriving".
        """
        return self._tracker.pending()

    def forget(self, name: str) -> None:
        """Offer `name` again (after settling anew), e.g. when a claim failed for a passing reason."""
        self._tracker.forget(name)
        self._request_look()

    def hold(self, name: str, reason: str) -> float:
        """`name` could not be claimed or removed: retry it alone after a back-off (returned).

        Every other ready file goes on; `held()` names it until it leaves the inbox.
        """
        now = self._clock()
        delay = self._tracker.hold(name, now, reason)
        self._next_scan_at = min(self._next_scan_at, now + delay)
        return delay

    def held(self) -> dict[str, str]:
        """Files on hold and why (for `storyreel status`)."""
        return self._tracker.held()

    def request_rescan(self) -> None:
        """Ask for a look at the next poll_ready (e.g. after the daemon moved files away)."""
        self._request_look()

    # ---------------------------------------------------------------- main loop

    def poll_ready(self) -> list[Candidate]:
        """Files ready to claim in arrival order (see daemon/inbox/settle.py), each offered once.

        Cheap when no look is due. Never raises for inbox trouble: `error` says what
        is wrong (None when healthy) and the watcher keeps retrying.
        """
        now = self._clock()
        ready: list[Candidate] = []
        if self._look_due(now):
            ready = self._look(now)
        if self._running and self.error is None and self.supervisor.supervise(self._clock(), self._inbox_id):
            self._request_look()  # events were missed while no observer ran: the rescan is the catch-up
        return ready

    def next_deadline(self) -> float | None:
        """Monotonic time by which poll_ready should run again (None once stopped).

        Events and finished slow scans set `wake` before this; the deadline covers
        the periodic rescan, a settle period running out, and the hint debounce.
        """
        if self._stopped:
            return None
        deadline = self._next_scan_at
        if self._running and self.error is None:
            # An observer thread dies without telling anyone: look at it now and then (at the
            # rescan interval, which also catches up on what it missed; sooner while it is down).
            every = self._interval() if self.supervisor.alive else self._retry_seconds()
            deadline = min(deadline, self.supervisor.checked_at + every)
        with self._lock:
            hinted = self._hint
        if hinted and not self._scan.running:
            earliest = (self._last_scan or 0.0) + self._debounce
            deadline = min(deadline, earliest)
        return deadline

    def seconds_until_next(self, cap: float | None = None) -> float | None:
        """`next_deadline` as a timeout for `wake.wait()`, never negative, at most `cap`."""
        deadline = self.next_deadline()
        if deadline is None:
            return cap
        wait = max(0.0, deadline - self._clock())
        return wait if cap is None else min(wait, cap)

    # -------------------------------------------------------------------- looks

    def _request_look(self) -> None:
        with self._lock:
            self._hint = True
        self._notify()

    def _look_due(self, now: float) -> bool:
        if self._scan.running:
            return self._scan.done() or now >= self._next_scan_at
        if now >= self._next_scan_at:
            return True
        with self._lock:
            hinted = self._hint
        return hinted and (self._last_scan is None or now - self._last_scan >= self._debounce)

    def _look(self, now: float) -> list[Candidate]:
        """Scan (or collect a slow scan), then update settling and pick the settled files."""
        if not self._scan.running:
            with self._lock:
                self._hint = False
            self._scan.start(now, self._notify)
        try:
            scan = self._scan.result()
        except OSError as err:
            self._inbox_unavailable(err)
            return []
        if scan is None:  # still running: its end wakes the caller
            if self._scan.overdue(self._clock()):
                self._scan_hung()
            else:
                self._next_scan_at = self._scan.started_at + self._scan.timeout  # when it is overdue
            return []
        return self._apply(scan, started=self._scan.started_at, finished=self._clock())

    def _scan_hung(self) -> None:
        if not self._scan.hung:
            message = f"inbox {self.inbox} not responding (a scan took over {self._scan.timeout:g}s)"
            log.warning("watch.inbox_not_responding", inbox=str(self.inbox), error=message)
            self.error = message
            self._scan.mark_hung()  # the late scan wakes the main loop
        self._next_scan_at = self._clock() + self._retry_seconds()

    def _inbox_unavailable(self, err: OSError) -> None:
        message = _describe_oserror(self.inbox, err)
        if message != self.error:
            log.warning("watch.inbox_unavailable", inbox=str(self.inbox), error=message)
        self.error = message
        self.supervisor.stop()
        now = self._clock()
        self._last_scan = now
        self._next_scan_at = now + self._retry_seconds()

    def _apply(self, scan: InboxScan, *, started: float, finished: float) -> list[Candidate]:
        if self.error is not None:
            log.info("watch.inbox_back", inbox=str(self.inbox), was=self.error)
            self.error = None
            self.supervisor.restart_soon()  # watch it again right away
        self._inbox_id = scan.inbox_id
        self.controls, self.entries = scan.controls, scan.entries
        ready = self._tracker.update(
            scan.entries, started=started, finished=finished, held_open=self._hints.held_open
        )
        self._last_scan = finished
        self._next_scan_at = self._tracker.next_look(
            finished, interval=self._interval(), debounce=self._debounce
        )
        return ready

    def _interval(self) -> float:
        if self.mode == "polling":
            return min(self._settings.poll_seconds, self._settings.rescan_seconds)
        return self._settings.rescan_seconds

    def _retry_seconds(self) -> float:
        """How often to look for a missing inbox: like polling, whatever the mode."""
        return min(self._settings.poll_seconds, self._settings.rescan_seconds)

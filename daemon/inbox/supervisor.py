"""The watchdog observer: kept running, restarted when it dies, and its events turned into hints.

Events are only hints that make the watcher look sooner (see daemon/inbox/watch.py).
watchdog's inotify backend swallows the kernel's queue overflow (watchdog #654),
and its PollingObserver has stopped for good after a single OSError while a
share was unreachable (#1065, #452), so an observer is never trusted to be
alive: `ObserverSupervisor.supervise` restarts it when its threads died or when
the inbox is no longer the folder it watches. The watch mode is decided here,
at every (re)start, and nowhere else.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from collections.abc import Callable
from pathlib import Path

import structlog
from watchdog.events import (
    FileClosedEvent,
    FileClosedNoWriteEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileOpenedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from daemon.inbox.fstype import Mode, choose_mode, filesystem_type, mode_reason, mount_table
from daemon.inbox.scan import is_candidate_name
from pipeline.settings import WatchSettings

log = structlog.get_logger("storyreel.watch")

Clock = Callable[[], float]

# Out of inotify watches or instances, or no inotify at all: polling still works.
_NO_INOTIFY = (errno.ENOSPC, errno.EMFILE, errno.ENFILE, errno.ENOSYS)


def _basename(path: str | bytes) -> str:
    return os.path.basename(os.fsdecode(path))


class WriterHints:
    """Names some process may still be writing, from inotify open/modify/close events.

    Written by the observer thread, read by the main loop, hence the lock. Only
    trusted in inotify mode (polling has no close events). Last event wins: a
    reader's close may clear a writer's mark, but the writer's next write sets it
    again, and settling still has to pass - it is a hint, not the guard. A mark
    older than `max_age` (a writer idle that long, or a close event lost in an
    overflow) stops counting.
    """

    def __init__(self, max_age: float) -> None:
        self.max_age = max_age
        self._lock = threading.Lock()
        self._writing: dict[str, float] = {}  # name -> clock() of last open/modify without a close

    def note(self, event: FileSystemEvent, now: float) -> None:
        name = _basename(event.src_path)
        with self._lock:
            if isinstance(event, (FileOpenedEvent, FileModifiedEvent)):
                if is_candidate_name(name):
                    self._writing[name] = now
            elif isinstance(event, (FileClosedEvent, FileClosedNoWriteEvent, FileDeletedEvent)):
                self._writing.pop(name, None)
            elif isinstance(event, FileMovedEvent):
                self._writing.pop(name, None)
                if event.dest_path:
                    self._writing.pop(_basename(event.dest_path), None)

    def held_open(self, name: str, now: float) -> bool:
        with self._lock:
            marked = self._writing.get(name)
            if marked is not None and now - marked > self.max_age:
                del self._writing[name]
                return False
        return marked is not None


class _HintHandler(FileSystemEventHandler):
    """Forwards watchdog events; never lets one kill the observer thread."""

    def __init__(self, on_event: Callable[[FileSystemEvent], None]) -> None:
        super().__init__()
        self._on_event = on_event

    def dispatch(self, event: FileSystemEvent) -> None:
        try:
            self._on_event(event)
        except Exception:
            log.exception("watch.hint_failed", event=repr(event))


class ObserverSupervisor:
    """Owns the one watchdog observer on the inbox, and the watch mode it runs in.

    Every event records writer hints (inotify mode only) and then calls `on_change`,
    on the observer's thread.
    """

    def __init__(
        self,
        inbox: Path,
        settings: WatchSettings,
        hints: WriterHints,
        on_change: Callable[[], None],
        clock: Clock,
    ) -> None:
        self.inbox = inbox
        self._settings = settings
        self._hints = hints
        self._on_change = on_change
        self._clock = clock
        self.mode: Mode = "polling"
        self._fstype = "unknown"  # of the inbox at the last start; for the log
        self.reason = ""  # why `mode` was chosen at the last start, in words; for the log
        self._forced_polling = False  # inotify could not start (limits): stay on polling
        self._observer: BaseObserver | None = None
        self._observer_inbox_id: tuple[int, int] | None = None
        self._next_restart_at = 0.0
        self._starts = 0
        self.checked_at = 0.0  # clock() of the last `supervise`

    @property
    def observer(self) -> BaseObserver | None:
        return self._observer

    @property
    def alive(self) -> bool:
        obs = self._observer
        return obs is not None and obs.is_alive() and all(e.is_alive() for e in list(obs.emitters))

    @property
    def restarts(self) -> int:
        """Observer starts after the first one; for health reporting and tests."""
        return max(0, self._starts - 1)

    @property
    def fstype(self) -> str:
        """The inbox's filesystem type at the last (re)start."""
        return self._fstype

    def restart_soon(self) -> None:
        """Lift the restart back-off, e.g. when the inbox came back."""
        self._next_restart_at = 0.0

    def supervise(self, now: float, inbox_id: tuple[int, int] | None) -> bool:
        """Restart the observer when it died, or when the inbox is no longer the folder it watches.

        `inbox_id` is (st_dev, st_ino) of the inbox at the last look. Returns True when a
        restart was tried: events were missed meanwhile, so the caller should look again.
        """
        self.checked_at = now
        alive = self.alive
        replaced = alive and inbox_id is not None and inbox_id != self._observer_inbox_id
        if alive and not replaced:
            return False
        if now < self._next_restart_at:
            return False
        self._next_restart_at = now + 1.0
        self.stop()
        if self.start():
            reason = "inbox replaced" if replaced else "observer was not running"
            log.info(
                "watch.observer_restarted",
                inbox=str(self.inbox),
                mode=self.mode,
                fstype=self._fstype,
                reason=reason,
            )
        return True

    def start(self) -> bool:
        """Start an observer in the mode this inbox calls for; False (and none running) on OSError."""
        opened, self.mode, self._fstype = self._open()
        if opened is None:
            return False
        self._observer, self._observer_inbox_id = opened
        self._starts += 1
        return True

    def stop(self) -> None:
        observer, self._observer = self._observer, None
        self._observer_inbox_id = None
        if observer is not None:
            _stop_quietly(observer)

    def _open(self) -> tuple[tuple[BaseObserver, tuple[int, int]] | None, Mode, str]:
        """(observer and the inbox's (dev, ino), mode, fstype). The mode is re-decided at every
        (re)start: a share mounted after start-up gets polling."""
        mounts = mount_table() or []
        fstype = filesystem_type(self.inbox, mounts)
        mode = "polling" if self._forced_polling else choose_mode(self._settings.mode, self.inbox, mounts)
        self.reason = mode_reason(self._settings.mode, fstype, mode)
        if self._forced_polling:
            self.reason = "inotify could not start (out of watches or instances): polling"
        try:
            inbox_st = os.stat(self.inbox)
            observer = self._inotify() if mode == "inotify" else None
            if observer is None:
                if mode == "inotify":
                    self.reason = "inotify could not start (out of watches or instances): polling"
                mode = "polling"
                observer = self._started(PollingObserver(timeout=self._settings.poll_seconds))
        except OSError as err:
            log.debug("watch.observer_not_started", inbox=str(self.inbox), error=str(err))
            return None, mode, fstype
        return (observer, (inbox_st.st_dev, inbox_st.st_ino)), mode, fstype

    def _inotify(self) -> BaseObserver | None:
        """An inotify observer, or None (and polling from now on) when the kernel has none to give."""
        from watchdog.observers.inotify import InotifyObserver  # Linux only

        try:
            return self._started(InotifyObserver())
        except OSError as err:
            if err.errno not in _NO_INOTIFY:
                raise
            # Out of inotify watches/instances: rescans still find everything.
            log.warning("watch.inotify_unavailable", error=str(err), fallback="polling")
            self._forced_polling = True
            return None

    def _started(self, observer: BaseObserver) -> BaseObserver:
        try:
            observer.schedule(_HintHandler(self._on_event), str(self.inbox), recursive=False)
            observer.start()
        except BaseException:
            _stop_quietly(observer)
            raise
        return observer

    def _on_event(self, event: FileSystemEvent) -> None:
        """Runs on the observer thread: record writer hints, then ask for a look."""
        if not event.is_directory and self.mode == "inotify":
            self._hints.note(event, self._clock())
        self._on_change()


STOP_SECONDS = 2.0  # an observer not stopped by then is left to itself (a daemon thread)
WAIT_SECONDS = 1.0  # how long the caller (the loop's thread, between watchdog pings) waits for that


def _stop_quietly(observer: BaseObserver) -> None:
    """Stop and briefly join, on a thread of its own: watchdog's `stop()` joins its emitters
    without a timeout, and a polling emitter in a listing of a share that stopped answering
    never returns. Such a thread is abandoned (watchdog's threads are daemon threads)."""

    def stop() -> None:
        with contextlib.suppress(Exception):
            observer.stop()
        if observer.is_alive() or observer.ident is not None:
            with contextlib.suppress(RuntimeError):
                observer.join(timeout=STOP_SECONDS)

    stopper = threading.Thread(target=stop, name="storyreel-observer-stop", daemon=True)
    stopper.start()
    stopper.join(WAIT_SECONDS)

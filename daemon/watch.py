"""Finding complete story files in the inbox.

Watch events are only hints that make us look sooner; a full `os.scandir` of the
inbox is the truth. watchdog's inotify backend swallows the kernel's queue
overflow (watchdog #654), and its PollingObserver has stopped for good after a
single OSError while a share was unreachable (#1065, #452), so nothing here
depends on an event arriving: a lost event costs at most one rescan interval.

A regular file is offered once its (size, mtime_ns, dev, ino) has stayed the
same for `settle_seconds` across at least two looks - that is what keeps a slow
in-place writer from being read half-written - and, in inotify mode, while no
writer is known to hold it open. Symlinks, FIFOs and devices with a story name
are offered at once, marked, so the daemon can refuse them without ever opening
them (a FIFO with no writer would block a reader forever).

Threads: the watchdog observer and a one-shot scan thread report back through a
lock-protected flag and the caller's wake-up; everything else (tracking,
settling, supervision) runs in the caller's thread inside `poll_ready()`, timed
with the injected monotonic clock so tests can drive it.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import os
import stat
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

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

from daemon.fstype import Mode, choose_mode, filesystem_type, mount_table
from pipeline.settings import WatchSettings

log = structlog.get_logger("storyreel.watch")

Kind = Literal["regular", "symlink", "other"]
Clock = Callable[[], float]

# --------------------------------------------------------------------------- names

# Names that editors, browsers, sync clients and copy tools use while a file is
# still being written. Only names ending in ".json" are candidates at all, so most
# of these can never match; they stay listed so that e.g. "~$story.json" (Office
# lock), ".~lock.story.json#" (LibreOffice) or "story.json.tmp" are excluded by
# intent, not by accident of the suffix rule.
TEMP_PATTERNS: tuple[str, ...] = (
    "*.part",
    "*.partial",
    "*.tmp",
    "*.temp",
    "*.crdownload",
    "*.download",
    "*.filepart",
    "*.swp",
    "*.swx",
    "*.!sync",
    "*.!ut",
    "*.!qb",
    "*.sb-*",
    "*~",
    "~*",
    ".~lock*",
    ".goutputstream-*",
    ".syncthing.*",
    "*.tmp.*",
)


def is_candidate_name(name: str) -> bool:
    """Whether `name` can be a story drop.

    The suffix is compared case-insensitively: stories written on Windows over an
    SMB share often arrive as "STORY.JSON", and refusing them silently would look
    like a broken daemon. Hidden names are skipped because every sync tool and
    editor hides its work-in-progress files that way.
    """
    if not name or name.startswith(".") or "/" in name:
        return False
    lower = name.lower()
    if not lower.endswith(".json") or lower == ".json":
        return False
    return not any(fnmatch.fnmatchcase(lower, pattern) for pattern in TEMP_PATTERNS)


# ------------------------------------------------------------------ candidates

_OTHER_KINDS: tuple[tuple[Callable[[int], bool], str], ...] = (
    (stat.S_ISFIFO, "fifo"),
    (stat.S_ISSOCK, "socket"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
)


@dataclass(frozen=True, slots=True)
class Candidate:
    """One inbox entry with a story name, as seen by lstat (never followed)."""

    path: Path
    name: str
    kind: Kind
    size: int
    mtime_ns: int
    inode: tuple[int, int]  # (st_dev, st_ino)
    detail: str = ""  # for kind "other": fifo, socket, character device, ...

    @property
    def signature(self) -> tuple[str, int, int, int, int]:
        return (self.kind, self.size, self.mtime_ns, *self.inode)

    @property
    def refusal(self) -> str | None:
        """The message to fail a non-regular entry with; None for a regular file."""
        if self.kind == "regular":
            return None
        if self.kind == "symlink":
            return "refused: symlink"
        return f"refused: not a regular file ({self.detail or 'unknown type'})"

    def unchanged(self) -> bool:
        """Re-lstat: still the very file that was offered? Guards a claim against a late rewrite."""
        try:
            st = os.lstat(self.path)
        except OSError:
            return False
        return _kind_of(st.st_mode)[0] == self.kind and (
            st.st_size,
            st.st_mtime_ns,
            st.st_dev,
            st.st_ino,
        ) == (self.size, self.mtime_ns, *self.inode)


def _kind_of(mode: int) -> tuple[Kind, str]:
    if stat.S_ISREG(mode):
        return "regular", ""
    if stat.S_ISLNK(mode):
        return "symlink", ""
    for test, label in _OTHER_KINDS:
        if test(mode):
            return "other", label
    return "other", "unknown type"


def _candidate(inbox: Path, entry: os.DirEntry[str]) -> Candidate | None:
    """One entry, or None for directories and entries gone or unreadable since readdir."""
    try:
        st = entry.stat(follow_symlinks=False)
    except OSError:
        return None
    if stat.S_ISDIR(st.st_mode):
        return None
    kind, detail = _kind_of(st.st_mode)
    return Candidate(
        path=inbox / entry.name,
        name=entry.name,
        kind=kind,
        size=st.st_size,
        mtime_ns=st.st_mtime_ns,
        inode=(st.st_dev, st.st_ino),
        detail=detail,
    )


@dataclass(frozen=True, slots=True)
class InboxScan:
    inbox_id: tuple[int, int]
    entries: dict[str, Candidate]


def scan_inbox(inbox: Path) -> InboxScan:
    """One full look at the inbox. Raises OSError when the folder itself cannot be read.

    A scan that fails half-way raises rather than returning what it saw, so files
    never "disappear" (and lose their settle progress) because a share hiccuped.
    """
    st = os.stat(inbox)
    entries: dict[str, Candidate] = {}
    with os.scandir(inbox) as it:
        for entry in it:
            if not is_candidate_name(entry.name):
                continue
            cand = _candidate(inbox, entry)
            if cand is not None:
                entries[cand.name] = cand
    return InboxScan((st.st_dev, st.st_ino), entries)


def _describe_oserror(inbox: Path, err: OSError) -> str:
    code = errno.errorcode.get(err.errno or 0, "")
    reason = err.strerror or str(err)
    return f"inbox {inbox} unavailable: {reason}" + (f" ({code})" if code else "")


def _run_in_thread(fn: Callable[[], InboxScan]) -> Future[InboxScan]:
    """Run one scan on a throw-away daemon thread.

    Why not inline: a hard-mounted NFS share that stops answering blocks readdir
    in the kernel, maybe for good. On a daemon thread that only costs the thread;
    the main loop keeps pinging systemd and can report "inbox not responding".
    Why not a ThreadPoolExecutor: its workers are joined at interpreter exit, so a
    stuck one would also hang shutdown.
    """
    fut: Future[InboxScan] = Future()

    def work() -> None:
        if not fut.set_running_or_notify_cancel():
            return
        try:
            fut.set_result(fn())
        except BaseException as err:  # handed to the waiting caller, never lost
            fut.set_exception(err)

    threading.Thread(target=work, name="storyreel-inbox-scan", daemon=True).start()
    return fut


# --------------------------------------------------------------------- tracking


@dataclass(slots=True)
class _Track:
    cand: Candidate
    since: float  # when this signature was first seen (upper bound of the stat's time)
    looks: int = 1
    reported: bool = False


class _HintHandler(FileSystemEventHandler):
    """Forwards watchdog events to the watcher; never lets one kill the observer thread."""

    def __init__(self, on_event: Callable[[FileSystemEvent], None]) -> None:
        super().__init__()
        self._on_event = on_event

    def dispatch(self, event: FileSystemEvent) -> None:
        try:
            self._on_event(event)
        except Exception:
            log.exception("watch.hint_failed", event=repr(event))


def _basename(path: str | bytes) -> str:
    return os.path.basename(os.fsdecode(path))


WakeTarget = threading.Event | Callable[[], None] | None


def _wake_callable(wake: WakeTarget) -> Callable[[], None]:
    if wake is None:
        return lambda: None
    if isinstance(wake, threading.Event):
        return wake.set
    return wake


class InboxWatcher:
    """Offers each complete story file in the inbox once, in arrival order.

    Main-loop use (one thread calls poll_ready/next_deadline; the watcher only ever
    sets `wake`, the caller clears it):

        watcher = InboxWatcher(settings.paths.inbox, settings.watch, wake=wake)
        watcher.start()
        while running:
            for cand in watcher.poll_ready():
                ...claim (cand.refusal tells non-regular entries apart)...
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
    ) -> None:
        self.inbox = Path(os.path.abspath(inbox))
        self._settings = settings
        self._clock = clock
        self._notify = _wake_callable(wake)
        self._debounce = debounce_seconds
        self._scan_timeout = scan_timeout_seconds
        # A writer that still holds the file open after this long without a write
        # (or whose close event was lost in an overflow) stops blocking the file.
        self._writer_hint_max = (
            writer_hint_max_seconds
            if writer_hint_max_seconds is not None
            else max(60.0, 10 * settings.settle_seconds)
        )

        self.error: str | None = None
        self.mode: Mode = "polling"
        self.fstype = "unknown"
        self._forced_polling = False  # inotify could not start (limits): stay on polling

        self._running = False
        self._observer: BaseObserver | None = None
        self._observer_inbox_id: tuple[int, int] | None = None
        self._next_restart_at = 0.0
        self._last_supervised = 0.0

        self._lock = threading.Lock()  # guards _hint and _writing (written by the observer thread)
        self._hint = True  # a look is wanted as soon as the debounce allows
        self._writing: dict[str, float] = {}  # name -> clock() of last open/modify without a close

        self._tracks: dict[str, _Track] = {}
        self._inbox_id: tuple[int, int] | None = None
        self._last_scan: float | None = None
        self._next_scan_at = 0.0
        self._pending: Future[InboxScan] | None = None
        self._pending_since = 0.0
        self._pending_hung = False
        self._stopped = False
        self._starts = 0

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Start watching. Never raises for a missing inbox: that is reported in `error`."""
        self._running = True
        self._start_observer()
        self._request_look()

    def stop(self) -> None:
        self._running = False
        self._stopped = True
        self._stop_observer()

    def __enter__(self) -> InboxWatcher:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def restarts(self) -> int:
        """Observer starts after the first one; for health reporting and tests."""
        return max(0, self._starts - 1)

    @property
    def observer_alive(self) -> bool:
        obs = self._observer
        return obs is not None and obs.is_alive() and all(e.is_alive() for e in list(obs.emitters))

    def pending(self) -> int:
        """Entries seen at the last look that are not offered yet (still settling or being written).

        What `--once` needs to tell "inbox empty" from "a file is still arriving".
        """
        return sum(1 for track in self._tracks.values() if not track.reported)

    def forget(self, name: str) -> None:
        """Offer `name` again (after settling anew), e.g. when a claim failed for a passing reason."""
        self._tracks.pop(name, None)
        self._request_look()

    def request_rescan(self) -> None:
        """Ask for a look at the next poll_ready (e.g. after the daemon moved files away)."""
        self._request_look()

    # ---------------------------------------------------------------- main loop

    def poll_ready(self) -> list[Candidate]:
        """Files ready to claim, oldest first (mtime, then name), each offered once.

        Cheap when no look is due. Never raises for inbox trouble: `error` says what
        is wrong (None when healthy) and the watcher keeps retrying.
        """
        now = self._clock()
        ready: list[Candidate] = []
        if self._look_due(now):
            ready = self._look(now)
        if self._running and self.error is None:
            self._last_supervised = self._clock()
            self._supervise(self._last_supervised)
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
            # An observer thread dies without telling anyone: look at it now and then.
            deadline = min(deadline, self._last_supervised + self._retry_seconds())
        with self._lock:
            hinted = self._hint
        if hinted and self._pending is None:
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

    # ------------------------------------------------------------------- events

    def _request_look(self) -> None:
        with self._lock:
            self._hint = True
        self._notify()

    def _on_event(self, event: FileSystemEvent) -> None:
        """Runs on the observer thread: record writer hints, then ask for a look."""
        if not event.is_directory and self.mode == "inotify":
            now = self._clock()
            with self._lock:
                self._note_writer(event, now)
        self._request_look()

    def _note_writer(self, event: FileSystemEvent, now: float) -> None:
        """Open/modify marks a name as possibly being written; a close clears it.

        Only trusted in inotify mode (polling has no close events). Last event wins:
        a reader's close may clear a writer's mark, but the writer's next write sets
        it again, and settling still has to pass - it is a hint, not the guard.
        """
        name = _basename(event.src_path)
        if isinstance(event, (FileOpenedEvent, FileModifiedEvent)):
            if is_candidate_name(name):
                self._writing[name] = now
        elif isinstance(event, (FileClosedEvent, FileClosedNoWriteEvent, FileDeletedEvent)):
            self._writing.pop(name, None)
        elif isinstance(event, FileMovedEvent):
            self._writing.pop(name, None)
            if event.dest_path:
                self._writing.pop(_basename(event.dest_path), None)

    def _being_written(self, name: str, now: float) -> bool:
        with self._lock:
            marked = self._writing.get(name)
            if marked is not None and now - marked > self._writer_hint_max:
                del self._writing[name]
                return False
        return marked is not None

    # -------------------------------------------------------------------- looks

    def _look_due(self, now: float) -> bool:
        if self._pending is not None:
            return self._pending.done() or now >= self._next_scan_at
        if now >= self._next_scan_at:
            return True
        with self._lock:
            hinted = self._hint
        return hinted and (self._last_scan is None or now - self._last_scan >= self._debounce)

    def _look(self, now: float) -> list[Candidate]:
        """Scan (or collect a slow scan), then update tracks and pick the settled ones."""
        if self._pending is None:
            with self._lock:
                self._hint = False
            self._pending = _run_in_thread(lambda: scan_inbox(self.inbox))
            self._pending_since = now
            self._pending_hung = False
        fut = self._pending
        try:
            # Block the caller only once per scan; a scan already known to hang is just checked.
            scan = fut.result(timeout=0 if self._pending_hung else self._scan_timeout)
        except FutureTimeout:
            return self._scan_hung()
        except OSError as err:
            self._pending = None
            self._inbox_unavailable(err)
            return []
        self._pending = None
        return self._apply(scan, started=self._pending_since, finished=self._clock())

    def _scan_hung(self) -> list[Candidate]:
        fut = self._pending
        assert fut is not None
        if not self._pending_hung:
            self._pending_hung = True
            message = f"inbox {self.inbox} not responding (a scan took over {self._scan_timeout:g}s)"
            log.warning("watch.inbox_not_responding", inbox=str(self.inbox), error=message)
            self.error = message
            fut.add_done_callback(lambda _f: self._notify())
        self._next_scan_at = self._clock() + self._retry_seconds()
        return []

    def _inbox_unavailable(self, err: OSError) -> None:
        message = _describe_oserror(self.inbox, err)
        if message != self.error:
            log.warning("watch.inbox_unavailable", inbox=str(self.inbox), error=message)
        self.error = message
        self._stop_observer()
        now = self._clock()
        self._last_scan = now
        self._next_scan_at = now + self._retry_seconds()

    def _apply(self, scan: InboxScan, *, started: float, finished: float) -> list[Candidate]:
        if self.error is not None:
            log.info("watch.inbox_back", inbox=str(self.inbox), was=self.error)
            self.error = None
            self._next_restart_at = 0.0  # watch it again right away
        self._inbox_id = scan.inbox_id
        for name in [n for n in self._tracks if n not in scan.entries]:
            del self._tracks[name]
        ready: list[Candidate] = []
        for name, cand in scan.entries.items():
            track = self._tracks.get(name)
            if track is None or track.cand.signature != cand.signature:
                # Stamped with the scan's end: the stat happened no later than that.
                self._tracks[name] = track = _Track(cand, since=finished)
            else:
                track.looks += 1
                track.cand = cand
            # Judged at the scan's start: the confirming stat happened no earlier.
            if not track.reported and self._settled(track, started):
                track.reported = True
                ready.append(cand)
        self._last_scan = finished
        self._next_scan_at = self._plan_next(finished)
        ready.sort(key=lambda c: (c.mtime_ns, c.name))
        return ready

    def _settled(self, track: _Track, at: float) -> bool:
        if track.cand.kind != "regular":
            return True  # refused unread: nothing to wait for
        # The epsilon keeps float noise in clock sums from costing a whole extra look.
        if track.looks < 2 or at - track.since + 1e-9 < self._settings.settle_seconds:
            return False
        return not self._being_written(track.cand.name, at)

    def _plan_next(self, now: float) -> float:
        """Next look: the periodic rescan, or sooner when a file's settle period ends."""
        due = now + self._interval()
        for track in self._tracks.values():
            if track.reported or track.cand.kind != "regular":
                continue
            settle_at = track.since + self._settings.settle_seconds
            if track.looks >= 2 and settle_at <= now:
                continue  # settled but held open by a writer: its close event wakes us
            due = min(due, max(settle_at, now + self._debounce))
        return due

    def _interval(self) -> float:
        if self.mode == "polling":
            return min(self._settings.poll_seconds, self._settings.rescan_seconds)
        return self._settings.rescan_seconds

    def _retry_seconds(self) -> float:
        """How often to look for a missing inbox: like polling, whatever the mode."""
        return min(self._settings.poll_seconds, self._settings.rescan_seconds)

    # -------------------------------------------------------------- supervision

    def _supervise(self, now: float) -> None:
        """Restart the observer when it died, or when the inbox is no longer the folder it watches."""
        alive = self.observer_alive
        replaced = alive and self._inbox_id is not None and self._inbox_id != self._observer_inbox_id
        if alive and not replaced:
            return
        if now < self._next_restart_at:
            return
        self._next_restart_at = now + 1.0
        self._stop_observer()
        if self._start_observer():
            reason = "inbox replaced" if replaced else "observer was not running"
            log.info("watch.observer_restarted", inbox=str(self.inbox), mode=self.mode, reason=reason)
        # Events were missed while no observer ran: the rescan is the catch-up.
        self._request_look()

    def _start_observer(self) -> bool:
        self.mode, self.fstype = self._resolve_mode()
        try:
            inbox_st = os.stat(self.inbox)
            observer = self._make_observer(self.mode)
        except OSError as err:
            self._observer = None
            log.debug("watch.observer_not_started", inbox=str(self.inbox), error=str(err))
            return False
        self._observer = observer
        self._observer_inbox_id = (inbox_st.st_dev, inbox_st.st_ino)
        self._starts += 1
        return True

    def _resolve_mode(self) -> tuple[Mode, str]:
        """Re-decided at every (re)start: a share mounted after start-up gets polling."""
        mounts = mount_table() or []
        fstype = filesystem_type(self.inbox, mounts)
        if self._forced_polling:
            return "polling", fstype
        return choose_mode(self._settings.mode, self.inbox, mounts), fstype

    def _make_observer(self, mode: Mode) -> BaseObserver:
        """Build, schedule and start one observer; raises OSError if the inbox cannot be watched."""
        if mode == "inotify":
            try:
                return self._started(self._inotify_observer())
            except OSError as err:
                if err.errno not in (errno.ENOSPC, errno.EMFILE, errno.ENFILE, errno.ENOSYS):
                    raise
                # Out of inotify watches/instances: rescans still find everything.
                log.warning("watch.inotify_unavailable", error=str(err), fallback="polling")
                self._forced_polling = True
                self.mode = "polling"
        return self._started(PollingObserver(timeout=self._settings.poll_seconds))

    @staticmethod
    def _inotify_observer() -> BaseObserver:
        from watchdog.observers.inotify import InotifyObserver  # Linux only

        return InotifyObserver()

    def _started(self, observer: BaseObserver) -> BaseObserver:
        try:
            observer.schedule(_HintHandler(self._on_event), str(self.inbox), recursive=False)
            observer.start()
        except BaseException:
            _stop_quietly(observer)
            raise
        return observer

    def _stop_observer(self) -> None:
        observer, self._observer = self._observer, None
        self._observer_inbox_id = None
        if observer is not None:
            _stop_quietly(observer)


def _stop_quietly(observer: BaseObserver) -> None:
    """Stop and briefly join; a thread stuck on a dead share is abandoned (it is a daemon thread)."""
    with contextlib.suppress(Exception):
        observer.stop()
    if observer.is_alive() or observer.ident is not None:
        with contextlib.suppress(RuntimeError):
            observer.join(timeout=2.0)

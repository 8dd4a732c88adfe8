"""One look at the inbox: which entries have a story name, and what each one is.

A full `os.scandir` of the inbox is the truth; watch events only make us look
sooner. Entries are seen by lstat, never followed, so a symlink, FIFO or device
with a story name is reported as what it is and never opened here (a FIFO with
no writer would block a reader forever).

A look at a share can hang in the kernel (a hard-mounted NFS server that stopped
answering), so `ScanInFlight` runs each look on the inbox's lane (daemon/system/share.py),
one at a time, waits for it only briefly, and is told when a slow one ends.
"""

from __future__ import annotations

import fnmatch
import os
import stat
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from daemon.system.share import Lane
from pipeline.names import story_kind

Kind = Literal["regular", "symlink", "other"]

# --------------------------------------------------------------------------- names

# Names that editors, browsers, sync clients and copy tools use while a file is
# still being written. Only names ending in ".json" or ".zip" are candidates at all, so
# most of these can never match; they stay listed so that e.g. "~$story.json" (Office
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
    """Whether `name` can be a story drop: NAME.json (a story) or NAME.zip (a bundle).

    The suffix is compared case-insensitively (`pipeline.names.story_kind`): stories
    written on Windows over an SMB share often arrive as "STORY.JSON", and refusing
    them silently would look like a broken daemon. Hidden names are skipped because
    every sync tool and editor hides its work-in-progress files that way.
    """
    if not name or name.startswith(".") or "/" in name:
        return False
    lower = name.lower()
    if story_kind(lower) is None:
        return False
    return not any(fnmatch.fnmatchcase(lower, pattern) for pattern in TEMP_PATTERNS)


ControlAction = Literal["pause", "cancel", "retry"]
PAUSE_NAME = "PAUSE"


def control_of(name: str) -> tuple[ControlAction, str] | None:
    """The control a file on the share asks for: `PAUSE`, `NAME.cancel`, `NAME.retry`.

    Returns (action, NAME) or None. Compared case-insensitively, like ".json" (SMB
    clients on Windows): "pause" and "story.CANCEL" count. Hidden and temporary
    names never do, so a control being copied in is not acted on half-way.
    """
    if not name or name.startswith(".") or "/" in name:
        return None
    lower = name.lower()
    if any(fnmatch.fnmatchcase(lower, pattern) for pattern in TEMP_PATTERNS):
        return None
    if lower == PAUSE_NAME.lower():
        return "pause", ""
    for action in ("cancel", "retry"):
        suffix = "." + action
        if lower.endswith(suffix) and len(name) > len(suffix):
            return action, name[: -len(suffix)]
    return None


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
    controls: dict[str, Candidate] = field(default_factory=dict)  # PAUSE, NAME.cancel, NAME.retry


def scan_inbox(inbox: Path, beat: Callable[[], None] = lambda: None) -> InboxScan:
    """One full look at the inbox. Raises OSError when the folder itself cannot be read.
    `beat` is told of each entry looked at (a long listing is getting on, not stuck).

    A scan that fails half-way raises rather than returning what it saw, so files
    never "disappear" (and lose their settle progress) because a share hiccuped.
    """
    st = os.stat(inbox)
    entries: dict[str, Candidate] = {}
    controls: dict[str, Candidate] = {}
    with os.scandir(inbox) as it:
        for entry in it:
            found = entries if is_candidate_name(entry.name) else controls if control_of(entry.name) else None
            if found is None:
                continue
            cand = _candidate(inbox, entry)
            if cand is not None:
                found[cand.name] = cand
            beat()
    return InboxScan((st.st_dev, st.st_ino), entries, controls)


# ------------------------------------------------------------- the scan in flight

Submit = Callable[[Callable[[], InboxScan], str], "Future[InboxScan]"]


def _own_lane() -> Submit:
    lane = Lane("storyreel-inbox-scan")

    def submit(fn: Callable[[], InboxScan], what: str) -> Future[InboxScan]:
        fut = lane.submit(fn, what)
        assert fut is not None, "one scan at a time never fills a lane"
        return fut

    return submit


class ScanInFlight:
    """At most one scan of the inbox at a time, never waited for long.

    `result()` waits at most `grace` (a healthy scan is done by then); a slower
    scan is left running and `on_done` tells the caller when it ends, so the main
    loop is never held by a share that stopped answering. The caller declares
    the scan hung once it has run for `timeout` (see `overdue`).
    """

    def __init__(
        self,
        inbox: Path,
        timeout: float,
        grace: float = 0.25,
        submit: Submit | None = None,
        beat: Callable[[], None] = lambda: None,
    ) -> None:
        """`submit` runs a scan on the inbox's lane (the daemon's Share; a lane of its own when none
        is given), where `beat` says it is getting on."""
        self.inbox = inbox
        self._submit: Submit = submit or _own_lane()
        self._beat = beat
        self.timeout = timeout
        self.grace = min(grace, timeout)
        self.started_at = 0.0  # clock() when the running scan was started
        self.hung = False  # the running scan outlived `timeout`
        self._future: Future[InboxScan] | None = None
        self._late = False  # result() gave up waiting: the scan's end must wake the caller

    @property
    def running(self) -> bool:
        return self._future is not None

    def done(self) -> bool:
        return self._future is not None and self._future.done()

    def overdue(self, now: float) -> bool:
        return self.running and now - self.started_at >= self.timeout

    def start(self, now: float, on_done: Callable[[], None]) -> None:
        """Start a scan; `on_done` runs (on its thread) when it ends after `result()` gave up on it."""
        try:
            fut = self._submit(lambda: scan_inbox(self.inbox, self._beat), "a scan of the inbox")
        except OSError as err:  # the lane would not take it (the inbox not answering): this look failed
            fut = Future()
            fut.set_exception(err)
        self._future = fut
        self.started_at = now
        self.hung = False
        self._late = False
        fut.add_done_callback(lambda _f: on_done() if self._late else None)

    def result(self) -> InboxScan | None:
        """The scan's result, or None while it is still running. Raises its OSError."""
        fut = self._future
        assert fut is not None, "no scan running"
        try:
            scan = fut.result(timeout=0 if (self.hung or self._late) else self.grace)
        except FutureTimeout:
            self._late = True
            if not fut.done():  # else it ended just now, before its callback could see `_late`
                return None
            return self.result()
        except OSError:
            self._future = None
            raise
        self._future = None
        return scan

    def mark_hung(self) -> None:
        """Remember that this scan hangs: it is only checked from now on, never waited for."""
        assert self._future is not None, "no scan running"
        self.hung = True

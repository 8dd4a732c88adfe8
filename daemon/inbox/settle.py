"""Settling: when a file in the inbox is complete enough to take, and in which order.

A regular file is ready once its (size, mtime_ns, dev, ino) has stayed the same
for `settle_seconds` across at least two looks - that is what keeps a slow
in-place writer from being read half-written - and while no writer is known to
hold it open. Symlinks, FIFOs and devices are ready at once: they are refused
unread, so there is nothing to wait for.

Arrival order on a share. Clocks and mtimes cannot be trusted there:
SFTP mtimes have 1 s resolution, FAT 2 s, a client-side cache rewrites the mtime
when it uploads, and listing caches show one drop before another. So a file's
place is fixed the first time a look sees it, and kept while it settles:

    1. the look that first saw it (quantised to that look: one number per scan),
    2. within one look, its mtime as first seen,
    3. then its name.

A settled file is not offered while a file ranked before it is still settling,
so a change of mtime or size while settling never costs a file its place.

A file the caller could not claim or remove (locked by another client, EIO,
EACCES, a stale handle) is put on hold: offered again after a back-off, and it
holds up nobody else (see `hold`).

Pure bookkeeping: no threads, no I/O, no clock of its own. Every time comes in
as an argument, so tests drive it with made-up numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from daemon.inbox.scan import Candidate
from daemon.system.backoff import backoff_seconds

# Whether a writer is known to hold `name` open at `now` (inotify open/close hints).
HeldOpen = Callable[[str, float], bool]

HOLD_MIN_SECONDS = 1.0  # first retry of a file that could not be claimed
HOLD_MAX_SECONDS = 30.0  # back-off cap: a lock that goes is noticed within this


@dataclass(slots=True)
class _Track:
    cand: Candidate
    since: float  # when this signature was first seen (upper bound of the stat's time)
    rank: tuple[int, int, str]  # (look first seen in, mtime as first seen, name): its place in line
    looks: int = 1
    reported: bool = False
    held_until: float | None = None  # on hold: offered again at this time
    held_reason: str = ""
    holds: int = 0  # holds in a row: the back-off's exponent
    missing_since: float | None = None  # a held file missing from the listing since then


class SettleTracker:
    """Follows each story name across looks and offers each settled file once, in arrival order."""

    def __init__(self, settle_seconds: float) -> None:
        self.settle_seconds = settle_seconds
        self._tracks: dict[str, _Track] = {}
        self._looks = 0

    def update(
        self,
        entries: Mapping[str, Candidate],
        *,
        started: float,
        finished: float,
        held_open: HeldOpen = lambda _name, _now: False,
    ) -> list[Candidate]:
        """Take in one look at the inbox; returns the newly ready files in arrival order.

        `started` and `finished` bracket the look: a changed file is stamped with
        `finished` (its stat happened no later), and settling is judged at `started`
        (the confirming stat happened no earlier).
        """
        self._looks += 1
        self._drop_missing(entries, finished)
        for name, cand in entries.items():
            track = self._tracks.get(name)
            if track is not None:
                track.missing_since = None
            if track is None:
                self._tracks[name] = _Track(cand, since=finished, rank=(self._looks, cand.mtime_ns, name))
            elif track.looks == 0 or track.cand.signature != cand.signature:
                track.cand, track.since, track.looks, track.reported = cand, finished, 1, False
                track.held_until = None  # a new file (or a new version): settle it afresh
            else:
                track.looks += 1
                track.cand = cand
        return self._ready(started, held_open)

    def _drop_missing(self, entries: Mapping[str, Candidate], now: float) -> None:
        """Forget files gone from the listing. A held file is kept for a settle period: a share's
        listing can drop a file for a moment after a failed remove, and it should come back
        still held (same back-off, still named in status), not as a new file."""
        for name in [n for n in self._tracks if n not in entries]:
            track = self._tracks[name]
            if not track.held_reason:
                del self._tracks[name]
            elif track.missing_since is None:
                track.missing_since = now
            elif now - track.missing_since >= self.settle_seconds:
                del self._tracks[name]

    def _ready(self, at: float, held_open: HeldOpen) -> list[Candidate]:
        """Settled files, in rank order, up to the first regular file still settling."""
        ready: list[Candidate] = []
        blocked = False
        for track in sorted(self._tracks.values(), key=lambda t: t.rank):
            if track.missing_since is not None:
                continue
            if track.held_until is not None:
                if at + 1e-9 >= track.held_until:
                    track.held_until = None
                    ready.append(track.cand)  # its turn is long past: it holds up nobody
                continue
            if track.reported:
                continue
            if track.cand.kind != "regular":
                track.reported = True  # refused unread: nothing to wait for, nobody waits for it
                ready.append(track.cand)
            elif not blocked and self._settled(track, at, held_open):
                track.reported = True
                ready.append(track.cand)
            else:
                blocked = True  # later files keep their place behind this one
        return ready

    def _settled(self, track: _Track, at: float, held_open: HeldOpen) -> bool:
        # The epsilon keeps float noise in clock sums from costing a whole extra look.
        if track.looks < 2 or at - track.since + 1e-9 < self.settle_seconds:
            return False
        return not held_open(track.cand.name, at)

    def next_look(self, now: float, *, interval: float, debounce: float) -> float:
        """When to look next: after `interval`, or sooner when a settle period or a hold ends."""
        due = now + interval
        for track in self._tracks.values():
            if track.missing_since is not None:
                due = min(due, max(track.missing_since + self.settle_seconds, now + debounce))
                continue
            if track.held_until is not None:
                due = min(due, max(track.held_until, now + debounce))
                continue
            if track.reported or track.cand.kind != "regular":
                continue
            settle_at = track.since + self.settle_seconds
            if track.looks >= 2 and settle_at <= now:
                continue  # settled but held open by a writer (or behind one): its close event wakes us
            due = min(due, max(settle_at, now + debounce))
        return due

    def pending(self) -> int:
        """Entries seen at the last look that are not offered yet (still settling or being written).

        A file on hold does not count: `--once` is not kept running by another client's lock.
        """
        return sum(1 for t in self._tracks.values() if not t.reported and t.missing_since is None)

    def forget(self, name: str) -> None:
        """Offer `name` again, after settling anew (from the next look); it keeps its place in line."""
        track = self._tracks.get(name)
        if track is not None:
            track.looks, track.reported, track.held_until = 0, False, None

    def hold(self, name: str, now: float, reason: str) -> float:
        """`name` could not be claimed or removed: offer it again after a back-off (returned).

        Only this file waits; it is reported meanwhile, so files after it go on.
        The hold ends when the file leaves the inbox or changes.
        """
        track = self._tracks.get(name)
        if track is None:
            return 0.0
        delay = backoff_seconds(track.holds, HOLD_MIN_SECONDS, HOLD_MAX_SECONDS)
        track.holds += 1
        track.reported, track.held_until, track.held_reason = True, now + delay, reason
        return delay

    def held(self) -> dict[str, str]:
        """Files on hold (or retried after one) and why: for the log and `storyreel status`."""
        return {name: t.held_reason for name, t in self._tracks.items() if t.held_reason}

"""Settling: when a file in the inbox is complete enough to take.

A regular file is ready once its (size, mtime_ns, dev, ino) has stayed the same
for `settle_seconds` across at least two looks - that is what keeps a slow
in-place writer from being read half-written - and while no writer is known to
hold it open. Symlinks, FIFOs and devices are ready at once: they are refused
unread, so there is nothing to wait for.

Pure bookkeeping: no threads, no I/O, no clock of its own. Every time comes in
as an argument, so tests drive it with made-up numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from daemon.scan import Candidate

# Whether a writer is known to hold `name` open at `now` (inotify open/close hints).
HeldOpen = Callable[[str, float], bool]


@dataclass(slots=True)
class _Track:
    cand: Candidate
    since: float  # when this signature was first seen (upper bound of the stat's time)
    looks: int = 1
    reported: bool = False


class SettleTracker:
    """Follows each story name across looks and offers each settled file once."""

    def __init__(self, settle_seconds: float) -> None:
        self.settle_seconds = settle_seconds
        self._tracks: dict[str, _Track] = {}

    def update(
        self,
        entries: Mapping[str, Candidate],
        *,
        started: float,
        finished: float,
        held_open: HeldOpen = lambda _name, _now: False,
    ) -> list[Candidate]:
        """Take in one look at the inbox; returns the newly ready files, oldest first (mtime, then name).

        `started` and `finished` bracket the look: a changed file is stamped with
        `finished` (its stat happened no later), and settling is judged at `started`
        (the confirming stat happened no earlier).
        """
        for name in [n for n in self._tracks if n not in entries]:
            del self._tracks[name]
        ready: list[Candidate] = []
        for name, cand in entries.items():
            track = self._tracks.get(name)
            if track is None or track.cand.signature != cand.signature:
                self._tracks[name] = track = _Track(cand, since=finished)
            else:
                track.looks += 1
                track.cand = cand
            if not track.reported and self._settled(track, started, held_open):
                track.reported = True
                ready.append(cand)
        ready.sort(key=lambda c: (c.mtime_ns, c.name))
        return ready

    def _settled(self, track: _Track, at: float, held_open: HeldOpen) -> bool:
        if track.cand.kind != "regular":
            return True  # refused unread: nothing to wait for
        # The epsilon keeps float noise in clock sums from costing a whole extra look.
        if track.looks < 2 or at - track.since + 1e-9 < self.settle_seconds:
            return False
        return not held_open(track.cand.name, at)

    def next_look(self, now: float, *, interval: float, debounce: float) -> float:
        """When to look next: after `interval`, or sooner when a file's settle period ends."""
        due = now + interval
        for track in self._tracks.values():
            if track.reported or track.cand.kind != "regular":
                continue
            settle_at = track.since + self.settle_seconds
            if track.looks >= 2 and settle_at <= now:
                continue  # settled but held open by a writer: its close event wakes us
            due = min(due, max(settle_at, now + debounce))
        return due

    def pending(self) -> int:
        """Entries seen at the last look that are not offered yet (still settling or being written)."""
        return sum(1 for track in self._tracks.values() if not track.reported)

    def forget(self, name: str) -> None:
        """Offer `name` again, after settling anew."""
        self._tracks.pop(name, None)

"""SettleTracker on made-up looks and times: no threads, no clock, no files."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.inbox.scan import Candidate, Kind
from daemon.inbox.settle import HeldOpen, SettleTracker


def cand(
    name: str, *, size: int = 10, mtime_ns: int = 1, ino: int = 7, dev: int = 1, kind: Kind = "regular"
) -> Candidate:
    return Candidate(Path("/inbox") / name, name, kind, size, mtime_ns, (dev, ino))


def look(
    tracker: SettleTracker, at: float, *cands: Candidate, held_open: HeldOpen = lambda _n, _t: False
) -> list[str]:
    """One instantaneous look at time `at`; the names it made ready."""
    entries = {c.name: c for c in cands}
    return [c.name for c in tracker.update(entries, started=at, finished=at, held_open=held_open)]


def test_ready_after_two_looks_and_the_settle_time_then_never_again() -> None:
    t = SettleTracker(1.0)
    a = cand("a.json")
    assert look(t, 10.0, a) == [] and t.pending() == 1
    assert look(t, 10.5, a) == []  # two looks, but not still for long enough
    assert look(t, 11.0, a) == ["a.json"] and t.pending() == 0
    assert look(t, 50.0, a) == []  # offered once


def test_a_single_look_is_never_enough_even_with_no_settle_time() -> None:
    t = SettleTracker(0.0)
    assert look(t, 10.0, cand("a.json")) == []
    assert look(t, 10.0, cand("a.json")) == ["a.json"]


@pytest.mark.parametrize(
    "changed",
    [
        cand("a.json", size=11),
        cand("a.json", mtime_ns=2),
        cand("a.json", ino=8),  # replaced by another file of the same size and mtime
        cand("a.json", dev=2),  # the same inode number on another filesystem
    ],
)
def test_any_change_of_the_signature_restarts_the_wait(changed: Candidate) -> None:
    t = SettleTracker(1.0)
    assert look(t, 10.0, cand("a.json")) == []
    assert look(t, 10.9, changed) == []
    assert look(t, 11.5, changed) == []  # 0.6 s still: not yet
    assert look(t, 11.9, changed) == ["a.json"]


def test_settling_is_judged_at_the_start_of_a_look_and_stamped_at_its_end() -> None:
    t = SettleTracker(1.0)
    a = cand("a.json")
    # First seen by a look that ran from 9.0 to 10.0: the stat may have been as late as 10.0.
    assert [c.name for c in t.update({"a.json": a}, started=9.0, finished=10.0)] == []
    # A slow look that started at 10.9 confirms stillness only up to 10.9, however late it ends.
    assert [c.name for c in t.update({"a.json": a}, started=10.9, finished=12.0)] == []
    assert [c.name for c in t.update({"a.json": a}, started=11.0, finished=11.1)] == ["a.json"]


def test_non_regular_entries_are_ready_at_the_first_look() -> None:
    t = SettleTracker(5.0)
    ready = look(t, 10.0, cand("link.json", kind="symlink"), cand("pipe.json", kind="other"), cand("a.json"))
    assert sorted(ready) == ["link.json", "pipe.json"]
    assert t.pending() == 1


def test_a_file_held_open_waits_for_its_writer() -> None:
    t = SettleTracker(1.0)
    a = cand("a.json")
    writing = {"a.json"}

    def held_open(name: str, now: float) -> bool:
        return name in writing

    assert look(t, 10.0, a, held_open=held_open) == []
    assert look(t, 11.0, a, held_open=held_open) == []
    # Settled but held open: no timed look for it, the writer's close event brings the next one.
    assert t.next_look(11.0, interval=30.0, debounce=0.1) == 41.0
    writing.clear()
    assert look(t, 11.2, a, held_open=held_open) == ["a.json"]


def test_a_vanished_file_starts_afresh_when_it_comes_back() -> None:
    t = SettleTracker(1.0)
    assert look(t, 10.0, cand("a.json")) == []
    assert look(t, 10.5) == [] and t.pending() == 0
    assert look(t, 11.0, cand("a.json")) == []  # a first look again
    assert look(t, 12.0, cand("a.json")) == ["a.json"]


def test_forget_offers_again_after_settling_anew() -> None:
    t = SettleTracker(1.0)
    a = cand("a.json")
    look(t, 10.0, a)
    assert look(t, 11.0, a) == ["a.json"]
    t.forget("a.json")
    assert look(t, 11.5, a) == [] and t.pending() == 1
    assert look(t, 12.5, a) == ["a.json"]


def test_ready_files_come_oldest_first_then_by_name() -> None:
    t = SettleTracker(0.5)
    files = [cand("c.json", mtime_ns=0), cand("a.json", mtime_ns=2), cand("b.json", mtime_ns=1)]
    files.append(cand("d.json", mtime_ns=1))
    look(t, 10.0, *files)
    assert look(t, 10.5, *files) == ["c.json", "b.json", "d.json", "a.json"]


def test_next_look_is_when_the_first_settle_period_ends_but_not_sooner_than_the_debounce() -> None:
    t = SettleTracker(1.0)
    assert t.next_look(10.0, interval=30.0, debounce=0.1) == 40.0  # nothing tracked
    look(t, 10.0, cand("a.json"))
    look(t, 10.4, cand("a.json"), cand("b.json"))
    assert t.next_look(10.4, interval=30.0, debounce=0.1) == pytest.approx(11.0)
    assert t.next_look(10.4, interval=0.3, debounce=0.1) == pytest.approx(10.7)  # the interval is sooner
    # A first look at a file already past its settle time still needs a second: soon, not at once.
    assert t.next_look(12.0, interval=30.0, debounce=0.1) == pytest.approx(12.1)


def test_first_seen_look_comes_before_mtime() -> None:
    """Arrival order on shares: the look that first saw a file, then its mtime as first seen."""
    t = SettleTracker(0.5)
    late_mtime = cand("b.json", mtime_ns=9)
    look(t, 10.0, late_mtime)  # seen first, although its mtime is later
    early_mtime = cand("a.json", mtime_ns=1)
    look(t, 10.2, late_mtime, early_mtime)
    assert look(t, 11.0, late_mtime, early_mtime) == ["b.json", "a.json"]


def test_same_look_same_mtime_goes_by_name() -> None:
    t = SettleTracker(0.5)
    files = [cand("y.json", mtime_ns=5), cand("x.json", mtime_ns=5)]
    look(t, 10.0, *files)
    assert look(t, 10.5, *files) == ["x.json", "y.json"]


def test_a_file_changing_while_it_settles_keeps_its_place() -> None:
    """yankee is seen first and still being written when xray, seen later, has settled: xray waits."""
    t = SettleTracker(1.0)
    y1, x = cand("yankee.json", size=5, mtime_ns=5), cand("xray.json", mtime_ns=5)
    look(t, 10.0, y1)
    look(t, 10.5, y1, x)
    y2 = cand("yankee.json", size=10, mtime_ns=5)  # grew: settles anew
    assert look(t, 11.6, y2, x) == []  # xray has settled, but yankee is before it
    assert look(t, 12.6, y2, x) == ["yankee.json", "xray.json"]


def test_a_held_file_is_retried_with_back_off_and_holds_up_nobody() -> None:
    t = SettleTracker(0.5)
    held, free = cand("held.json", mtime_ns=1), cand("free.json", mtime_ns=2)
    look(t, 10.0, held)
    assert look(t, 10.5, held) == ["held.json"]
    assert t.hold("held.json", 10.5, "locked") == 1.0
    assert t.held() == {"held.json": "locked"}
    look(t, 10.6, held, free)
    assert look(t, 11.1, held, free) == ["free.json"]  # later, and not kept behind held
    assert look(t, 11.5, held, free) == ["held.json"]  # its back-off is over
    assert t.hold("held.json", 11.5, "locked") == 2.0  # doubled
    assert t.next_look(11.5, interval=30.0, debounce=0.1) == 13.5
    assert look(t, 13.0, held, free) == []
    assert look(t, 13.5, held, free) == ["held.json"]
    look(t, 14.0, free)
    look(t, 14.5, free)  # gone for a settle period: no longer held
    assert t.held() == {}


def test_a_held_file_missing_from_one_listing_comes_back_still_held() -> None:
    t = SettleTracker(1.0)
    held = cand("held.json")
    look(t, 10.0, held)
    assert look(t, 11.0, held) == ["held.json"]
    t.hold("held.json", 11.0, "locked")
    assert look(t, 11.5) == [] and t.held() == {"held.json": "locked"}  # a listing without it
    assert look(t, 12.0, held) == ["held.json"]  # back, its back-off over: not settled anew
    assert t.hold("held.json", 12.0, "locked") == 2.0  # the same back-off, going on
    look(t, 12.5)
    look(t, 13.6)  # missing for longer than a settle period: gone
    assert t.held() == {}

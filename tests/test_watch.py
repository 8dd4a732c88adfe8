"""InboxWatcher against real folders and real watchdog observers.

Settle timing is driven by a fake clock where the test controls time; where real
threads and a real observer are involved, the test runs the daemon's own loop
(poll_ready, then wait on the wake event until the watcher's next deadline) until
what it waits for is offered, instead of sleeping and hoping. Its deadline only
bounds a hung test, except where a test says what a shorter one proves.
"""

from __future__ import annotations

import errno
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import daemon.inbox.scan as scan
from daemon.inbox.fstype import Mount, choose_mode, filesystem_type, is_network_fs, mount_table
from daemon.inbox.scan import Candidate, is_candidate_name
from daemon.inbox.watch import InboxWatcher
from pipeline.settings import WatchSettings

pytestmark = pytest.mark.timeout(300)

MODES = ["inotify", "polling"]
HUNG = 60.0  # run_loop's default deadline: a hung test, never a slow machine
RESCAN = 30.0  # the live watchers' rescan interval: events, not a rescan, find a file sooner
BEFORE_RESCAN = RESCAN / 2  # found within this: the observer's events got through


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def settings(
    mode: str = "polling", *, settle: float = 0.3, poll: float = 0.1, rescan: float = RESCAN
) -> WatchSettings:
    return WatchSettings.model_validate(
        {"mode": mode, "poll_seconds": poll, "settle_seconds": settle, "rescan_seconds": rescan}
    )


def write(path: Path, text: str = '{"title": "t"}') -> Path:
    path.write_text(text)
    return path


def run_loop(
    watcher: InboxWatcher,
    wake: threading.Event,
    until: Callable[[list[Candidate]], bool],
    timeout: float = HUNG,
) -> list[Candidate]:
    """The daemon's main loop, bounded: everything offered until `until(offered)` holds."""
    offered: list[Candidate] = []
    give_up = time.monotonic() + timeout
    while True:
        offered.extend(watcher.poll_ready())
        if until(offered):
            return offered
        left = give_up - time.monotonic()
        if left <= 0:
            raise AssertionError(
                f"gave up after {timeout}s; offered {[c.name for c in offered]}, error={watcher.error}"
            )
        wake.wait(watcher.seconds_until_next(cap=left))
        wake.clear()


def run_for(watcher: InboxWatcher, wake: threading.Event, seconds: float) -> list[Candidate]:
    """Run the loop for a fixed time; for checking that something is *not* offered."""
    offered: list[Candidate] = []
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        offered.extend(watcher.poll_ready())
        wake.wait(watcher.seconds_until_next(cap=left))
        wake.clear()
    return offered


def names(cands: list[Candidate]) -> list[str]:
    return [c.name for c in cands]


def has(*wanted: str) -> Callable[[list[Candidate]], bool]:
    return lambda offered: set(wanted) <= set(names(offered))


def write_slowly(target: Path, pause: float, paced: dict[str, float]) -> None:
    """Append ten lines, `pause` apart, the file held open; record in `paced` how long any
    state of the file lasted at most (from before the call that made it to after the call
    that ended it) and when the last write began."""
    paced["longest"], before = 0.0, time.monotonic()
    with target.open("w") as fh:
        for i in range(10):
            paced["last_write"] = time.monotonic()
            fh.write(f'{{"chunk": {i}}}\n')
            fh.flush()
            now = time.monotonic()
            paced["longest"], before = max(paced["longest"], now - before), now
            time.sleep(pause)  # the writer's own pace; not synchronisation


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    box = tmp_path / "inbox"
    box.mkdir()
    return box


@pytest.fixture
def live(inbox: Path, request: pytest.FixtureRequest) -> Iterator[tuple[InboxWatcher, threading.Event]]:
    """A started watcher on the real clock; parametrised by mode via indirect params."""
    mode, settle = request.param if isinstance(request.param, tuple) else (request.param, 0.2)
    wake = threading.Event()
    watcher = InboxWatcher(inbox, settings(mode, settle=settle), wake=wake)
    watcher.start()
    assert watcher.mode == mode
    yield watcher, wake
    watcher.stop()


# ----------------------------------------------------------------------- names


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("story.json", True),
        ("STORY.JSON", True),
        ("Story.Json", True),
        ("my story (2).json", True),
        ("story.json.tmp", False),
        ("story.json.part", False),
        ("story.json.partial", False),
        ("story.json.crdownload", False),
        ("story.json.filepart", False),
        ("story.json.!sync", False),
        ("story.json.swp", False),
        ("story.json~", False),
        ("~$story.json", False),
        ("~story.json", False),
        (".~lock.story.json#", False),
        (".story.json", False),
        (".goutputstream-ABC123", False),
        (".json", False),
        ("story.txt", False),
        ("story.jsonl", False),
        ("story", False),
        ("", False),
    ],
)
def test_candidate_names(name: str, ok: bool) -> None:
    assert is_candidate_name(name) is ok


# ---------------------------------------------------------------- filesystems

# As psutil.disk_partitions(all=True) gives them: in mount order, mount points unescaped.
FAKE_MOUNTS: list[Mount] = [
    ("/", "ext4"),
    ("/srv/share", "nfs4"),
    ("/srv/share2", "cifs"),
    ("/srv/with space", "fuse.sshfs"),
    ("/srv/local", "tmpfs"),
    ("/srv/local", "xfs"),  # stacked on top: this one is visible
    ("/srv/usb", "fuseblk"),
]


@pytest.mark.parametrize(
    ("path", "fstype", "mode"),
    [
        ("/srv/share/inbox", "nfs4", "polling"),
        ("/srv/share", "nfs4", "polling"),
        ("/srv/share2/inbox", "cifs", "polling"),  # not swallowed by the /srv/share prefix
        ("/srv/sharex/inbox", "ext4", "inotify"),
        ("/srv/with space/inbox", "fuse.sshfs", "polling"),
        ("/srv/local/inbox", "xfs", "inotify"),
        ("/srv/usb/inbox", "fuseblk", "inotify"),
        ("/var/lib/storyreel", "ext4", "inotify"),
    ],
)
def test_filesystem_type_and_auto_mode_on_fake_table(path: str, fstype: str, mode: str) -> None:
    # Paths under a folder that does not exist, so realpath leaves them alone.
    assert filesystem_type(Path(path), FAKE_MOUNTS) == fstype
    assert choose_mode("auto", Path(path), FAKE_MOUNTS) == mode


def test_choose_mode_explicit_and_unknown() -> None:
    assert choose_mode("inotify", Path("/srv/share/x"), FAKE_MOUNTS) == "inotify"
    assert choose_mode("polling", Path("/srv/local/x"), FAKE_MOUNTS) == "polling"
    assert filesystem_type(Path("/x"), []) == "unknown"
    assert choose_mode("auto", Path("/x"), []) == "polling"  # in doubt: the mode that is always right
    with pytest.raises(ValueError):
        choose_mode("fast", Path("/x"))


@pytest.mark.parametrize(
    ("fstype", "remote"),
    [
        ("nfs", True),
        ("nfs4", True),
        ("cifs", True),
        ("smb3", True),
        ("fuse.sshfs", True),
        ("fuse.rclone", True),
        ("9p", True),
        ("virtiofs", True),
        ("ceph", True),
        ("ext4", False),
        ("xfs", False),
        ("btrfs", False),
        ("tmpfs", False),
        ("overlay", False),
        ("fuseblk", False),
    ],
)
def test_is_network_fs(fstype: str, remote: bool) -> None:
    assert is_network_fs(fstype) is remote


def test_filesystem_type_on_this_machine(tmp_path: Path) -> None:
    assert mount_table(), "psutil could not read this machine's mount table"
    # The kernel's own table; "/" and "/dev/shm" need no unescaping.
    kernel = [line.split(" ")[1:3] for line in Path("/proc/self/mounts").read_text().splitlines()]
    assert filesystem_type(Path("/")) == [fstype for point, fstype in kernel if point == "/"][-1]
    tmpfs = [point for point, fstype in kernel if fstype == "tmpfs" and os.access(point, os.W_OK)]
    if "/dev/shm" in tmpfs:
        assert filesystem_type(Path("/dev/shm/nonexistent/inbox")) == "tmpfs"
        assert choose_mode("auto", Path("/dev/shm")) == "inotify"
    assert choose_mode("auto", tmp_path) in ("inotify", "polling")


# --------------------------------------------------------- settling (fake clock)


def test_settle_needs_two_looks_and_settle_time(inbox: Path) -> None:
    clock = FakeClock()
    w = InboxWatcher(inbox, settings(settle=1.0, poll=5.0, rescan=10.0), clock=clock)
    write(inbox / "a.json")
    assert w.pending() == 0  # nothing looked at yet
    assert w.poll_ready() == []  # first look
    assert w.pending() == 1
    deadline = w.next_deadline()
    assert deadline is not None and deadline == pytest.approx(clock.now + 1.0)
    clock.advance(0.5)
    assert w.poll_ready() == []  # no look due yet
    clock.advance(0.5)
    ready = w.poll_ready()
    assert names(ready) == ["a.json"] and w.pending() == 0
    assert ready[0].kind == "regular" and ready[0].detail == ""
    clock.advance(5)
    w.request_rescan()
    assert w.poll_ready() == []  # offered once only


def test_change_before_settled_restarts_the_wait(inbox: Path) -> None:
    clock = FakeClock()
    w = InboxWatcher(inbox, settings(settle=1.0), clock=clock)
    f = write(inbox / "a.json", '{"title":')
    assert w.poll_ready() == []
    clock.advance(0.9)
    with f.open("a") as fh:
        fh.write('"x"}')
    clock.advance(0.2)
    assert w.poll_ready() == []  # changed: a new first look
    clock.advance(0.9)
    assert w.poll_ready() == []
    clock.advance(0.1)
    ready = w.poll_ready()
    assert names(ready) == ["a.json"] and ready[0].size == len('{"title":"x"}')


def test_rewritten_after_offer_is_offered_again(inbox: Path) -> None:
    clock = FakeClock()
    w = InboxWatcher(inbox, settings(settle=0.5), clock=clock)
    f = write(inbox / "a.json")
    w.poll_ready()
    clock.advance(0.5)
    assert names(w.poll_ready()) == ["a.json"]
    f.write_text('{"title": "second version"}')
    clock.advance(0.1)
    w.request_rescan()
    assert w.poll_ready() == []
    clock.advance(0.5)
    assert names(w.poll_ready()) == ["a.json"]


def test_forget_offers_again_after_settling(inbox: Path) -> None:
    clock = FakeClock()
    w = InboxWatcher(inbox, settings(settle=0.5), clock=clock)
    write(inbox / "a.json")
    w.poll_ready()
    clock.advance(0.5)
    assert names(w.poll_ready()) == ["a.json"]
    w.forget("a.json")
    clock.advance(0.1)
    assert w.poll_ready() == []  # a first look again
    clock.advance(0.5)
    assert names(w.poll_ready()) == ["a.json"]


def test_arrival_order_is_mtime_then_name(inbox: Path) -> None:
    clock = FakeClock()
    w = InboxWatcher(inbox, settings(settle=0.5), clock=clock)
    base = 1_700_000_000_000_000_000
    for name, offset in [("c.json", 0), ("a.json", 2), ("b.json", 1), ("d.json", 1)]:
        f = write(inbox / name)
        os.utime(f, ns=(base + offset, base + offset))
    w.poll_ready()
    clock.advance(0.5)
    assert names(w.poll_ready()) == ["c.json", "b.json", "d.json", "a.json"]


def test_symlink_fifo_and_directory(inbox: Path, tmp_path: Path) -> None:
    clock = FakeClock()
    w = InboxWatcher(inbox, settings(settle=5.0), clock=clock, scan_timeout_seconds=5.0)
    secret = write(tmp_path / "secret.json")
    (inbox / "link.json").symlink_to(secret)
    (inbox / "dirlink.json").symlink_to(tmp_path)
    (inbox / "dangling.json").symlink_to(tmp_path / "missing")
    os.mkfifo(inbox / "pipe.json")  # no writer: opening it would block forever
    (inbox / "folder.json").mkdir()
    ready = w.poll_ready()  # non-regular entries need no settling
    by_name = {c.name: c for c in ready}
    assert set(by_name) == {"link.json", "dirlink.json", "dangling.json", "pipe.json"}
    assert w.error is None
    for name in ("link.json", "dirlink.json", "dangling.json"):
        assert by_name[name].kind == "symlink" and by_name[name].detail == ""
    assert by_name["pipe.json"].kind == "other"
    assert by_name["pipe.json"].detail == "fifo"
    clock.advance(10)
    w.request_rescan()
    assert w.poll_ready() == []


def test_candidate_unchanged_guard(inbox: Path) -> None:
    clock = FakeClock()
    w = InboxWatcher(inbox, settings(settle=0.0), clock=clock)
    f = write(inbox / "a.json")
    w.poll_ready()
    clock.advance(0.2)
    (cand,) = w.poll_ready()
    assert cand.unchanged()
    f.write_text('{"title": "longer than before"}')
    assert not cand.unchanged()
    f.unlink()
    assert not cand.unchanged()


def test_missing_inbox_is_an_error_not_an_exception(tmp_path: Path) -> None:
    clock = FakeClock()
    box = tmp_path / "later"
    w = InboxWatcher(box, settings(), clock=clock)
    w.start()
    try:
        assert w.poll_ready() == []
        assert w.error is not None and "unavailable" in w.error and "ENOENT" in w.error
        box.mkdir()
        write(box / "a.json")
        clock.advance(0.1)  # poll_seconds: the retry interval
        assert w.poll_ready() == []
        assert w.error is None
        clock.advance(0.3)
        assert names(w.poll_ready()) == ["a.json"]
    finally:
        w.stop()


def test_hung_scan_reports_and_recovers(inbox: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    real_scan = scan.scan_inbox

    def stuck_scan(path: Path, beat: Callable[[], None] | None = None) -> scan.InboxScan:
        release.wait(HUNG)
        return real_scan(path)

    monkeypatch.setattr(scan, "scan_inbox", stuck_scan)
    wake = threading.Event()
    w = InboxWatcher(inbox, settings(settle=0.0), wake=wake, scan_timeout_seconds=0.05)
    write(inbox / "a.json")
    assert w.poll_ready() == []
    assert w.error is not None and "not responding" in w.error
    wake.clear()
    assert w.poll_ready() == []  # checking again does not block or start a second scan
    release.set()
    assert wake.wait(HUNG)  # the late scan wakes the main loop
    monkeypatch.setattr(scan, "scan_inbox", real_scan)
    offered = run_loop(w, wake, has("a.json"))
    assert w.error is None and names(offered) == ["a.json"]


# ------------------------------------------------------- real observers, both modes


@pytest.mark.parametrize("live", MODES, indirect=True)
def test_write_then_rename(live: tuple[InboxWatcher, threading.Event], inbox: Path) -> None:
    watcher, wake = live
    tmp = write(inbox / "story.json.part", '{"title": "renamed"}')
    assert run_for(watcher, wake, 0.3) == []
    tmp.rename(inbox / "story.json")
    offered = run_loop(watcher, wake, has("story.json"))
    assert names(offered) == ["story.json"] and offered[0].size == len('{"title": "renamed"}')


@pytest.mark.parametrize("mode", MODES)
def test_slow_in_place_writer_is_not_taken_early(tmp_path: Path, mode: str) -> None:
    """A writer appending slower than polling but faster than settling is waited for.

    The writer's pace is measured, not assumed: had this process starved it between two writes
    for the settle time or longer, offering the file then would be right, so the test tries
    again with a longer settle time instead of blaming the watcher.
    """
    settle, longest = 0.4, float("inf")
    while longest >= settle:
        assert settle < RESCAN, f"the writer was starved for {longest:.1f}s between two writes at every try"
        inbox = tmp_path / f"inbox-{settle:g}"
        inbox.mkdir()
        target = inbox / "slow.json"
        wake = threading.Event()
        watcher = InboxWatcher(inbox, settings(mode, settle=settle), wake=wake)
        watcher.start()
        assert watcher.mode == mode
        paced: dict[str, float] = {}
        t = threading.Thread(target=write_slowly, args=(target, settle / 4, paced))
        t.start()
        try:
            offered = run_loop(watcher, wake, has("slow.json"))
            offered_at = time.monotonic()
        finally:
            t.join()
            watcher.stop()
        longest = paced["longest"]
        if longest >= settle:
            settle *= 4
    final_size = target.stat().st_size
    assert offered[0].size == final_size, "offered while the writer was still appending"
    # Settling is measured from a look that saw the final size, so it cannot come sooner.
    assert offered_at - paced["last_write"] >= settle


@pytest.mark.parametrize("live", MODES, indirect=True)
def test_files_present_at_start_up(inbox: Path, live: tuple[InboxWatcher, threading.Event]) -> None:
    watcher, _ = live
    # The fixture started the watcher on an empty inbox; a fresh watcher sees these as existing files.
    write(inbox / "old1.json")
    write(inbox / "old2.json")
    fresh_wake = threading.Event()
    fresh = InboxWatcher(inbox, settings(watcher.mode, settle=0.2), wake=fresh_wake)
    fresh.start()
    try:
        offered = run_loop(fresh, fresh_wake, has("old1.json", "old2.json"))
        assert sorted(names(offered)) == ["old1.json", "old2.json"]
    finally:
        fresh.stop()


@pytest.mark.parametrize("mode", MODES)
def test_burst_of_1000_files(inbox: Path, mode: str) -> None:
    wake = threading.Event()
    w = InboxWatcher(inbox, settings(mode, settle=0.2, rescan=1.0), wake=wake)
    w.start()
    try:
        wanted = {f"s{i:04d}.json" for i in range(1000)}
        for name in wanted:
            write(inbox / name)
        offered = run_loop(w, wake, lambda got: wanted <= set(names(got)))
        assert len(offered) == 1000 and set(names(offered)) == wanted
    finally:
        w.stop()


@pytest.mark.parametrize("live", MODES, indirect=True)
def test_inbox_removed_and_recreated(live: tuple[InboxWatcher, threading.Event], inbox: Path) -> None:
    watcher, wake = live
    write(inbox / "before.json")
    run_loop(watcher, wake, has("before.json"))
    shutil.rmtree(inbox)
    run_loop(watcher, wake, lambda _: watcher.error is not None)
    assert not watcher.observer_alive
    inbox.mkdir()
    run_loop(watcher, wake, lambda _: watcher.error is None and watcher.observer_alive)
    # Found before a rescan would find it: the new observer's events got through.
    write(inbox / "after.json")
    offered = run_loop(watcher, wake, has("after.json"), timeout=BEFORE_RESCAN)
    assert names(offered) == ["after.json"]


@pytest.mark.parametrize("live", MODES, indirect=True)
def test_dead_observer_is_restarted(live: tuple[InboxWatcher, threading.Event], inbox: Path) -> None:
    watcher, wake = live
    assert watcher.observer_alive and watcher.restarts == 0
    observer = watcher.supervisor.observer
    assert observer is not None
    observer.stop()
    observer.join(5)
    run_loop(watcher, wake, lambda _: watcher.observer_alive)
    assert watcher.restarts == 1 and watcher.supervisor.observer is not observer
    write(inbox / "after.json")
    offered = run_loop(watcher, wake, has("after.json"), timeout=BEFORE_RESCAN)  # the new observer's events
    assert names(offered) == ["after.json"]


@pytest.mark.parametrize("live", [("inotify", 0.2)], indirect=True)
def test_inotify_waits_for_close_write(live: tuple[InboxWatcher, threading.Event], inbox: Path) -> None:
    watcher, wake = live
    target = inbox / "held.json"
    with target.open("w") as fh:
        fh.write('{"title": "held open"}')
        fh.flush()
        # Settled by size and mtime long ago, but the writer has not closed it.
        assert run_for(watcher, wake, 0.8) == []
    offered = run_loop(watcher, wake, has("held.json"), timeout=BEFORE_RESCAN)  # the close_write event
    assert names(offered) == ["held.json"]


def test_stopped_watcher_has_no_deadline(inbox: Path) -> None:
    w = InboxWatcher(inbox, settings())
    w.start()
    assert w.next_deadline() is not None
    w.stop()
    assert w.next_deadline() is None
    assert not w.observer_alive


def test_inbox_swapped_under_a_live_inotify_watch(inbox: Path) -> None:
    """Renamed away and replaced: the old watch follows the old folder and stays alive, so
    only the rescan's inode check can notice; it must move the watch to the new folder."""
    wake = threading.Event()
    w = InboxWatcher(inbox, settings("inotify", settle=0.1, poll=0.1, rescan=0.3), wake=wake)
    w.start()
    try:
        run_loop(w, wake, lambda _: w.observer_alive)
        inbox.rename(inbox.with_name("inbox.old"))
        inbox.mkdir()
        run_loop(w, wake, lambda _: w.restarts == 1 and w.observer_alive)
        write(inbox / "new.json")
        assert names(run_loop(w, wake, has("new.json"))) == ["new.json"]
    finally:
        w.stop()


def test_out_of_inotify_watches_falls_back_to_polling_for_good(
    inbox: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import watchdog.observers.inotify as inotify  # Linux only

    def no_watches() -> None:
        raise OSError(errno.ENOSPC, "inotify watch limit reached")

    monkeypatch.setattr(inotify, "InotifyObserver", no_watches)
    wake = threading.Event()
    w = InboxWatcher(inbox, settings("inotify", settle=0.1), wake=wake)
    w.start()
    try:
        assert w.mode == "polling" and w.observer_alive
        monkeypatch.undo()  # inotify would work again, but a restart stays on polling
        observer = w.supervisor.observer
        assert observer is not None
        observer.stop()
        observer.join(5)
        run_loop(w, wake, lambda _: w.restarts == 1 and w.observer_alive)
        assert w.mode == "polling"
        write(inbox / "a.json")
        assert names(run_loop(w, wake, has("a.json"))) == ["a.json"]
    finally:
        w.stop()

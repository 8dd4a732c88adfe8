"""FolderGuard: a share folder that vanished, is now on another mount, or hangs."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from daemon.inbox import folders
from daemon.inbox.folders import FolderGone, FolderGuard
from daemon.system.share import NotAnswering, Shares


def test_a_healthy_folder_has_no_problem(tmp_path: Path) -> None:
    guard = FolderGuard({"outbox": tmp_path})
    assert guard.problems() == {}
    guard.require("outbox")


def test_a_vanished_folder_is_named_with_the_reason(tmp_path: Path) -> None:
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    guard = FolderGuard({"inbox": tmp_path, "outbox": outbox})
    outbox.rmdir()
    problems = guard.problems()
    assert list(problems) == ["outbox"] and str(outbox) in problems["outbox"] and "gone" in problems["outbox"]
    with pytest.raises(FolderGone) as err:
        guard.require("outbox")
    assert err.value.filename == str(outbox)
    outbox.mkdir()  # back on the same filesystem
    assert guard.problems() == {}


def test_a_mount_point_now_on_another_filesystem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The share unmounted: the mount point is the bare folder under it, on the parent's filesystem."""
    share = str(tmp_path)
    monkeypatch.setattr(folders, "mount_table", lambda: [("/", "ext4"), (share, "fuse.rclone")])
    guard = FolderGuard({"outbox": tmp_path})
    assert guard.problems() == {}
    monkeypatch.setattr(folders, "mount_table", lambda: [("/", "ext4")])
    problem = guard.problems()["outbox"]
    assert "another filesystem" in problem and "ext4 at /" in problem and "fuse.rclone" in problem
    monkeypatch.setattr(folders, "mount_table", lambda: [("/", "ext4"), (share, "fuse.rclone")])
    assert guard.problems() == {}  # remounted: the same folder again, whatever its new st_dev


def test_a_folder_that_hangs_is_not_gone_and_never_holds_the_caller(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stat that hangs (a share that stopped answering): nothing here says the folder is gone
    (nobody can tell), its Share says it is not answering, the caller is held at most the
    deadline once, and no second stat piles onto the hung one."""
    before = set(threading.enumerate())  # (other tests' idle lanes live on in this process)
    shares = Shares({"outbox": tmp_path}, deadline=0.1)
    guard = FolderGuard({"outbox": tmp_path}, shares)
    release = threading.Event()
    real_stat = os.stat
    calls = []

    def hanging_stat(path: str | Path, **kw: bool) -> os.stat_result:
        if str(path) == str(tmp_path) and threading.current_thread().name == "storyreel-outbox-probe":
            calls.append(path)
            release.wait(10)
        return real_stat(path, **kw)

    monkeypatch.setattr(folders.os, "stat", hanging_stat)
    started = time.monotonic()
    assert guard.problems() == {}
    assert "not answering" in str(shares["outbox"].reason())
    assert guard.problems() == {}  # looked at again without waiting
    with pytest.raises(NotAnswering):
        guard.require("outbox")
    assert time.monotonic() - started < 5.0
    assert len(calls) == 1  # no second stat piled onto the hung one
    ours = [t for t in set(threading.enumerate()) - before if t.name.startswith("storyreel-outbox")]
    assert len(ours) <= 2, ours
    release.set()
    deadline = time.monotonic() + 10
    while shares["outbox"].reason() is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert shares["outbox"].reason() is None and guard.problems() == {}
    guard.require("outbox")

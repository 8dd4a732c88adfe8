"""Is each configured share folder still on the filesystem it was on at start?

An unmounted share leaves a bare mount point: a folder on this machine's own
disk. Whatever is written there is hidden once the share comes back, and nobody
else ever sees it. So at start the daemon records which mount holds the inbox
and the outbox (mount point and filesystem type, from the kernel's mount table),
and before writing there it asks whether each folder is still there and still
held by that mount. A folder that vanished (the share mounted above it went),
or that is now held by another mount (it was itself the mount point, and is now
the bare folder under it), means `waiting`, with the reason, until it is back.
A remount of the same share on the same point is the same folder again, although
FUSE and NFS give it a new st_dev; so st_dev is compared only where the mount
table cannot be read.

A share that stopped answering can hang a stat in the kernel, so each stat runs
on a throw-away daemon thread and is waited for with a deadline (daemon/system/deadline.py,
as for the inbox scan): the caller is never held past it. Reading the mount
table does no I/O on the share.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

from daemon.inbox.fstype import Mount, mount_holding, mount_table
from daemon.system.deadline import on_thread

STAT_DEADLINE_SECONDS = 2.0


class FolderGone(OSError):
    """A share folder is not the one the daemon started with; errno ENODEV (not the story's fault)."""

    def __init__(self, reason: str, folder: Path) -> None:
        super().__init__(errno.ENODEV, reason, str(folder))


def _stat_dev(path: str) -> Future[int]:
    return on_thread(lambda: os.stat(path).st_dev, "storyreel-folder-stat")


class _Folder:
    def __init__(self, key: str, path: Path, mounts: Sequence[Mount] | None) -> None:
        self.key, self.path = key, path
        self.real = os.path.realpath(path)  # resolved once, at start: later looks do no lookups
        self.dev = os.stat(self.real).st_dev
        self.mount = mount_holding(self.real, mounts) if mounts is not None else None
        self.stuck: Future[int] | None = None  # a stat that outlived its deadline, still running


class FolderGuard:
    """Records which mount holds each folder at start; `problems()` says what changed since."""

    def __init__(self, folders: dict[str, Path], deadline: float = STAT_DEADLINE_SECONDS) -> None:
        self.deadline = deadline
        mounts = mount_table()
        self._folders = [_Folder(key, path, mounts) for key, path in folders.items()]

    def problems(self) -> dict[str, str]:
        """What is wrong with each folder, in words, by key; empty while all are the ones from start."""
        mounts = mount_table()
        found = {}
        for folder in self._folders:
            reason = self._check(folder, mounts)
            if reason is not None:
                found[folder.key] = reason
        return found

    def require(self, key: str) -> None:
        """Raise FolderGone unless folder `key` is the one from start (call before writing there)."""
        folder = next(f for f in self._folders if f.key == key)
        reason = self._check(folder, mount_table())
        if reason is not None:
            raise FolderGone(reason, folder.path)

    def _check(self, folder: _Folder, mounts: Sequence[Mount] | None) -> str | None:
        where = f"{folder.key} {folder.path}"
        fut = folder.stuck or _stat_dev(folder.real)
        try:
            dev = fut.result(timeout=0 if folder.stuck else self.deadline)
        except FutureTimeout:
            folder.stuck = fut  # looked at again next time, without starting another stat
            return f"{where} not responding (a stat took over {self.deadline:g}s)"
        except OSError as err:
            folder.stuck = None
            return f"{where} is gone ({err.strerror or err}; is the share mounted?)"
        folder.stuck = None
        if folder.mount is not None and mounts is not None:
            now = mount_holding(folder.real, mounts)
            if now != folder.mount:
                was = f"{folder.mount[1]} at {folder.mount[0]}"
                is_ = f"{now[1]} at {now[0]}" if now else "no mount"
                return f"{where} is on another filesystem ({is_}, was {was}): is the share mounted?"
        elif dev != folder.dev:
            return f"{where} is on another device than at start: is the share mounted?"
        return None

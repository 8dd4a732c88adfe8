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

A share that stopped answering hangs a stat in the kernel, so every look here runs on the
folder's probe lane (daemon/system/share.py) and is waited for with a deadline: the caller is
never held past it. A folder that does not answer is not "gone": nothing here can tell, and
its Share says it is not answering; `problems()` leaves it out, `require` raises NotAnswering.
Reading the mount table does no I/O on the share.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from pathlib import Path

from daemon.inbox.fstype import Mount, mount_holding, mount_table
from daemon.system.share import NotAnswering, Share, Shares


class FolderGone(OSError):
    """A share folder is not the one the daemon started with; errno ENODEV (not the story's fault)."""

    def __init__(self, reason: str, folder: Path) -> None:
        super().__init__(errno.ENODEV, reason, str(folder))


class _Folder:
    def __init__(self, key: str, path: Path, share: Share, mounts: Sequence[Mount] | None) -> None:
        """Raises NotAnswering when the folder does not answer at start (the caller waits for it)."""
        self.key, self.path, self.share = key, path, share
        # Resolved once, at start: later looks do no lookups.
        self.real, self.dev = share.look(lambda: _resolve(path), "a look at the folder")
        self.mount = mount_holding(self.real, mounts) if mounts is not None else None


def _resolve(path: Path) -> tuple[str, int]:
    real = os.path.realpath(path)
    return real, os.stat(real).st_dev


class FolderGuard:
    """Records which mount holds each folder at start; `problems()` says what changed since."""

    def __init__(self, folders: dict[str, Path], shares: Shares | None = None) -> None:
        """`shares`: each folder's Share, by key (its own, when none is given). Raises NotAnswering
        when a folder does not answer at start."""
        shares = shares or Shares(folders)
        mounts = mount_table()
        self._folders = [_Folder(key, path, shares[key], mounts) for key, path in folders.items()]

    def problems(self) -> dict[str, str]:
        """What is wrong with each folder, in words, by key; empty while all are the ones from start
        (or do not answer: their Share says so)."""
        mounts = mount_table()
        found = {}
        for folder in self._folders:
            try:
                reason = self._check(folder, mounts)
            except NotAnswering:
                continue
            if reason is not None:
                found[folder.key] = reason
        return found

    def require(self, key: str) -> None:
        """Raise FolderGone unless folder `key` is the one from start (call before writing there);
        NotAnswering when it does not answer. From any thread."""
        folder = next((f for f in self._folders if f.key == key), None)
        if folder is None:  # not guarded (none recorded yet, or a tool's guard)
            return
        reason = self._check(folder, mount_table())
        if reason is not None:
            raise FolderGone(reason, folder.path)

    def _check(self, folder: _Folder, mounts: Sequence[Mount] | None) -> str | None:
        where = f"{folder.key} {folder.path}"
        try:
            dev = folder.share.look(lambda: os.stat(folder.real).st_dev, "a look at the folder")
        except NotAnswering:
            raise
        except OSError as err:
            return f"{where} is gone ({err.strerror or err}; is the share mounted?)"
        if folder.mount is not None and mounts is not None:
            now = mount_holding(folder.real, mounts)
            if now != folder.mount:
                was = f"{folder.mount[1]} at {folder.mount[0]}"
                is_ = f"{now[1]} at {now[0]}" if now else "no mount"
                return f"{where} is on another filesystem ({is_}, was {was}): is the share mounted?"
        elif dev != folder.dev:
            return f"{where} is on another device than at start: is the share mounted?"
        return None

"""Which filesystem holds the inbox, and so which watch mode can be trusted there.

inotify only reports what passes through this machine's VFS: a file another host
writes to an NFS or SMB share raises no event here. `watch.mode = "auto"` therefore
uses polling on network filesystems, and whenever the type cannot be told.
The mount table comes from `psutil.disk_partitions(all=True)`, which reads the
kernel's table (unescaping mount points with spaces) and keeps its order.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import psutil

Mode = Literal["inotify", "polling"]
Mount = tuple[str, str]  # (mount point, fstype), in mount order

# Filesystems where inotify does not see changes made by other machines (or by the
# VM host): the kernel only reports what passes through this machine's VFS.
# Polling is always correct, only slower, so anything doubtful belongs here.
#  - virtiofs / 9p / vboxsf / vmhgfs: shared folders of a VM; files the host writes
#    raise no inotify event in the guest, exactly like NFS.
#  - gfs2 / ocfs2: cluster filesystems on a shared disk; other nodes' writes are
#    invisible to this node's inotify.
#  - every FUSE filesystem ("fuse", "fuse.sshfs", "fuse.rclone", "fuse.s3fs", ...)
#    except "fuseblk" (ntfs-3g, exfat on a local disk, changed only through us).
NETWORK_FILESYSTEMS: frozenset[str] = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "smbfs",
        "ncpfs",
        "ncp",
        "9p",
        "ceph",
        "glusterfs",
        "afs",
        "coda",
        "lustre",
        "gpfs",
        "beegfs",
        "orangefs",
        "pvfs2",
        "panfs",
        "davfs",
        "sshfs",
        "s3fs",
        "gfs2",
        "ocfs2",
        "virtiofs",
        "vboxsf",
        "vmhgfs",
        "prl_fs",
        "fuse",
    }
)


def mount_table() -> list[Mount] | None:
    """This machine's mounts, or None when they cannot be read (no /proc, a sandbox)."""
    try:
        return [(part.mountpoint, part.fstype) for part in psutil.disk_partitions(all=True)]
    except (OSError, psutil.Error):
        return None


def _is_under(path: str, mount_point: str) -> bool:
    if mount_point == "/":
        return path.startswith("/")
    return path == mount_point or path.startswith(mount_point.rstrip("/") + "/")


def filesystem_type(path: Path, mounts: Sequence[Mount] | None = None) -> str:
    """The fstype of the mount holding `path` ("unknown" where that cannot be told).

    Uses the longest mount-point prefix of the resolved path; of mounts stacked on
    the same point the last one listed is the visible one. A path that does not
    exist yet resolves through its existing parents, which is what a later mkdir
    would land on. `mounts` defaults to `mount_table()`; tests pass any table.
    """
    if mounts is None:
        mounts = mount_table()
        if mounts is None:
            return "unknown"
    best = mount_holding(os.path.realpath(path), mounts)
    return best[1] if best is not None else "unknown"


def mount_holding(real: str, mounts: Sequence[Mount]) -> Mount | None:
    """The mount holding the resolved path `real`: no I/O, so safe on a share that hangs."""
    best: Mount | None = None
    for mount in mounts:
        if _is_under(real, mount[0]) and (best is None or len(mount[0]) >= len(best[0])):
            best = mount
    return best


def is_network_fs(fstype: str) -> bool:
    """Whether changes on this filesystem may bypass this machine's inotify."""
    kind = fstype.lower()
    return kind in NETWORK_FILESYSTEMS or kind.startswith("fuse.")


def choose_mode(mode: str, inbox: Path, mounts: Sequence[Mount] | None = None) -> Mode:
    """Resolve "auto": inotify on local filesystems, polling on shares and when in doubt."""
    if mode == "inotify":
        return "inotify"
    if mode == "polling":
        return "polling"
    if mode != "auto":
        raise ValueError(f"unknown watch mode {mode!r}")
    if not sys.platform.startswith("linux"):
        return "polling"
    fstype = filesystem_type(inbox, mounts)
    if fstype == "unknown" or is_network_fs(fstype):
        return "polling"
    return "inotify"


def mode_reason(setting: str, fstype: str, chosen: Mode) -> str:
    """Why `chosen` is the watch mode, in words, for the start-up log."""
    if setting != "auto":
        return f'watch.mode = "{setting}" in the config'
    if not sys.platform.startswith("linux"):
        return "auto: inotify is Linux only"
    if fstype == "unknown":
        return "auto: the inbox's filesystem type cannot be told, and polling is always correct"
    if is_network_fs(fstype):
        return (
            f"auto: the inbox is on {fstype}, a network or FUSE filesystem: "
            "changes made by other machines raise no inotify event here"
        )
    return f"auto: the inbox is on {fstype}, a local filesystem: inotify sees every change"

"""A mistake in how a command is called gets one line saying what to do, and exit status 2."""

from __future__ import annotations

import grp
import os
from pathlib import Path


class UsageError(Exception):
    """A mistake the user can fix (a missing file, a bad option): one line, exit 2."""


def permission_hint(path: Path) -> str:
    """Name the first folder on the way that shuts this user out, and the group that may enter.

    The unit keeps /var/lib/storyreel at 0750 (StateDirectoryMode=) for its Group=storyreel.
    """
    closed = next((p for p in [*reversed(path.parents), path] if not os.access(p, os.R_OK | os.X_OK)), path)
    try:
        gid = closed.stat().st_gid
        group = grp.getgrgid(gid).gr_name
    except (OSError, KeyError):
        gid, group = -1, "storyreel"
    if gid == 0:
        return f"cannot read {closed}: permission denied (it is root's); run this with sudo"
    return (
        f"cannot read {closed}: permission denied; it is for group {group}: "
        f"join it (sudo usermod -aG {group} $USER, then log in again) or use sudo"
    )

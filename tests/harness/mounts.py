"""Small real filesystems for tests that fill a disk: a tmpfs mounted over a test's folder.

Mounting needs root (CAP_SYS_ADMIN). Where it is not allowed a test skips, naming the reason;
under CI (which runs as root) it fails instead, so the case is never silently lost there.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest


def tmpfs_refusal(folder: Path, size: str, role: str) -> str | None:
    """Mount a tmpfs of `size` on `folder` (unmount it with `umount`); None when mounted, else
    why not (a test that goes on without the mount reports it). Fails the test under CI."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        out = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(folder)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except OSError as err:
        reason = str(err)
    else:
        if out.returncode == 0:
            return None
        reason = out.stderr.strip() or f"exit {out.returncode}"
    message = f"cannot mount a {size} tmpfs as {role} ({reason}); this test needs root (CAP_SYS_ADMIN)"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    return message


def mount_tmpfs(folder: Path, size: str, role: str) -> None:
    """As `tmpfs_refusal`, skipping the test where the mount is refused."""
    refused = tmpfs_refusal(folder, size, role)
    if refused is not None:
        pytest.skip(refused)

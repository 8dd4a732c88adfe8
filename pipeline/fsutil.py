"""Durable, atomic file writes: the one naming rule everything else relies on.

Write under a temporary name in the destination's own folder, fsync the file,
rename it over the final name, fsync the folder. A reader (or a crash) sees the
old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError:  # some network filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def temp_name(final: Path, tag: str = "part") -> Path:
    return final.with_name(f".{final.name}.{os.getpid()}.{tag}")


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside `final` to write by name (e.g. for ffmpeg); on success it is
    fsynced and renamed over `final`, on error it is removed."""
    final = Path(final)
    tmp = temp_name(final)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(final.parent)


@contextlib.contextmanager
def atomic_writer(final: Path) -> Iterator[BinaryIO]:
    """Yield a file to write; on success it replaces `final` durably, on error it vanishes."""
    with atomic_path(final) as tmp, open(tmp, "wb") as fh:
        yield fh


def atomic_write_bytes(final: Path, data: bytes) -> None:
    with atomic_writer(final) as fh:
        fh.write(data)


def atomic_write_json(final: Path, value: Any) -> None:
    atomic_write_bytes(final, (json.dumps(value, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def copy_durably(src: Path, dst: Path, progress: Callable[[], None] | None = None) -> None:
    """Copy to a temp name beside `dst`, fsync, rename: `dst` is complete or absent.
    `progress` is told of every MiB copied (a share's caller tells slow from stuck by it)."""
    with open(src, "rb") as fin, atomic_writer(dst) as fout:
        if progress is None:
            shutil.copyfileobj(fin, fout, 1 << 20)
            return
        while chunk := fin.read(1 << 20):
            fout.write(chunk)
            progress()


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def file_sha256(path: Path) -> str:
    """The file's SHA-256, read in 1 MiB blocks (a clip, a voice or a song may be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

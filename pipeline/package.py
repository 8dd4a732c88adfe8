"""From a finished work folder to `outbox/NAME/` and `outbox/NAME.zip`.

Both appear by rename from hidden temporary names in the outbox itself (so the
rename never crosses a filesystem): a reader of the share sees a story complete
or not at all. Publishing is idempotent, so a crash between the two renames is
finished by simply publishing again.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.fsutil import atomic_writer, copy_durably, fsync_dir, remove_tree

_STORED = {".png", ".mp4", ".jpg", ".jpeg", ".zip"}  # already compressed: deflate only costs time


def build_zip(tree: Path, zip_path: Path, top: str) -> None:
    """Zip `tree`'s contents under one folder `top/`, written atomically.

    One top folder, as `outbox/NAME/` is on the share: `unzip NAME.zip` makes `NAME/` and
    never spills a story's files into the folder it is run in.
    """
    files = sorted(p for p in tree.rglob("*") if p.is_file() and not p.name.startswith("."))
    with atomic_writer(zip_path) as fh, zipfile.ZipFile(fh, "w") as zf:
        for path in files:
            kind = zipfile.ZIP_STORED if path.suffix.lower() in _STORED else zipfile.ZIP_DEFLATED
            zf.write(path, f"{top}/{path.relative_to(tree).as_posix()}", compress_type=kind)


def _manifest_claim(tree: Path) -> str | None:
    try:
        return str(json.loads((tree / "manifest.json").read_text("utf-8")).get("claim"))
    except (OSError, ValueError, AttributeError):
        return None


def _copy_tree(src: Path, dst: Path, progress: Callable[[], None]) -> None:
    dst.mkdir()  # never its parents: the outbox itself is not ours to create
    for path in sorted(src.rglob("*")):
        target = dst / path.relative_to(src)
        if path.is_dir():
            target.mkdir(exist_ok=True)
        elif not path.name.startswith("."):
            copy_durably(path, target, progress)
        progress()
    for folder in sorted({p.parent for p in dst.rglob("*")} | {dst}, reverse=True):
        fsync_dir(folder)
        progress()


def publish(
    tree: Path,
    zip_src: Path,
    outbox: Path,
    name: str,
    claim: str,
    *,
    folder: bool = True,
    zip: bool = True,
    check_outbox: Callable[[], None] = lambda: None,
    progress: Callable[[], None] = lambda: None,
) -> dict[str, Any]:
    """Copy the story folder and/or its ZIP into the outbox; returns what was published.

    `claim` (written into the manifest) tells our own earlier, interrupted publish
    apart from anything else that might sit under the same name. `folder`/`zip` are
    `[outputs]`: a studio may keep only one of the two (the settings keep one on).

    The outbox itself is never created: missing, it is a share that is not mounted, and
    what we made would land on the bare mount point, on local disk, hidden once the share
    is back. FileNotFoundError then; the caller waits for the outbox to return.
    `check_outbox` is the caller's finer test, run before each thing is written there: it
    raises OSError when the outbox is no longer the one it started with (a mount point
    that is now the bare folder under it is still a folder). `progress` is told of each file
    and MiB copied: on a share, a slow publish is told apart from a stuck one by it.
    """
    if not (folder or zip):
        raise ValueError("publish needs folder or zip")
    if not outbox.is_dir():
        raise FileNotFoundError(errno.ENOENT, "outbox is not available (share not mounted?)", str(outbox))
    if folder:
        check_outbox()
        _publish_folder(tree, outbox, name, claim, progress)
    final_zip = outbox / f"{name}.zip"
    if zip and not final_zip.exists():
        check_outbox()
        copy_durably(zip_src, final_zip, progress)
    return outputs(outbox, name)


def _publish_folder(tree: Path, outbox: Path, name: str, claim: str, progress: Callable[[], None]) -> None:
    final_dir = outbox / name
    if final_dir.exists():
        if _manifest_claim(final_dir) != claim:
            raise FileExistsError(f"{final_dir} exists and is not this story's output; not overwriting it")
        return
    stage = outbox / f".{name}.{claim}.staging"
    remove_tree(stage)
    _copy_tree(tree, stage, progress)
    os.rename(stage, final_dir)
    fsync_dir(outbox)


def outputs(outbox: Path, name: str) -> dict[str, Any]:
    """What a published story consists of, as paths relative to the outbox (they hold on the share).

    Only what is there is listed: a ZIP-only story has no folder, a folder-only story no ZIP;
    `images`/`clips` then name the ZIP's members ("NAME.zip" holds "NAME/images/scene_001.png").
    """
    folder, zip_path = outbox / name, outbox / f"{name}.zip"

    def rel(p: Path) -> str:
        return p.relative_to(outbox).as_posix()

    listed: dict[str, Any] = {}
    if zip_path.exists():
        listed["zip"] = rel(zip_path)
    if not folder.is_dir():
        with zipfile.ZipFile(zip_path) as zf:
            members = sorted(zf.namelist())
        listed["images"] = [m for m in members if m.startswith(f"{name}/images/") and m.endswith(".png")]
        listed["clips"] = [m for m in members if m.startswith(f"{name}/clips/") and m.endswith(".mp4")]
        return listed
    listed.update(folder=name, manifest=f"{name}/manifest.json")
    for key, file in (("film", "film.mp4"), ("contact_sheet", "contact_sheet.jpg")):
        if (folder / file).exists():
            listed[key] = rel(folder / file)
    listed["images"] = [rel(p) for p in sorted((folder / "images").glob("*.png"))]
    listed["clips"] = [rel(p) for p in sorted((folder / "clips").glob("*.mp4"))]
    return listed


def clean_stale_temps(outbox: Path, name: str, claim: str) -> None:
    """Remove what a crashed publish of this claim left under hidden names."""
    with contextlib.suppress(OSError):
        for entry in outbox.iterdir():
            if entry.name.startswith(f".{name}.") and (claim in entry.name or entry.name.endswith(".part")):
                if entry.is_dir():
                    remove_tree(entry)
                else:
                    entry.unlink()

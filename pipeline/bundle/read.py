"""A story bundle (NAME.zip): story.json and the pictures and sounds it names.

    inspect_bundle(zip, limits)           -> Story   the claim's quick look: nothing inflated
                                                     but story.json, nothing written
    extract_bundle(zip, target, limits)   -> Bundle  the run: every entry read under the byte
                                                     budget, the named files written into target
                                                     and decoded; nothing written elsewhere
    check_bundle(zip, limits)             -> Story   `storyreel validate`: extract_bundle into a
    validate_bundle(zip, limits)          -> lines   temporary folder that is then removed
    copy_assets(root, story, out)         -> paths   the used files into out/assets/ for the outbox

Steps, cheapest first, so a bad bundle costs as little as possible:
1. the ZIP's directory: sizes, entry count, every name and type (pipeline/bundle/archive.py);
2. story.json: exactly one, at the root or inside one top folder, within max_file_bytes,
   a valid story whose file fields are allowed;
3. every named file present (relative to story.json's folder, exact names), not hidden;
4. every entry inflated under the byte budget, named files written, the rest discarded;
5. every named file decoded: pictures by Pillow (pipeline/bundle/pictures.py), sounds by
   ffmpeg (pipeline/bundle/sounds.py), scene sounds no longer than max_scene_seconds.

A problem of the bundle is a BundleError (a StoryError): one line per problem, naming the
entry or field and the limit. A problem of the machine (a full disk, an I/O error) is an
OSError, never blamed on the story.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import unicodedata
import zipfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.bundle.archive import (
    Budget,
    BundleError,
    Listing,
    name_key,
    open_zip,
    read_entry,
    read_listing,
    shown,
    stream_entry,
)
from pipeline.bundle.pictures import PictureError, PictureInfo, check_picture
from pipeline.bundle.sounds import SoundError, SoundInfo, check_sound
from pipeline.fsutil import copy_durably, remove_tree
from pipeline.settings import LimitsSettings
from pipeline.story import Story, StoryError, load_story

STORY_FILE = "story.json"
ASSETS = "assets"


@dataclass(frozen=True)
class BundleFile:
    """One file the story names, as extracted and checked."""

    path: str  # as the story names it: relative to story.json's folder, '/'-separated
    entry: str  # the ZIP entry it came from
    fields: tuple[str, ...]  # every field naming it ("scenes.0.image (scene 1)", "music", …)
    bytes: int
    sha256: str
    picture: PictureInfo | None  # for image fields
    sound: SoundInfo | None  # for audio and music


@dataclass(frozen=True)
class Bundle:
    """An extracted, checked bundle: `root / path` is each named file; `root / story.json` the story."""

    story: Story
    story_bytes: bytes  # story.json exactly as in the ZIP (published byte for byte)
    root: Path
    files: dict[str, BundleFile]  # by path as named
    entries: int  # every entry of the ZIP, Finder's junk included
    unpacked_bytes: int  # every entry's inflated bytes, counted while reading

    def path(self, name: str) -> Path:
        return self.root / name


@dataclass(frozen=True)
class _StoryEntry:
    story: Story
    raw: bytes
    entry: zipfile.ZipInfo
    base: str  # "" or "TOP/": the folder holding story.json, inside the ZIP


# ----------------------------------------------------------------------------------------------
# 2. story.json


def _story_entry(listing: Listing) -> tuple[zipfile.ZipInfo, str]:
    found = [n for n in listing.files if n.rsplit("/", 1)[-1].casefold() == STORY_FILE]
    if len(found) > 1:
        names = ", ".join(shown(n) for n in sorted(found)[:4])
        raise BundleError(f"(bundle): more than one story.json ({names}); a bundle holds one story")
    if not found or found[0].count("/") > 1:
        deep = f" (found {shown(found[0])}, too deep)" if found else ""
        raise BundleError(
            f"(bundle): no story.json at the ZIP's root or inside one top folder{deep}; "
            "a story bundle is story.json plus the files it names"
        )
    name = found[0]
    return listing.files[name], name[: name.rfind("/") + 1]


def _read_story(zf: zipfile.ZipFile, listing: Listing, limits: LimitsSettings, budget: Budget) -> _StoryEntry:
    info, base = _story_entry(listing)
    raw = read_entry(zf, info, budget, limits.max_file_bytes)
    if raw is None:
        raise BundleError(
            f"{info.filename}: over the limit of {limits.max_file_bytes} bytes (limits.max_file_bytes)"
        )
    try:
        story = load_story(raw, limits, bundle=True)
    except StoryError as err:
        where = info.filename
        raise BundleError(
            [p.replace("(file)", where, 1) if p.startswith("(file)") else p for p in err.problems]
        ) from None
    return _StoryEntry(story=story, raw=raw, entry=info, base=base)


# ----------------------------------------------------------------------------------------------
# 3. The named files, found in the listing


@dataclass
class _Named:
    entry: zipfile.ZipInfo
    fields: list[str]


def _missing(path: str, base: str, listing: Listing) -> str:
    """Why a named file is not there, with the likeliest slip as a hint."""
    text = f"{shown(path)} is not in the bundle"
    near = listing.keys.get(name_key(base + path))
    if near is not None:
        return f"{text} (it holds {shown(near[len(base) :])}: names must match exactly, case included)"
    if base and unicodedata.normalize("NFC", path) in listing.files:
        return f"{text} (paths are relative to the folder holding story.json, {shown(base)})"
    return text


def _named_files(found: _StoryEntry, listing: Listing) -> dict[str, _Named]:
    named: dict[str, _Named] = {}
    spelled: dict[str, str] = {}  # entry name -> the first spelling naming it
    problems = []
    for field, path in found.story.files():
        if path in named:
            named[path].fields.append(field)
            continue
        entry = found.base + unicodedata.normalize("NFC", path)
        if any(part.startswith(".") for part in path.split("/")):
            problems.append(
                f"{field}: {shown(path)} is a hidden name (starting with '.'), which is not published"
            )
        elif listing.files.get(entry) is found.entry:
            problems.append(f"{field}: {shown(path)} is the story itself, not a picture or a sound")
        elif entry in listing.folders:
            problems.append(f"{field}: {shown(path)} is a folder, not a file")
        elif entry not in listing.files:
            problems.append(f"{field}: {_missing(path, found.base, listing)}")
        elif spelled.setdefault(entry, path) != path:
            problems.append(
                f"{field}: {shown(path)} is {shown(spelled[entry])} spelled another way; spell it one way"
            )
        else:
            named[path] = _Named(entry=listing.files[entry], fields=[field])
    if problems:
        raise BundleError(problems)
    return named


# ----------------------------------------------------------------------------------------------
# 4. Every entry read; the named ones written


def _create(root: Path, path: str) -> int:
    """A new file at root/path (folders made as needed), never through a link."""
    parts = path.split("/")
    folder = root
    for part in parts[:-1]:
        folder = folder / part
        with contextlib.suppress(FileExistsError):
            folder.mkdir()
        if folder.is_symlink() or not folder.is_dir():
            raise BundleError(f"{shown(path)}: cannot be written inside {shown(part)}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    return os.open(folder / parts[-1], flags, 0o644)


def _write_entry(
    zf: zipfile.ZipFile, info: zipfile.ZipInfo, budget: Budget, root: Path, path: str
) -> tuple[int, str]:
    digest = hashlib.sha256()
    with os.fdopen(_create(root, path), "wb") as out:

        def sink(chunk: bytes) -> None:
            digest.update(chunk)
            out.write(chunk)

        size = stream_entry(zf, info, budget, sink)
    return size, digest.hexdigest()


def _unpack(
    zf: zipfile.ZipFile,
    listing: Listing,
    found: _StoryEntry,
    named: dict[str, _Named],
    root: Path,
    budget: Budget,
) -> dict[str, tuple[int, str]]:
    """Every entry inflated in archive order, counted; named files land under root by their
    story's spelling; the rest (Finder's junk, unnamed files) are read and dropped."""
    by_entry = {n.entry.filename: path for path, n in named.items()}
    written: dict[str, tuple[int, str]] = {}
    for info in sorted(listing.entries, key=lambda i: i.header_offset):
        if info is found.entry or info.is_dir():
            continue
        path = by_entry.get(info.filename)
        if path is None:
            stream_entry(zf, info, budget, lambda chunk: None)
        else:
            written[path] = _write_entry(zf, info, budget, root, path)
    with open(root / STORY_FILE, "xb") as fh:
        fh.write(found.raw)
    return written


# ----------------------------------------------------------------------------------------------
# 5. Every named file decoded


def _kind(field: str) -> str:
    """'image', 'audio' or 'music', from a field label such as "scenes.0.audio (scene 1)"."""
    return field.split(" ", 1)[0].rsplit(".", 1)[-1]


def _check_media(
    root: Path, path: str, fields: list[str], limits: LimitsSettings, problems: list[str]
) -> tuple[PictureInfo | None, SoundInfo | None]:
    picture: PictureInfo | None = None
    sound: SoundInfo | None = None
    for kind in dict.fromkeys(_kind(f) for f in fields):
        field = next(f for f in fields if _kind(f) == kind)
        try:
            if kind == "image":
                picture = check_picture(root / path)
            elif kind == "audio":
                sound = check_sound(root / path, limits.max_scene_seconds, "limits.max_scene_seconds")
            else:  # music: any length; decoded no further than the longest film could run
                sound = check_sound(root / path, limits.max_scenes * limits.max_scene_seconds, None)
        except (PictureError, SoundError) as err:
            problems.append(f"{field}: {shown(path)} {err}")
    return picture, sound


def extract_bundle(zip_path: Path, target: Path, limits: LimitsSettings) -> Bundle:
    """Check the bundle at `zip_path` and extract the files its story names into `target`.

    `target` must not exist (its parent must): it is created, and on any failure removed
    again, so nothing of a bad bundle stays. BundleError for the bundle's faults; OSError
    for the machine's (the disk full, the ZIP unreadable): those are worth retrying.
    """
    target = Path(target)
    target.mkdir()
    try:
        return _extract(Path(zip_path), target, limits)
    except BaseException:
        remove_tree(target)
        raise


def _extract(zip_path: Path, root: Path, limits: LimitsSettings) -> Bundle:
    budget = Budget(limits.max_bundle_bytes)
    with open_zip(zip_path, limits) as zf:
        listing = read_listing(zf, limits)  # 1.
        found = _read_story(zf, listing, limits, budget)  # 2.
        named = _named_files(found, listing)  # 3.
        written = _unpack(zf, listing, found, named, root, budget)  # 4.
    problems: list[str] = []
    files = {}
    for path, n in named.items():  # 5.
        picture, sound = _check_media(root, path, n.fields, limits, problems)
        size, sha = written[path]
        files[path] = BundleFile(path, n.entry.filename, tuple(n.fields), size, sha, picture, sound)
    if problems:
        raise BundleError(problems)
    return Bundle(found.story, found.raw, root, files, len(listing.entries), budget.used)


def inspect_bundle(zip_path: Path, limits: LimitsSettings) -> Story:
    """Steps 1-3 only: the listing, story.json, the named files present. Nothing is written
    and nothing but story.json inflated: cheap enough for the moment a bundle is claimed."""
    budget = Budget(limits.max_bundle_bytes)
    with open_zip(Path(zip_path), limits) as zf:
        listing = read_listing(zf, limits)
        found = _read_story(zf, listing, limits, budget)
        _named_files(found, listing)
    return found.story


def check_bundle(zip_path: Path, limits: LimitsSettings, tmp_dir: Path | None = None) -> Story:
    """Everything `extract_bundle` checks, in a temporary folder (under `tmp_dir`, else the
    system's) that is removed before this returns: `storyreel validate bundle.zip`."""
    with tempfile.TemporaryDirectory(prefix="storyreel-validate-", dir=tmp_dir) as tmp:
        return extract_bundle(zip_path, Path(tmp) / "bundle", limits).story


def validate_bundle(zip_path: Path, limits: LimitsSettings, shown_as: str | None = None) -> list[str]:
    """`FILE: field: message` lines, one per problem, as `storyreel validate` prints for stories;
    [] for a good bundle. FILE is `shown_as`, else the path as given."""
    name = shown_as if shown_as is not None else str(zip_path)
    try:
        check_bundle(zip_path, limits)
    except StoryError as err:
        return [f"{name}: {p}" for p in err.problems]
    return []


def copy_assets(root: Path, story: Story, out: Path) -> list[str]:
    """Copy the files `story` names from `root` (an extracted bundle) into `out/assets/`, their
    paths kept, each durably; returns them relative to `out` ("assets/images/a.jpg"), in
    the story's order. Only named files: the bundle's other entries are not the story's."""
    copied: list[str] = []
    for _, path in story.files():
        rel = f"{ASSETS}/{path}"
        if rel in copied:
            continue
        dst = out / ASSETS / path
        dst.parent.mkdir(parents=True, exist_ok=True)
        copy_durably(root / path, dst)
        copied.append(rel)
    return copied

"""A story to render, and its work folder's layout: the one place that layout is spelled out.

    work/out/images/scene_001.png   work/out/clips/scene_001.mp4   ...
    work/out/film.mp4  contact_sheet.jpg  manifest.json  story.json
    work/out/characters/Mara.png    a character's reference portrait (published)
    work/characters/Mara.npz        its recorded reference, and Mara.json, written last: it is made
    work/records/scene_001.json     written last: the scene is finished
    work/package.zip                built last, then published by the caller
    work/bundle/                    a bundle's named files, extracted by the caller (daemon/queue/stories.py)

The caller owns the folder (the daemon keeps it in its local spool, one per claim, and reads
it back for the status page's thumbnails and for where a stopped story resumes).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.story import Story


class WorkFolder:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.out = root / "out"  # what is published as outbox/NAME/
        self.images, self.clips = self.out / "images", self.out / "clips"
        self.records = root / "records"
        self.zip_path = root / "package.zip"
        self.bundle = root / "bundle"
        self.portraits = self.out / "characters"  # PortraitPlan.file, under out/
        self.references = root / "characters"  # PortraitPlan.reference_file, under the root

    def image(self, stem: str) -> Path:
        return self.images / f"{stem}.png"

    def clip(self, stem: str) -> Path:
        return self.clips / f"{stem}.mp4"

    def record(self, stem: str) -> Path:
        return self.records / f"{stem}.json"

    def portrait(self, stem: str) -> Path:
        return self.portraits / f"{stem}.png"

    def reference(self, stem: str) -> Path:
        return self.references / f"{stem}.npz"

    def portrait_record(self, stem: str) -> Path:
        return self.references / f"{stem}.json"

    def prepare(self) -> None:
        for sub in (self.images, self.clips, self.records):
            sub.mkdir(parents=True, exist_ok=True)

    def finished_scenes(self) -> int:
        """How many scenes have a record (a stopped story resumes after them)."""
        with contextlib.suppress(OSError):
            return len(list(self.records.glob("*.json")))
        return 0

    def finished_images(self) -> list[tuple[int, Path]]:
        """(scene number, PNG) of the scenes whose image is saved: PNGs appear there finished."""
        found = []
        with contextlib.suppress(OSError):
            for png in sorted(self.images.glob("scene_*.png")):
                with contextlib.suppress(ValueError):
                    found.append((int(png.stem.removeprefix("scene_")), png))
        return found


@dataclass
class StoryJob:
    name: str
    story: Story
    raw: bytes  # the input exactly as it arrived, published as story.json
    work: Path
    claim: str = "library"  # identifies this run of this story in the manifest
    sequence: int | None = None
    files: Path | None = None  # a bundle's extracted files (the paths its story names are under it)
    folder: WorkFolder = field(init=False)  # `work`, laid out
    out: Path = field(init=False)  # what is published as outbox/NAME/
    zip_path: Path = field(init=False)  # the story's ZIP, built last

    def __post_init__(self) -> None:
        self.folder = WorkFolder(self.work)
        self.out, self.zip_path = self.folder.out, self.folder.zip_path

    def file(self, path: str) -> Path:
        """A file the story names (a bundle's picture or sound), where it was extracted."""
        if self.files is None:
            raise ValueError(f"{path!r}: the story names a file, but no bundle's files were given")
        return self.files / path

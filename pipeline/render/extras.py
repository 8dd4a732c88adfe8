"""Film and contact sheet: built from the finished scenes, after the last one, before the manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from pipeline.bundle.pictures import load_picture
from pipeline.contactsheet import make_contact_sheet
from pipeline.prompts import ScenePlan
from pipeline.render.job import StoryJob
from pipeline.render.records import film_scene
from pipeline.settings import Settings
from pipeline.video.encode import video_encoding
from pipeline.video.film import make_film


def write_extras(
    job: StoryJob, plans: list[ScenePlan], settings: Settings, cast: list[tuple[str, Path]] | None = None
) -> dict[str, Any]:
    """Film and contact sheet, as `[outputs]` asks; returns what the manifest says of them.
    `cast`: (name, portrait) of each character, shown on the contact sheet after the scenes."""
    extras: dict[str, Any] = {}
    images = job.folder
    if settings.outputs.film:
        v = settings.video
        scenes = [film_scene(job, p) for p in plans]
        film = make_film(
            scenes,
            job.out / "film.mp4",
            video_encoding(v, (settings.image.width, settings.image.height)),
            fade_seconds=v.fade_seconds,
            crossfade_seconds=v.crossfade_seconds,
            zoom=v.zoom,
            pan=v.pan,
        )
        extras["film"] = "film.mp4"
        extras["film_info"] = {
            "frames": film.frames,
            "seconds": film.seconds,
            "crossfade_frames": film.crossfade_frames,
            "crossfade_clamped": film.crossfade_clamped,
        }
    if settings.outputs.contact_sheet:
        items = [(images.image(p.stem), p.number, p.description) for p in plans]
        title = job.story.title or job.name  # an untitled story goes by its name
        sheet = job.out / "contact_sheet.jpg"
        shown: list[tuple[str, Path | Image.Image]] = list(cast) if cast else list(story_cast(job))
        make_contact_sheet(items, sheet, title=title, cast=shown)  # type: ignore[arg-type]
        extras["contact_sheet"] = "contact_sheet.jpg"
    return extras


def story_cast(job: StoryJob) -> list[tuple[str, Image.Image]]:
    """(name, picture) of each character a bundle brings a picture of, upright and in sRGB, in
    the story's order, for the contact sheet; each shrunk as it is read (one original in memory)."""
    cast = []
    for name, who in job.story.characters.items():
        if who.image:
            picture = Image.fromarray(load_picture(job.file(who.image)))
            picture.thumbnail((640, 640), Image.Resampling.LANCZOS)  # twice a sheet's thumbnail
            cast.append((name, picture))
    return cast

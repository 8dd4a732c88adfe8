"""After the last scene: the film and its sound, the timelines, the contact sheet.

In order, because each needs the one before: where every scene and narration falls on the film
(the frames the scenes were made with) and the captions; the film at those frames (the
captions burned in when asked); the mix, muxed into the film and every clip; the timelines,
whose audio tracks are the mix's stems; the contact sheet.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from pipeline.bundle.pictures import load_picture
from pipeline.contactsheet import make_contact_sheet
from pipeline.prompts import ScenePlan
from pipeline.render.editing import write_story_timeline
from pipeline.render.job import StoryJob
from pipeline.render.records import clip_changed, film_scene
from pipeline.render.sound import SoundSetup, StorySound, plan_sound
from pipeline.settings import Settings
from pipeline.sound.mix import SoundTracks
from pipeline.video.encode import video_encoding
from pipeline.video.film import make_film
from pipeline.video.framerate import frame_rate_json


def write_extras(
    job: StoryJob,
    plans: list[ScenePlan],
    records: dict[int, dict[str, Any]],
    settings: Settings,
    sound: SoundSetup,
    cast: list[tuple[str, Path]] | None = None,
) -> dict[str, Any]:
    """Film, sound, timelines and contact sheet, as `[outputs]` asks; returns what the manifest
    says of them (and, under "timing", each scene's place on the film). `cast`: (name,
    portrait) of each character, shown on the contact sheet after the scenes."""
    extras: dict[str, Any] = {}
    story = plan_sound(job, plans, records, settings, sound)
    if settings.outputs.film:
        extras |= _film(job, plans, records, settings, story)
    clips = [job.folder.clip(p.stem) for p in plans]
    tracks = story.mix(
        job, settings, clips, on_clip=lambda k: records.update({plans[k].number: clip_changed(job, plans[k])})
    )
    extras["sound"] = _sound_record(story, tracks, sound, job)
    extras["timing"] = {p.number: sc.record() for p, sc in zip(plans, story.timing.scenes, strict=True)}
    if settings.outputs.timeline:
        extras["timeline"] = write_story_timeline(job, plans, records, settings, story.timing, tracks)
    if settings.outputs.contact_sheet:
        images = job.folder
        items = [(images.image(p.stem), p.number, p.description) for p in plans]
        title = job.story.title or job.name  # an untitled story goes by its name
        sheet = job.out / "contact_sheet.jpg"
        shown: list[tuple[str, Path | Image.Image]] = list(cast) if cast else list(story_cast(job))
        make_contact_sheet(items, sheet, title=title, cast=shown)  # type: ignore[arg-type]
        extras["contact_sheet"] = "contact_sheet.jpg"
    return extras


def _film(
    job: StoryJob, plans: list[ScenePlan], records: dict[int, dict[str, Any]], settings: Settings,
    story: StorySound,
) -> dict[str, Any]:  # fmt: skip
    """film.mp4 from the scenes' images, each lasting the frames its clip has."""
    v = settings.video
    scenes = [film_scene(job, p, records[p.number]["seconds"]) for p in plans]
    encoding = video_encoding(v, (settings.image.width, settings.image.height))
    film = make_film(
        scenes, job.out / "film.mp4", encoding.with_filter(story.caption_filter()),
        fade_seconds=v.fade_seconds, crossfade_seconds=v.crossfade_seconds, zoom=v.zoom, pan=v.pan,
    )  # fmt: skip
    if film.frames != story.timing.frames:  # the sound is laid out on the timing's frames
        raise RuntimeError(f"the film has {film.frames} frames, its timing {story.timing.frames}")
    return {
        "film": "film.mp4",
        "film_info": {
            "frames": film.frames,
            "seconds": film.seconds,
            "fps": frame_rate_json(film.fps),
            "width": film.width,
            "height": film.height,
            "crossfade_frames": film.crossfade_frames,
            "crossfade_clamped": film.crossfade_clamped,
            "burned_captions": story.burn is not None,
        },
    }


def _sound_record(
    story: StorySound, tracks: SoundTracks | None, sound: SoundSetup, job: StoryJob
) -> dict[str, Any]:
    """The manifest's account of the film's sound: who spoke, what music, the mix as measured."""
    music = None
    if story.music is not None:
        music = {**story.music.source, "from": "bundle" if job.story.music else "audio.music"}
    stems = []
    if tracks is not None:
        found = [tracks.narration_stem, tracks.music_stem, *tracks.scene_stems]
        stems = [p.relative_to(job.out).as_posix() for p in found if p is not None]
    return {
        "voice": sound.describe(),
        "music": music,
        "mix": None if tracks is None else {**tracks.record(), "seconds": round(tracks.seconds, 3)},
        "captions": story.captions,
        "stems": stems,
    }


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

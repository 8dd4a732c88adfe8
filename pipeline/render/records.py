"""The CPU half of a scene (finish, PNG, clip) and its record, the proof that a scene is finished.

A scene counts as finished only when its record exists and the files it names (image, clip,
master, narration) still have the recorded sizes and hashes, so a resumed story redoes exactly
the scenes that a crash interrupted and nothing else, and never speaks a finished scene again.
A scene that brings its own picture (a bundle's) is finished by `finish_provided` instead:
nothing generated, nothing invented for its record.
"""

from __future__ import annotations

import json
import time
from typing import Any

from pipeline.bundle.pictures import fit_picture, load_picture
from pipeline.bundle.read import ASSETS
from pipeline.finishing import finish, finishing_record
from pipeline.fsutil import atomic_write_json, atomic_writer, file_sha256
from pipeline.images.seam import GeneratedImage
from pipeline.prompts import ScenePlan
from pipeline.render.job import StoryJob, WorkFolder
from pipeline.render.media import file_facts, scene_media
from pipeline.render.sound import SoundSetup
from pipeline.settings import Settings
from pipeline.video.encode import video_encoding
from pipeline.video.film import FilmScene


def read_record(folder: WorkFolder, plan: ScenePlan) -> dict[str, Any]:
    """A finished scene's record as written, unchecked; {} if unreadable (for the metrics)."""
    try:
        value = json.loads(folder.record(plan.stem).read_text("utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def load_record(job: StoryJob, plan: ScenePlan) -> dict[str, Any] | None:
    """The scene's record if the files it names are intact; else None (redo the scene)."""
    try:
        record: dict[str, Any] = json.loads(job.folder.record(plan.stem).read_text("utf-8"))
        named = [("image", job.out), ("clip", job.out), ("master", job.out), ("narration_wav", job.work)]
        for key, base in named:
            if key not in record and key in ("master", "narration_wav"):
                continue  # no timeline asked for; nothing spoken
            path = base / record[key]
            if path.stat().st_size != record[f"{key}_bytes"] or file_sha256(path) != record[f"{key}_sha256"]:
                return None
        return record
    except (OSError, ValueError, KeyError, TypeError):
        return None


def clip_changed(job: StoryJob, plan: ScenePlan) -> dict[str, Any]:
    """The scene's clip was rewritten (its sound muxed in): its record follows, so that a story
    resumed after this keeps the scene. Returns the record as now written."""
    record: dict[str, Any] = json.loads(job.folder.record(plan.stem).read_text("utf-8"))
    record |= file_facts("clip", job.folder.clip(plan.stem))
    atomic_write_json(job.folder.record(plan.stem), record)
    return record


def finish_scene(
    job: StoryJob, plan: ScenePlan, generated: GeneratedImage, settings: Settings, sound: SoundSetup
) -> dict[str, Any]:
    """CPU half of a scene: finish, save the PNG, speak it and render its clip (and master), then
    write the record."""
    t0 = time.perf_counter()
    image = finish(generated.image, plan.seed, settings.finish)
    t1 = time.perf_counter()
    png = job.folder.image(plan.stem)
    with atomic_writer(png) as fh:
        image.save(fh, format="PNG")
    t2 = time.perf_counter()
    media = scene_media(job, plan, image, settings, sound)
    made = media.pop("timings")
    record = {
        "scene": plan.number,
        "description": plan.description,
        "image": png.relative_to(job.out).as_posix(),
        "prompt": plan.prompt,
        "negative_prompt": plan.negative,
        "human_centric": plan.human,
        "characters": list(plan.characters),
        "seed": plan.seed,
        "steps": settings.image.steps,
        "guidance": settings.image.guidance,
        "width": settings.image.width,
        "height": settings.image.height,
        "motion": plan.motion,
        "finishing": finishing_record(settings.finish, plan.seed),
        "generation": generated.info,
        **media,
        "timings": {
            **generated.timings,
            "finishing": t1 - t0,
            "save_and_clip": t2 - t1 + made["clip"],
            "speech": made["speech"],
            "master": made["master"],
        },
        "image_bytes": png.stat().st_size,
        "image_sha256": file_sha256(png),
    }
    atomic_write_json(job.folder.record(plan.stem), record)
    return record


def finish_provided(job: StoryJob, plan: ScenePlan, settings: Settings, sound: SoundSetup) -> dict[str, Any]:
    """The CPU half of a scene with its own picture: the picture is the user's, so no finishing.

    Its PNG is the cover fit to the `[image]` size, resampled once from the original; its clip
    (and master) sample the original too (`source_box`), so a zoom shows the picture's own
    detail rather than magnifying the PNG; it is spoken as any scene is (`scene_media`). The
    record says where the picture came from (its path in the bundle, its sha256) and holds no
    seed, prompt or generation: none was used.
    """
    assert plan.picture is not None, plan
    source = job.file(plan.picture)
    img, v = settings.image, settings.video
    t0 = time.perf_counter()
    fitted = fit_picture(source, img.width, img.height)
    t1 = time.perf_counter()
    png = job.folder.image(plan.stem)
    with atomic_writer(png) as fh:
        fitted.image().save(fh, format="PNG")
    clip_box = fitted.clip_box(*video_encoding(v, (img.width, img.height)).size)
    t2 = time.perf_counter()
    media = scene_media(job, plan, fitted.rgb, settings, sound, source_box=clip_box)
    made = media.pop("timings")
    record = {
        "scene": plan.number,
        "description": plan.description,
        "image": png.relative_to(job.out).as_posix(),
        "provided": {
            "path": plan.picture,  # as story.json names it
            "asset": f"{ASSETS}/{plan.picture}",  # where the outbox keeps it
            "sha256": file_sha256(source),
            "bytes": source.stat().st_size,
            "width": fitted.rgb.shape[1],  # upright, as shown
            "height": fitted.rgb.shape[0],
            "box": list(fitted.box),  # the part the PNG shows, in the picture's pixels
            "clip_box": list(clip_box),  # ... and the clip (and the film) at rest
        },
        "characters": list(plan.characters),
        "width": img.width,
        "height": img.height,
        "motion": plan.motion,
        **media,
        "timings": {"fit": t1 - t0, "save_and_clip": t2 - t1 + made["clip"], **made},
        "image_bytes": png.stat().st_size,
        "image_sha256": file_sha256(png),
    }
    atomic_write_json(job.folder.record(plan.stem), record)
    return record


def film_scene(job: StoryJob, plan: ScenePlan, seconds: float) -> FilmScene:
    """A finished scene as the film shows it, for `seconds` (its clip's length): its PNG, or for a
    scene with its own picture the original under the same box as its clip (read when the film
    reaches it: one in memory)."""
    provided = read_record(job.folder, plan).get("provided") if plan.picture else None
    if not provided:
        return FilmScene(job.folder.image(plan.stem), seconds, plan.motion)
    source = job.file(plan.picture or "")
    left, top, right, bottom = (float(v) for v in provided["clip_box"])
    return FilmScene(
        lambda: load_picture(source), seconds, plan.motion, source_box=(left, top, right, bottom)
    )

"""The CPU half of a scene (finish, PNG, clip) and its record, the proof that a scene is finished.

A scene counts as finished only when its record exists and the image and clip it names still
have the recorded sizes and hashes, so a resumed story redoes exactly the scenes that a crash
interrupted and nothing else. A scene that brings its own picture (a bundle's) is finished by
`finish_provided` instead: nothing generated, nothing invented for its record.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from pipeline.bundle.pictures import fit_picture, load_picture
from pipeline.bundle.read import ASSETS
from pipeline.finishing import finish, finishing_record
from pipeline.fsutil import atomic_write_json, atomic_writer
from pipeline.images.seam import GeneratedImage
from pipeline.prompts import ScenePlan
from pipeline.render.job import StoryJob, WorkFolder
from pipeline.settings import Settings
from pipeline.video.encode import video_encoding
from pipeline.video.film import FilmScene
from pipeline.video.kenburns import render_clip


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
        for key in ("image", "clip"):
            path = job.out / record[key]
            if path.stat().st_size != record[f"{key}_bytes"] or _sha256(path) != record[f"{key}_sha256"]:
                return None
        return record
    except (OSError, ValueError, KeyError, TypeError):
        return None


def finish_scene(
    job: StoryJob, plan: ScenePlan, generated: GeneratedImage, settings: Settings
) -> dict[str, Any]:
    """CPU half of a scene: finish, save the PNG, render the clip, then write the record."""
    t0 = time.perf_counter()
    image = finish(generated.image, plan.seed, settings.finish)
    t1 = time.perf_counter()
    png = job.folder.image(plan.stem)
    with atomic_writer(png) as fh:
        image.save(fh, format="PNG")
    mp4 = job.folder.clip(plan.stem)
    v = settings.video
    render_clip(
        image,
        mp4,
        video_encoding(v, (settings.image.width, settings.image.height)),
        seconds=plan.seconds,
        motion=plan.motion,
        zoom=v.zoom,
        pan=v.pan,
        fade_seconds=v.fade_seconds,
    )
    t2 = time.perf_counter()
    record = {
        "scene": plan.number,
        "description": plan.description,
        "image": png.relative_to(job.out).as_posix(),
        "clip": mp4.relative_to(job.out).as_posix(),
        "prompt": plan.prompt,
        "negative_prompt": plan.negative,
        "human_centric": plan.human,
        "characters": list(plan.characters),
        "seed": plan.seed,
        "steps": settings.image.steps,
        "guidance": settings.image.guidance,
        "width": settings.image.width,
        "height": settings.image.height,
        "seconds": plan.seconds,
        "motion": plan.motion,
        "finishing": finishing_record(settings.finish, plan.seed),
        "generation": generated.info,
        "timings": {**generated.timings, "finishing": t1 - t0, "save_and_clip": t2 - t1},
        "image_bytes": png.stat().st_size,
        "image_sha256": _sha256(png),
        "clip_bytes": mp4.stat().st_size,
        "clip_sha256": _sha256(mp4),
    }
    atomic_write_json(job.folder.record(plan.stem), record)
    return record


def finish_provided(job: StoryJob, plan: ScenePlan, settings: Settings) -> dict[str, Any]:
    """The CPU half of a scene with its own picture: the picture is the user's, so no finishing.

    Its PNG is the cover fit to the `[image]` size, resampled once from the original; its clip
    samples the original too (`source_box`), so a zoom shows the picture's own detail rather
    than magnifying the PNG. The record says where the picture came from (its path in the
    bundle, its sha256) and holds no seed, prompt or generation: none was used.
    """
    assert plan.picture is not None, plan
    source = job.file(plan.picture)
    img, v = settings.image, settings.video
    t0 = time.perf_counter()
    fitted = fit_picture(source, img.width, img.height)
    t1 = time.perf_counter()
    png, mp4 = job.folder.image(plan.stem), job.folder.clip(plan.stem)
    with atomic_writer(png) as fh:
        fitted.image().save(fh, format="PNG")
    encoding = video_encoding(v, (img.width, img.height))
    clip_box = fitted.clip_box(*encoding.size)
    render_clip(
        fitted.rgb,
        mp4,
        encoding,
        seconds=plan.seconds,
        motion=plan.motion,
        zoom=v.zoom,
        pan=v.pan,
        fade_seconds=v.fade_seconds,
        source_box=clip_box,
    )
    t2 = time.perf_counter()
    record = {
        "scene": plan.number,
        "description": plan.description,
        "image": png.relative_to(job.out).as_posix(),
        "clip": mp4.relative_to(job.out).as_posix(),
        "provided": {
            "path": plan.picture,  # as story.json names it
            "asset": f"{ASSETS}/{plan.picture}",  # where the outbox keeps it
            "sha256": _sha256(source),
            "bytes": source.stat().st_size,
            "width": fitted.rgb.shape[1],  # upright, as shown
            "height": fitted.rgb.shape[0],
            "box": list(fitted.box),  # the part the PNG shows, in the picture's pixels
            "clip_box": list(clip_box),  # ... and the clip (and the film) at rest
        },
        "characters": list(plan.characters),
        "width": img.width,
        "height": img.height,
        "seconds": plan.seconds,
        "motion": plan.motion,
        "timings": {"fit": t1 - t0, "save_and_clip": t2 - t1},
        "image_bytes": png.stat().st_size,
        "image_sha256": _sha256(png),
        "clip_bytes": mp4.stat().st_size,
        "clip_sha256": _sha256(mp4),
    }
    atomic_write_json(job.folder.record(plan.stem), record)
    return record


def film_scene(job: StoryJob, plan: ScenePlan) -> FilmScene:
    """A finished scene as the film shows it: its PNG, or for a scene with its own picture the
    original under the same box as its clip (read when the film reaches it: one in memory)."""
    provided = read_record(job.folder, plan).get("provided") if plan.picture else None
    if not provided:
        return FilmScene(job.folder.image(plan.stem), plan.seconds, plan.motion)
    source = job.file(plan.picture or "")
    left, top, right, bottom = (float(v) for v in provided["clip_box"])
    return FilmScene(
        lambda: load_picture(source), plan.seconds, plan.motion, source_box=(left, top, right, bottom)
    )

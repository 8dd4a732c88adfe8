"""The CPU half of a scene (finish, PNG, clip) and its record, the proof that a scene is finished.

A scene counts as finished only when its record exists and the files it names (image, clip,
master, narration) still have the recorded sizes and hashes, so a resumed story redoes exactly
the scenes that a crash interrupted and nothing else, and never speaks a finished scene again.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from pipeline.finishing import finish, finishing_record
from pipeline.fsutil import atomic_write_json, atomic_writer
from pipeline.images.seam import GeneratedImage
from pipeline.prompts import ScenePlan
from pipeline.render.job import StoryJob, WorkFolder
from pipeline.render.media import file_facts, scene_media
from pipeline.render.sound import SoundSetup
from pipeline.settings import Settings


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
        named = [("image", job.out), ("clip", job.out), ("master", job.out), ("narration_wav", job.work)]
        for key, base in named:
            if key not in record and key in ("master", "narration_wav"):
                continue  # no timeline asked for; nothing spoken
            path = base / record[key]
            if path.stat().st_size != record[f"{key}_bytes"] or _sha256(path) != record[f"{key}_sha256"]:
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
        "image_sha256": _sha256(png),
    }
    atomic_write_json(job.folder.record(plan.stem), record)
    return record

"""manifest.json: what was made, from what, with which settings; written after everything it describes."""

from __future__ import annotations

import time
from typing import Any

from pipeline.fsutil import atomic_write_json
from pipeline.render.job import StoryJob
from pipeline.settings import Settings
from pipeline.version import storyreel_version


def write_manifest(
    job: StoryJob,
    records: dict[int, dict[str, Any]],
    extras: dict[str, Any],
    settings: Settings,
    model: dict[str, Any],
) -> dict[str, Any]:
    """`extras["timing"]` (each scene's place on the film) goes into the scenes it is about."""
    extras = dict(extras)
    timing: dict[int, dict[str, Any]] = extras.pop("timing", {})
    manifest = {
        "story": job.name,
        "title": job.story.title,
        "claim": job.claim,
        "sequence": job.sequence,
        "storyreel_version": storyreel_version(),  # pyproject.toml's, installed or not
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": model,
        "settings": {
            "image": settings.image.model_dump(),
            "video": settings.video.model_dump(),
            "finish": settings.finish.model_dump(),
            "outputs": settings.outputs.model_dump(),
            "voice": settings.voice.model_dump(),
            "audio": settings.audio.model_dump(),
        },
        "scenes": [_scene(records[n], timing.get(n, {})) for n in sorted(records)],
        **extras,
    }
    atomic_write_json(job.out / "manifest.json", manifest)
    return manifest


def _scene(record: dict[str, Any], placed: dict[str, Any]) -> dict[str, Any]:
    """A scene's record, with where it starts on the film and where its narration does."""
    keys = ("start_seconds", "narration_start_seconds")
    return {**record, **{k: placed[k] for k in keys if k in placed}}

"""`render_story`: one story in its work folder, in numbered steps, each safe to repeat.

A resumed story skips its finished scenes (step 2) and redoes the rest, whose files all appear
by atomic rename. A new kind of step (a provided picture, narration, a portrait, a timeline)
is one more numbered step here, with its module beside this one.
"""

from __future__ import annotations

import time
from typing import Any

from pipeline.bundle import copy_assets
from pipeline.eta import TailCost
from pipeline.fsutil import atomic_write_bytes
from pipeline.images.local import as_workers
from pipeline.images.seam import ImageGenerator, ImageWorkers
from pipeline.package import build_zip
from pipeline.prompts import plan_scenes
from pipeline.render.events import QuietEvents, RenderEvents, stop_explains
from pipeline.render.extras import write_extras
from pipeline.render.job import StoryJob
from pipeline.render.manifest import write_manifest
from pipeline.render.portraits import make_cast
from pipeline.render.scenes import CpuPool, render_scenes
from pipeline.settings import Settings


def render_story(
    job: StoryJob,
    settings: Settings,
    generator: ImageWorkers | ImageGenerator,
    events: RenderEvents | None = None,
    pool: CpuPool | None = None,
    tail: TailCost | None = None,
) -> dict[str, Any]:
    """Make the whole story in `job.work`, ready to publish; returns the manifest.

    `generator` is the daemon's pool of image workers, or one bare generator (library use).
    `tail`, kept by the caller from story to story, prices the steps after the last scene in
    the ETA; it is updated here with what they cost this time. Raises Stopped when `events`
    asks to stop between scenes.
    """
    events = events or QuietEvents()
    tail = tail if tail is not None else TailCost()
    workers = as_workers(generator)

    # 1. Plan the scenes (prompts, seeds, seconds, motion) and lay out the work folder
    plans = plan_scenes(job.story, job.name, settings)
    job.folder.prepare()

    # 2. The cast: a reference portrait per character a scene names, made or replayed
    cast = make_cast(job, plans, settings, workers, events)

    # 3. Scenes: image, finishing, PNG, clip, record (the GPU on N+1 while the CPU finishes N)
    own_pool = pool is None
    pool = pool or CpuPool(settings)
    try:
        with stop_explains(events):
            records = render_scenes(job, plans, settings, workers, events, pool, tail, cast)
    finally:
        if own_pool:
            pool.shutdown(wait=True)

    # 4. The input exactly as it arrived, and the files a bundle's story names (its pictures and
    #    sounds, under assets/: the outbox is self-contained). The tail's cost is measured from
    #    here, see pipeline/eta.py
    tail_started = time.perf_counter()
    atomic_write_bytes(job.out / "story.json", job.raw)
    assets = copy_assets(job.files, job.story, job.out) if job.files is not None else []

    # 5. Film and contact sheet (the cast on it), from the finished scenes
    with stop_explains(events):
        extras = write_extras(job, plans, settings, cast.pictures(job))
    if assets:
        extras["assets"] = assets

    # 6. Manifest: written after everything it describes; per scene and per story, the characters
    model = workers.model()
    if cast.portraits:
        extras["characters"] = cast.story_record()
    for plan in plans:
        records[plan.number].update(cast.scene_fields(plan, records[plan.number], settings, model))
    manifest = write_manifest(job, records, extras, settings, model)

    # 7. ZIP of the whole output folder, under NAME/, built last
    build_zip(job.out, job.zip_path, top=job.name)
    tail.measured(
        time.perf_counter() - tail_started, sum(round(p.seconds * settings.video.fps) for p in plans)
    )
    return manifest

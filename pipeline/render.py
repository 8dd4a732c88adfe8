"""One story, top to bottom: plan -> image -> finish -> clip, per scene; then film,
contact sheet, manifest and ZIP. Everything happens in a work folder the caller
owns (the daemon keeps it in its local spool), laid out as the outbox will be:

    work/out/images/scene_001.png   work/out/clips/scene_001.mp4   ...
    work/records/scene_001.json     written last: the scene is finished
    work/package.zip                built last, then published by the caller

A scene counts as finished only when its record exists and the image and clip
it names still have the recorded sizes and hashes, so a resumed story redoes
exactly the scenes that a crash interrupted and nothing else.

The GPU never waits for the CPU: the image workers (pipeline/workers.py: this thread
with the local engine, Ray actors with engine = "ray") make scene N+1 while a pool
thread finishes, saves and animates scene N.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any, Protocol

from pipeline.contactsheet import make_contact_sheet
from pipeline.encode import EncoderStopped, video_encoding
from pipeline.eta import StoryEta, TailCost
from pipeline.film import FilmScene, make_film
from pipeline.finishing import finish, finishing_record
from pipeline.fsutil import atomic_write_bytes, atomic_write_json, atomic_writer
from pipeline.generate import GeneratedImage, ImageGenerator, SceneRequest
from pipeline.kenburns import render_clip
from pipeline.package import build_zip
from pipeline.prompts import ScenePlan, plan_scenes
from pipeline.settings import Settings
from pipeline.story import Story
from pipeline.workers import ImageWorkers, SceneKey, Ticket, as_workers


class CpuPool(ThreadPoolExecutor):
    """Threads for the CPU half of each scene (finish, save, clip).

    Its size is also how many made images may wait for it, which bounds memory,
    so the number is decided once, here: `daemon.cpu_workers`, or by default one
    core fewer than the machine has (at least 1, at most 4).
    """

    def __init__(self, settings: Settings) -> None:
        self.size = settings.daemon.cpu_workers or max(1, min(4, (os.cpu_count() or 2) - 1))
        super().__init__(max_workers=self.size, thread_name_prefix="scene-cpu")


class Stopped(Exception):
    """A warm shutdown was asked for; finished scenes are kept, the story resumes later."""


class RenderEvents(Protocol):
    def scene_started(self, plan: ScenePlan, total: int, eta_seconds: float | None) -> None: ...
    def scene_finished(self, plan: ScenePlan, total: int) -> None: ...
    def step(self, step: int, total: int) -> None: ...  # also a heartbeat: (0, 0) while waiting
    def should_stop(self) -> bool: ...


class QuietEvents:
    """Events for library use: nothing reported, never stops."""

    def scene_started(self, plan: ScenePlan, total: int, eta_seconds: float | None) -> None:
        pass

    def scene_finished(self, plan: ScenePlan, total: int) -> None:
        pass

    def step(self, step: int, total: int) -> None:
        pass

    def should_stop(self) -> bool:
        return False


@dataclass
class StoryJob:
    name: str
    story: Story
    raw: bytes  # the input exactly as it arrived, published as story.json
    work: Path
    claim: str = "library"  # identifies this run of this story in the manifest
    sequence: int | None = None

    @property
    def out(self) -> Path:
        return self.work / "out"

    @property
    def zip_path(self) -> Path:
        return self.work / "package.zip"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _record_path(job: StoryJob, plan: ScenePlan) -> Path:
    return job.work / "records" / f"{plan.stem}.json"


def load_record(job: StoryJob, plan: ScenePlan) -> dict[str, Any] | None:
    """The scene's record if the files it names are intact; else None (redo the scene)."""
    try:
        record: dict[str, Any] = json.loads(_record_path(job, plan).read_text("utf-8"))
        for key in ("image", "clip"):
            path = job.out / record[key]
            if path.stat().st_size != record[f"{key}_bytes"] or _sha256(path) != record[f"{key}_sha256"]:
                return None
        return record
    except (OSError, ValueError, KeyError, TypeError):
        return None


def scene_key(job: StoryJob, plan: ScenePlan) -> SceneKey:
    """The one way a scene is named to the image workers: render_scenes and the daemon's
    lookahead must agree, or an image made ahead is not adopted but made again."""
    return SceneKey(job.sequence or 0, job.claim, plan.number)


def scene_request(plan: ScenePlan, settings: Settings) -> SceneRequest:
    img = settings.image
    return SceneRequest(
        prompt=plan.prompt,
        negative=plan.negative,
        seed=plan.seed,
        width=img.width,
        height=img.height,
        steps=img.steps,
        guidance=img.guidance,
    )


def finish_scene(
    job: StoryJob, plan: ScenePlan, generated: GeneratedImage, settings: Settings
) -> dict[str, Any]:
    """CPU half of a scene: finish, save the PNG, render the clip, then write the record."""
    t0 = time.perf_counter()
    image = finish(generated.image, plan.seed, settings.finish)
    t1 = time.perf_counter()
    png = job.out / "images" / f"{plan.stem}.png"
    with atomic_writer(png) as fh:
        image.save(fh, format="PNG")
    mp4 = job.out / "clips" / f"{plan.stem}.mp4"
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
    atomic_write_json(_record_path(job, plan), record)
    return record


def _prepare(job: StoryJob) -> None:
    for sub in (job.out / "images", job.out / "clips", job.work / "records"):
        sub.mkdir(parents=True, exist_ok=True)


def render_scenes(
    job: StoryJob,
    plans: list[ScenePlan],
    settings: Settings,
    workers: ImageWorkers,
    events: RenderEvents,
    pool: CpuPool,
    tail: TailCost,
) -> dict[int, dict[str, Any]]:
    """Make every unfinished scene; returns records by scene number. Raises Stopped.

    Scenes are handed to the image workers ahead of the one being waited on (as many as
    there are workers, plus what the CPU pool can hold), and collected in plan order, so
    `scene_started` comes per scene in plan order whatever the engine. With LocalWorkers a
    ticket is made when waited on: this is exactly one image at a time on this thread.
    """
    records = {p.number: r for p in plans if (r := load_record(job, p)) is not None}
    todo = [p for p in plans if p.number not in records]
    in_flight: list[tuple[ScenePlan, Future[dict[str, Any]]]] = []
    depth = pool.size  # bound memory: at most this many images waiting for a clip
    ahead = workers.size + depth  # scenes handed to the image workers before they are waited on
    tickets: dict[int, Ticket] = {}
    eta = StoryEta(plans, settings.video.fps, tail)

    def collect(keep: int) -> None:
        while len(in_flight) > keep:
            plan, fut = in_flight.pop(0)
            while not fut.done():  # keep the heartbeat going while the CPU half finishes
                wait([fut], timeout=0.5)
                events.step(0, 0)
            records[plan.number] = fut.result()
            events.scene_finished(plan, len(plans))

    def image(plan: ScenePlan) -> GeneratedImage:
        ticket = tickets.pop(plan.number)
        while (generated := workers.wait(ticket, 0.5, on_step=events.step)) is None:
            events.step(0, 0)  # another process makes it: the heartbeat and housekeeping go on here
        return generated

    try:
        for i, plan in enumerate(todo):
            if events.should_stop():
                workers.withdraw()
                raise Stopped()
            for later in todo[i : i + ahead]:
                if later.number not in tickets:
                    tickets[later.number] = workers.submit(
                        scene_key(job, later), scene_request(later, settings)
                    )
            events.scene_started(plan, len(plans), eta.estimate(len(todo) - i, records))
            generated = image(plan)
            in_flight.append((plan, pool.submit(finish_scene, job, plan, generated, settings)))
            del generated
            collect(keep=depth)
            while in_flight and in_flight[0][1].done():
                collect(keep=len(in_flight) - 1)
    finally:
        # Whatever happens, a scene already handed to the CPU is finished and recorded,
        # so a stop or crash elsewhere never leaves a half-made scene behind.
        pending = list(in_flight)
        in_flight.clear()
        for plan, fut in pending:
            exc = fut.exception()
            if exc is None:
                records[plan.number] = fut.result()
                events.scene_finished(plan, len(plans))
    for _, fut in pending:
        if (exc := fut.exception()) is not None:
            raise exc
    return records


def write_extras(job: StoryJob, plans: list[ScenePlan], settings: Settings) -> dict[str, Any]:
    """Film and contact sheet: built after the last scene, before the manifest."""
    extras: dict[str, Any] = {}
    if settings.outputs.film:
        v = settings.video
        scenes = [FilmScene(job.out / "images" / f"{p.stem}.png", p.seconds, p.motion) for p in plans]
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
        items = [(job.out / "images" / f"{p.stem}.png", p.number, p.description) for p in plans]
        title = job.story.title or job.name  # an untitled story goes by its name
        make_contact_sheet(items, job.out / "contact_sheet.jpg", title=title)  # type: ignore[arg-type]
        extras["contact_sheet"] = "contact_sheet.jpg"
    return extras


def write_manifest(
    job: StoryJob,
    records: dict[int, dict[str, Any]],
    extras: dict[str, Any],
    settings: Settings,
    model: dict[str, Any],
) -> dict[str, Any]:
    manifest = {
        "story": job.name,
        "title": job.story.title,
        "claim": job.claim,
        "sequence": job.sequence,
        "storyreel_version": version("storyreel"),  # pyproject.toml's, as installed
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": model,
        "settings": {
            "image": settings.image.model_dump(),
            "video": settings.video.model_dump(),
            "finish": settings.finish.model_dump(),
            "outputs": settings.outputs.model_dump(),
        },
        "scenes": [records[n] for n in sorted(records)],
        **extras,
    }
    atomic_write_json(job.out / "manifest.json", manifest)
    return manifest


@contextlib.contextmanager
def _stop_explains(events: RenderEvents) -> Iterator[None]:
    """An encoder stopped by a signal while we are stopping was stopped by our own stop signal
    (one sent to every process, as some supervisors do): the story is interrupted and resumes
    later; it is never failed for it."""
    try:
        yield
    except EncoderStopped as err:
        if events.should_stop():
            raise Stopped() from err
        raise


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
    the ETA; it is updated here with what they cost this time.

    Every step is safe to repeat: a resumed story skips finished scenes (step 2) and redoes
    the rest, whose files all appear by atomic rename.
    """
    events = events or QuietEvents()
    tail = tail if tail is not None else TailCost()
    workers = as_workers(generator)

    # 1. Plan the scenes (prompts, seeds, seconds, motion) and lay out the work folder
    plans = plan_scenes(job.story, job.name, settings)
    _prepare(job)

    # 2. Scenes: image, finishing, PNG, clip, record (the GPU on N+1 while the CPU finishes N)
    own_pool = pool is None
    pool = pool or CpuPool(settings)
    try:
        with _stop_explains(events):
            records = render_scenes(job, plans, settings, workers, events, pool, tail)
    finally:
        if own_pool:
            pool.shutdown(wait=True)

    # 3. The input exactly as it arrived (the tail's cost is measured from here, see pipeline/eta.py)
    tail_started = time.perf_counter()
    atomic_write_bytes(job.out / "story.json", job.raw)

    # 4. Film and contact sheet, from the finished scenes
    with _stop_explains(events):
        extras = write_extras(job, plans, settings)

    # 5. Manifest: written after everything it describes
    manifest = write_manifest(job, records, extras, settings, workers.model())

    # 6. ZIP of the whole output folder, under NAME/, built last
    build_zip(job.out, job.zip_path, top=job.name)
    tail.measured(
        time.perf_counter() - tail_started, sum(round(p.seconds * settings.video.fps) for p in plans)
    )
    return manifest

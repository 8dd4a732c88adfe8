"""The scene loop: every unfinished scene, the GPU never waiting for the CPU.

The image workers (pipeline/images/: this thread with the local engine, Ray actors with
engine = "ray") make scene N+1 while a `CpuPool` thread finishes, saves and animates scene N.
A scene that brings its own picture (a bundle's) never reaches the image workers: the CPU pool
fits and animates it (records.finish_provided).
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

from pipeline.eta import StoryEta, TailCost
from pipeline.images.seam import GeneratedImage, ImageWorkers, SceneKey, SceneRequest, Ticket
from pipeline.prompts import ScenePlan
from pipeline.render.events import RenderEvents, Stopped
from pipeline.render.job import StoryJob
from pipeline.render.portraits import Cast
from pipeline.render.records import finish_provided, finish_scene, load_record
from pipeline.settings import Settings


class CpuPool(ThreadPoolExecutor):
    """Threads for the CPU half of each scene (finish, save, clip).

    Its size is also how many made images may wait for it, which bounds memory,
    so the number is decided once, here: `daemon.cpu_workers`, or by default one
    core fewer than the machine has (at least 1, at most 4).
    """

    def __init__(self, settings: Settings) -> None:
        self.size = settings.daemon.cpu_workers or max(1, min(4, (os.cpu_count() or 2) - 1))
        super().__init__(max_workers=self.size, thread_name_prefix="scene-cpu")


def scene_key(job: StoryJob, plan: ScenePlan) -> SceneKey:
    """The one way a scene is named to the image workers: render_scenes and the daemon's
    lookahead must agree, or an image made ahead is not adopted but made again."""
    return SceneKey(job.sequence or 0, job.claim, plan.number)


def scene_request(plan: ScenePlan, settings: Settings, cast: Cast | None = None) -> SceneRequest:
    """The scene as plain data, with the references of the characters it names (consistency on)."""
    img = settings.image
    return SceneRequest(
        prompt=plan.prompt,
        negative=plan.negative,
        seed=plan.seed,
        width=img.width,
        height=img.height,
        steps=img.steps,
        guidance=img.guidance,
        references=cast.for_scene(plan) if cast is not None else (),
    )


def unfinished(
    job: StoryJob, plans: list[ScenePlan], settings: Settings
) -> list[tuple[SceneKey, SceneRequest]]:
    """The scenes still to make, as the image workers are asked for them (the daemon's lookahead):
    a scene with its own picture is never one of them, nor one naming a character while
    consistency is on (its references are made in its turn)."""
    keeps = settings.characters.consistency == "on"
    return [
        (scene_key(job, p), scene_request(p, settings))
        for p in plans
        if p.picture is None and not (keeps and p.characters) and load_record(job, p) is None
    ]


def render_scenes(
    job: StoryJob,
    plans: list[ScenePlan],
    settings: Settings,
    workers: ImageWorkers,
    events: RenderEvents,
    pool: CpuPool,
    tail: TailCost,
    cast: Cast | None = None,
) -> dict[int, dict[str, Any]]:
    """Make every unfinished scene (with `cast`'s references); returns records by scene number.
    Raises Stopped.

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
                if later.number not in tickets and later.picture is None:
                    tickets[later.number] = workers.submit(
                        scene_key(job, later), scene_request(later, settings, cast)
                    )
            events.scene_started(plan, len(plans), eta.estimate(len(todo) - i, records))
            if plan.picture is not None:
                in_flight.append((plan, pool.submit(finish_provided, job, plan, settings)))
            else:
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

"""A story's cast: a reference portrait for each character a scene names, made once per story.

    make_cast(job, plans, settings, workers, events) -> Cast

Each portrait goes to the image workers as a `PortraitRequest` (plain data: any worker, a Ray
actor too, makes it) and comes back as its picture and its recorded `Reference`. The picture is
published as outbox/NAME/characters/X.png (the reference as the model made it: no finishing);
the reference is kept in the claim's work folder (characters/X.npz), then its record
(characters/X.json) is written last, so a resumed story replays the same references instead of
rendering its portraits again. A bundle's picture of the character (`characters.X.image`) is
fitted to the scenes' size and sent instead of a prompt to render. What is made where, and the
manifest's words for it: pipeline/images/consistency/plan.py.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import structlog

from pipeline.bundle.pictures import fit_picture
from pipeline.fsutil import atomic_write_json, atomic_writer
from pipeline.images.consistency.plan import (
    PortraitPlan,
    method_record,
    plan_portraits,
    referenced,
    scene_record,
    story_record,
)
from pipeline.images.consistency.reference import Reference, load_reference, save_reference
from pipeline.images.seam import GeneratedImage, ImageWorkers, PortraitRequest, SceneKey, Ticket
from pipeline.prompts import ScenePlan
from pipeline.render.events import RenderEvents, Stopped
from pipeline.render.job import StoryJob
from pipeline.settings import Settings

log = structlog.get_logger("storyreel")

# What a recorded reference must have been made by to be replayed: the same model, in the same dtype.
MODEL_KEYS = ("model", "revision", "variant", "dtype")


@dataclass
class Cast:
    """The story's portraits and, once made or replayed, each character's reference."""

    portraits: list[PortraitPlan] = field(default_factory=list)
    references: dict[str, Reference] = field(default_factory=dict)

    def for_scene(self, plan: ScenePlan) -> tuple[Reference, ...]:
        """The references a scene is made with, in the story's order of characters."""
        return tuple(self.references[p.character] for p in referenced(plan, self.portraits))

    def pictures(self, job: StoryJob) -> list[tuple[str, Path]]:
        """(name, published portrait) for the contact sheet, in the story's order."""
        return [(p.character, job.folder.portrait(p.stem)) for p in self.portraits]

    def story_record(self) -> dict[str, Any]:
        return story_record(self.portraits, {c: r.digest for c, r in self.references.items()})

    def scene_fields(
        self, plan: ScenePlan, record: dict[str, Any], settings: Settings, model: dict[str, Any]
    ) -> dict[str, Any]:
        """The manifest's per-scene record of characters, from what the worker says it attended to."""
        facts = model.get("characters") or {}
        method = method_record(
            settings, int(facts.get("shared_layers") or 0), cached=False, ip_adapter=facts.get("ip_adapter")
        )
        made = (record.get("generation") or {}).get("references") or []
        return scene_record(plan, self.portraits, method, made=made)


def portrait_key(job: StoryJob, plan: PortraitPlan) -> SceneKey:
    """A portrait's name to the image workers: before every scene of its story (scene 0)."""
    return SceneKey(job.sequence or 0, job.claim, 0, plan.character)


def portrait_request(job: StoryJob, plan: PortraitPlan) -> PortraitRequest:
    picture = None
    if plan.picture:
        fitted = fit_picture(job.file(plan.picture), plan.width, plan.height).image()
        buf = io.BytesIO()
        fitted.save(buf, format="PNG")
        picture = buf.getvalue()
    return PortraitRequest(
        character=plan.character,
        prompt=plan.prompt,
        negative=plan.negative,
        seed=plan.seed,
        width=plan.width,
        height=plan.height,
        steps=plan.steps,
        guidance=plan.guidance,
        picture=picture,
    )


def _facts(req: PortraitRequest, model: dict[str, Any], adapter: bool) -> dict[str, Any]:
    """What a recorded portrait was made from: it is replayed only if all of this is unchanged."""
    plain = {f.name: getattr(req, f.name) for f in fields(req) if f.name != "picture"}
    picture = hashlib.sha256(req.picture).hexdigest() if req.picture is not None else None
    made_by = {k: model.get(k) for k in MODEL_KEYS}
    return {**plain, "picture_sha256": picture, "model": made_by, "ip_adapter": adapter}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def recorded(job: StoryJob, plan: PortraitPlan, facts: dict[str, Any]) -> Reference | None:
    """The portrait's reference from the work folder, if it was made from these facts and its
    picture and reference are intact; else None (make it again)."""
    folder = job.folder
    try:
        record = json.loads(folder.portrait_record(plan.stem).read_text("utf-8"))
        if record["facts"] != facts or _sha256(folder.portrait(plan.stem)) != record["png_sha256"]:
            return None
        ref = load_reference(folder.reference(plan.stem))
        return ref if ref.digest == record["reference_sha256"] else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _keep(job: StoryJob, plan: PortraitPlan, facts: dict[str, Any], made: GeneratedImage) -> Reference:
    """Publish the picture, keep the reference, and write the record last."""
    folder = job.folder
    ref = made.reference
    if ref is None or ref.character != plan.character:
        raise RuntimeError(f"the image worker sent no reference for the portrait of {plan.character}")
    png = folder.portrait(plan.stem)
    with atomic_writer(png) as fh:
        made.image.save(fh, format="PNG")
    save_reference(folder.reference(plan.stem), ref)
    record = {
        "facts": facts,
        "png_sha256": _sha256(png),
        "reference_sha256": ref.digest,
        "generation": made.info,
        "timings": made.timings,
    }
    atomic_write_json(folder.portrait_record(plan.stem), record)
    return ref


def _wait(workers: ImageWorkers, ticket: Ticket, events: RenderEvents) -> GeneratedImage:
    while (made := workers.wait(ticket, 0.5, on_step=events.step)) is None:
        events.step(0, 0)  # another process makes it: the heartbeat and housekeeping go on here
    return made


def make_cast(
    job: StoryJob, plans: list[ScenePlan], settings: Settings, workers: ImageWorkers, events: RenderEvents
) -> Cast:
    """Every portrait the story needs (none with consistency off), made or replayed. Raises
    Stopped when `events` asks to stop between portraits (those made are kept)."""
    portraits = plan_portraits(job.story, job.name, settings, plans)
    if not portraits:
        return Cast()
    job.folder.portraits.mkdir(parents=True, exist_ok=True)
    job.folder.references.mkdir(parents=True, exist_ok=True)
    model, adapter = workers.model(), bool(settings.characters.ip_adapter)
    requests = {p.character: portrait_request(job, p) for p in portraits}
    facts = {who: _facts(req, model, adapter) for who, req in requests.items()}
    cast = Cast(portraits)
    for p in portraits:
        if (ref := recorded(job, p, facts[p.character])) is not None:
            cast.references[p.character] = ref
            log.info("portrait replayed", story=job.name, character=p.character, file=p.file)
    todo = [p for p in portraits if p.character not in cast.references]
    # All handed in at once: several workers make them side by side.
    tickets = {p.character: workers.submit(portrait_key(job, p), requests[p.character]) for p in todo}
    for p in todo:
        if events.should_stop():
            workers.withdraw()
            raise Stopped()
        made = _wait(workers, tickets[p.character], events)
        cast.references[p.character] = _keep(job, p, facts[p.character], made)
        log.info("portrait made", story=job.name, character=p.character, file=p.file, seed=p.seed)
    return cast

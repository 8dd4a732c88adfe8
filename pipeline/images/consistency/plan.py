"""Who needs a reference portrait, made how, published where; and what the manifest says of it.

No model here (and no torch): the daemon plans a story's cast before any GPU work, as it plans
its scenes. A portrait is made once per story for every character some scene names: the
character's own words and the story's style, a seed derived from the story seed (else its name)
and the character's name, and the scenes' size, steps and guidance, so that its trajectory
replays step for step inside every scene.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.prompts import HUMAN, NEGATIVE, NEGATIVE_HUMAN, QUALITY, ScenePlan
from pipeline.settings import Settings
from pipeline.story import SEED_MAX, Story, sanitize_name

FOLDER = "characters"  # outbox/NAME/characters/X.png
# Whole figure, so clothes are in the reference too; a plain ground gives the scenes nothing else.
FRAMING = "full-length portrait, standing, facing the camera, plain neutral background"
METHOD = "shared self-attention on a replayed reference trajectory"


@dataclass(frozen=True)
class PortraitPlan:
    """One character's reference portrait, before anything is rendered."""

    character: str
    stem: str  # file name without .png: the name sanitised as a story name is, X-2 on a clash
    prompt: str
    negative: str
    seed: int
    width: int
    height: int
    steps: int
    guidance: float
    picture: str | None  # the bundle's characters.X.image, used instead of a generated portrait

    @property
    def file(self) -> str:
        """Relative to the story's folder in the outbox."""
        return f"{FOLDER}/{self.stem}.png"

    @property
    def reference_file(self) -> str:
        """The recorded reference (`save_reference`), relative to the claim's work folder: a
        resumed story replays it instead of rendering the portrait again."""
        return f"{FOLDER}/{self.stem}.npz"

    @property
    def source(self) -> str:
        return "bundle picture" if self.picture else "generated"


def portrait_seed(base: int | str, character: str) -> int:
    """A stable seed per story and character, from a hash of its own (never a scene's seed)."""
    digest = hashlib.sha256(f"storyreel:portrait:{base}:{character}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % SEED_MAX


def cast_of(scenes: Iterable[ScenePlan], story: Story) -> list[str]:
    """The characters at least one scene names, in the story's order."""
    named = {who for plan in scenes for who in plan.characters}
    return [who for who in story.characters if who in named]


def file_stems(names: Sequence[str]) -> dict[str, str]:
    """Character -> file stem: sanitised, with -2, -3 ... where two come out alike.

    Alike is compared case-folded, since the outbox may be an SMB share that is case-blind.
    """
    taken: set[str] = set()
    stems: dict[str, str] = {}
    for name in names:
        base = sanitize_name(name)
        stem, n = base, 1
        while stem.casefold() in taken:
            n += 1
            stem = f"{base}-{n}"
        taken.add(stem.casefold())
        stems[name] = stem
    return stems


def _join(parts: list[str]) -> str:
    return ", ".join(p.strip().rstrip(",.") for p in parts if p and p.strip())


def plan_portraits(
    story: Story, name: str, settings: Settings, scenes: Sequence[ScenePlan]
) -> list[PortraitPlan]:
    """The portraits a story needs (none with consistency off)."""
    if settings.characters.consistency == "off":
        return []
    base: int | str = story.seed if story.seed is not None else name
    cast = cast_of(scenes, story)
    stems = file_stems(cast)
    img = settings.image
    plans = []
    for who in cast:
        character = story.characters[who]
        plans.append(
            PortraitPlan(
                character=who,
                stem=stems[who],
                prompt=_join([who, character.description or "", FRAMING, story.style or "", QUALITY, HUMAN]),
                negative=_join([NEGATIVE, NEGATIVE_HUMAN]),
                seed=portrait_seed(base, who),
                width=img.width,
                height=img.height,
                steps=img.steps,
                guidance=img.guidance,
                picture=character.image,
            )
        )
    return plans


def method_record(
    settings: Settings, layers: int, cached: bool, ip_adapter: dict[str, Any] | None
) -> dict[str, Any]:
    """The method and its settings, as the manifest shows them (the same for every scene of a run)."""
    return {
        "method": METHOD,
        "shared_layers": f"self-attention (attn1) of every up-block transformer ({layers} layers)",
        "shared_steps": "all",
        "shared_tokens": "all",
        "guidance_halves": "each scene half attends to the same half of the reference",
        "reference_pass": "cached" if cached else "every step of every scene",
        "ip_adapter": ip_adapter,  # {"folder", "file", "encoder", "scale"} or None
        "consistency": settings.characters.consistency,
    }


def referenced(plan: ScenePlan, portraits: Sequence[PortraitPlan]) -> list[PortraitPlan]:
    """The portraits a scene is made with, in the story's order of characters: the order their
    keys are appended in, fixed by the story alone."""
    return [p for p in portraits if p.character in plan.characters]


def scene_record(
    plan: ScenePlan,
    portraits: Sequence[PortraitPlan],
    method: dict[str, Any],
    made: Sequence[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Per scene: who was referenced, from which file, how; a scene naming no one says so.

    `made` is what the image worker recorded it attended to (each reference's character, source
    and digest): the truth when given, the plan's cast for the scene otherwise.
    """
    files = {p.character: p.file for p in portraits}
    if made is None:
        made = [{"character": p.character, "source": p.source} for p in referenced(plan, portraits)]
    if not made:
        return {"characters_referenced": [], "consistency": None}
    return {
        "characters_referenced": [m["character"] for m in made],
        "consistency": {
            **method,
            "references": [{**m, "file": files.get(m["character"])} for m in made],
        },
    }


def story_record(portraits: Sequence[PortraitPlan], digests: dict[str, str] | None = None) -> dict[str, Any]:
    """Per story: every portrait's file, seed and prompts (and, once made, its reference's digest)."""
    digests = digests or {}
    return {
        p.character: {
            "file": p.file,
            "source": p.source,
            "picture": p.picture,
            "prompt": p.prompt,
            "negative": p.negative,
            "seed": p.seed,
            "size": [p.width, p.height],
            "steps": p.steps,
            "guidance": p.guidance,
            **({"reference_sha256": digests[p.character]} if p.character in digests else {}),
        }
        for p in portraits
    }

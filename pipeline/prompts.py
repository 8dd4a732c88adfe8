"""Scene -> the text SDXL sees, and the seed it starts from.

Order matters to SDXL (earlier tokens weigh more), so a prompt reads: the
scene's own description, then who is in it (the story's character sheet for each
name the description mentions), then the story style, then the quality
template. Scenes about people also get the human-realism terms, because SDXL
base's most common failures are faces and hands.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass

from pipeline.settings import Motion, Settings
from pipeline.story import SEED_MAX, Story

QUALITY = (
    "photorealistic photograph, highly detailed, sharp focus, natural lighting, "
    "realistic textures, 35mm lens, high dynamic range, professional color grading"
)
HUMAN = (
    "symmetrical face, natural skin texture with visible pores, realistic eyes, "
    "anatomically correct hands with five fingers, correct body proportions"
)
NEGATIVE = (
    "blurry, out of focus, motion blur, low resolution, jpeg artifacts, cartoon, anime, manga, "
    "illustration, painting, drawing, sketch, 3d render, cgi, plastic, unrealistic textures, "
    "oversaturated, watermark, text, logo, signature, frame, deformed, distorted"
)
NEGATIVE_HUMAN = (
    "deformed face, asymmetrical face, disfigured, cross-eyed, deformed hands, extra fingers, "
    "missing fingers, fused fingers, mutated hands, extra limbs, malformed limbs, bad anatomy, "
    "long neck, waxy skin, airbrushed skin"
)

_PEOPLE = re.compile(
    r"\b(people|person|persons|man|men|woman|women|child|children|kid|kids|boy|boys|girl|girls|"
    r"baby|babies|face|faces|hand|hands|portrait|crowd|family|friends?|mother|father|"
    r"grand(mother|father|ma|pa)|old(er)? (man|woman)|lady|ladies|gentleman|guy|couple|"
    r"he|she|him|her|his|teacher|doctor|nurse|soldier|worker|farmer|fisherman|dancer|"
    r"musician|singer|player|runner|rider|driver|chef|king|queen|prince|princess|wife|husband|"
    r"son|daughter|brother|sister|smil(e|es|ing)|hugs?|holding)\b",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class ScenePlan:
    """Everything about one scene that does not need the model: text, seed, timing."""

    index: int  # 0-based
    description: str
    prompt: str
    negative: str
    human: bool
    characters: tuple[str, ...]
    seed: int
    seconds: float
    motion: Motion
    picture: str | None = None  # the scene's own picture (a bundle's path): used, never generated

    @property
    def number(self) -> int:
        return self.index + 1

    @property
    def stem(self) -> str:
        return f"scene_{self.number:03d}"


def named_characters(description: str, characters: Iterable[str]) -> list[str]:
    """The characters a description names: each name as a whole word, case-insensitively."""
    found = []
    for name in characters:
        if re.search(rf"(?<!\w){re.escape(name)}(?!\w)", description, re.IGNORECASE):
            found.append(name)
    return found


def is_human_scene(description: str, named: list[str]) -> bool:
    return bool(named) or bool(_PEOPLE.search(description))


def derive_seed(base: int | str, index: int) -> int:
    """A stable seed for scene `index` (0-based): same story, same seeds, on any machine."""
    digest = hashlib.sha256(f"storyreel:{base}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % SEED_MAX


def _join(parts: list[str]) -> str:
    return ", ".join(p.strip().rstrip(",.") for p in parts if p and p.strip())


def plan_scenes(story: Story, name: str, settings: Settings) -> list[ScenePlan]:
    plans = []
    base: int | str = story.seed if story.seed is not None else name
    looks = story.appearance()
    for i, scene in enumerate(story.scenes):
        named = named_characters(scene.description, looks)
        human = is_human_scene(scene.description, named)
        cast = [f"{who}: {looks[who]}" if looks[who] else who for who in named]
        prompt = _join([scene.description, *cast, story.style or "", QUALITY, HUMAN if human else ""])
        negative = _join([NEGATIVE, NEGATIVE_HUMAN if human else ""])
        plans.append(
            ScenePlan(
                index=i,
                description=scene.description,
                prompt=prompt,
                negative=negative,
                human=human,
                characters=tuple(named),
                seed=scene.seed if scene.seed is not None else derive_seed(base, i),
                seconds=float(
                    scene.seconds if scene.seconds is not None else settings.video.seconds_per_scene
                ),
                motion=scene.motion or settings.video.motion,
                picture=scene.image,
            )
        )
    return plans

"""Which portraits a story needs, their prompts, seeds and file names, and the manifest's records."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from pipeline.images.consistency.plan import (
    FOLDER,
    cast_of,
    file_stems,
    method_record,
    plan_portraits,
    portrait_seed,
    referenced,
    scene_record,
    story_record,
)
from pipeline.prompts import NEGATIVE_HUMAN, derive_seed, plan_scenes
from pipeline.settings import LimitsSettings, Settings, settings_from_dict
from pipeline.story import SEED_MAX, Story, validate_story

from conftest import REPO

STORY = {
    "seed": 7,
    "style": "overcast Atlantic light",
    "characters": {
        "Mara": "a woman in her sixties, silver braid, yellow raincoat",
        "Tom": {"description": "a tall fisherman"},
        "Nobody": "never named by a scene",
        "Ann": {"image": "cast/ann.jpg"},
    },
    "scenes": ["Mara climbs the stairs", "Tom and MARA mend nets", "the sea", "Ann waves"],
}


def load(doc: dict[str, object], bundle: bool = True) -> Story:
    return validate_story(doc, LimitsSettings(), bundle=bundle)


def settings(**characters: object) -> Settings:
    return settings_from_dict(
        {"image": {"width": 512, "height": 384, "steps": 12}, "characters": characters}, Path.cwd()
    )


def test_a_portrait_for_each_character_a_scene_names() -> None:
    story, s = load(STORY), settings()
    scenes = plan_scenes(story, "keeper", s)
    portraits = plan_portraits(story, "keeper", s, scenes)
    assert [p.character for p in portraits] == ["Mara", "Tom", "Ann"] == cast_of(scenes, story)
    mara = portraits[0]
    assert mara.prompt.startswith("Mara, a woman in her sixties, silver braid, yellow raincoat, full-length")
    assert "overcast Atlantic light" in mara.prompt and NEGATIVE_HUMAN in mara.negative
    assert (mara.width, mara.height, mara.steps, mara.guidance) == (512, 384, 12, 6.0)  # the scenes' own
    assert mara.seed == portrait_seed(7, "Mara") and 0 <= mara.seed < SEED_MAX
    assert mara.seed not in {sc.seed for sc in scenes} and mara.seed != derive_seed(7, 0)
    assert mara.file == f"{FOLDER}/Mara.png" and mara.source == "generated" and mara.picture is None
    assert mara.reference_file == f"{FOLDER}/Mara.npz"
    ann = portraits[2]
    assert (
        ann.picture == "cast/ann.jpg"
        and ann.source == "bundle picture"
        and ann.prompt.startswith("Ann, full-length")
    )


def test_seeds_follow_the_story_seed_else_its_name() -> None:
    unseeded = load({**STORY, "seed": None})
    s = settings()
    a = plan_portraits(unseeded, "keeper", s, plan_scenes(unseeded, "keeper", s))[0]
    b = plan_portraits(unseeded, "other", s, plan_scenes(unseeded, "other", s))[0]
    assert a.seed == portrait_seed("keeper", "Mara") != b.seed
    again = plan_portraits(load(STORY), "x", s, plan_scenes(load(STORY), "x", s))[0]
    assert again.seed == portrait_seed(7, "Mara")  # the name does not matter once there is a seed


def test_a_seed_is_the_same_in_a_fresh_process() -> None:
    code = "from pipeline.images.consistency.plan import portrait_seed; print(portrait_seed(7, 'Mara'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert int(out.stdout) == portrait_seed(7, "Mara")


def test_consistency_off_plans_no_portrait() -> None:
    story, s = load(STORY), settings(consistency="off")
    assert plan_portraits(story, "keeper", s, plan_scenes(story, "keeper", s)) == []


def test_file_names_are_sanitised_and_kept_apart() -> None:
    stems = file_stems(["Mara", "mara", "A/B", "A:B", ".hidden", "Zoë", "MARA"])
    assert stems == {
        "Mara": "Mara",
        "mara": "mara-2",  # alike on a case-blind share
        "A/B": "A_B",
        "A:B": "A_B-2",
        ".hidden": "hidden",
        "Zoë": "Zoë",
        "MARA": "MARA-3",
    }


def test_what_the_manifest_records() -> None:
    story, s = load(STORY), settings()
    scenes = plan_scenes(story, "keeper", s)
    portraits = plan_portraits(story, "keeper", s, scenes)
    method = method_record(s, layers=36, cached=False, ip_adapter=None)
    two = scene_record(scenes[1], portraits, method)
    assert (
        two["characters_referenced"]
        == ["Mara", "Tom"]
        == [p.character for p in referenced(scenes[1], portraits)]
    )
    assert [r["file"] for r in two["consistency"]["references"]] == [
        "characters/Mara.png",
        "characters/Tom.png",
    ]
    assert (
        two["consistency"]["method"] == method["method"]
        and "36 layers" in two["consistency"]["shared_layers"]
    )
    assert scene_record(scenes[2], portraits, method) == {"characters_referenced": [], "consistency": None}
    per_story = story_record(portraits, {"Mara": "ab" * 32})
    assert set(per_story) == {"Mara", "Tom", "Ann"}
    assert (
        per_story["Mara"]["seed"] == portraits[0].seed and per_story["Mara"]["prompt"] == portraits[0].prompt
    )
    assert per_story["Mara"]["reference_sha256"] == "ab" * 32 and "reference_sha256" not in per_story["Tom"]
    assert per_story["Ann"]["picture"] == "cast/ann.jpg"
    json.dumps({"scene": two, "story": per_story})  # JSON-ready as it is


def test_planning_needs_no_torch() -> None:
    code = "import sys, pipeline.images.consistency.plan; assert 'torch' not in sys.modules, 'heavy'"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr


def test_the_lookahead_never_offers_a_scene_that_needs_references(tmp_path: Path) -> None:
    """Scenes of a queued story are made ahead only when their request is complete: one naming a
    character waits for its story's turn, when its portraits are made (consistency on)."""
    from pipeline.render import StoryJob
    from pipeline.render.scenes import unfinished

    story = load(STORY)
    job = StoryJob("keeper", story, b"", tmp_path / "work")
    on = unfinished(job, plan_scenes(story, "keeper", settings()), settings())
    assert [key.scene for key, _ in on] == [3]  # "the sea"
    off_settings = settings(consistency="off")
    off = unfinished(job, plan_scenes(story, "keeper", off_settings), off_settings)
    assert [key.scene for key, _ in off] == [1, 2, 3, 4] and all(not r.references for _, r in off)

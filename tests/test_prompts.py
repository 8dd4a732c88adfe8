"""Prompt building: order, characters, human-centric terms, seeds."""

from __future__ import annotations

from pipeline.prompts import HUMAN, NEGATIVE_HUMAN, QUALITY, derive_seed, plan_scenes
from pipeline.settings import Settings
from pipeline.story import Story

SETTINGS = Settings()


def story(**kw: object) -> Story:
    return Story.model_validate({"scenes": ["x"], **kw})


def test_description_then_characters_then_style_then_quality() -> None:
    s = story(
        style="film noir",
        characters={"Mara": "silver braid, yellow raincoat", "Tom": "a tall fisherman"},
        scenes=["Mara waits at the harbour"],
    )
    plan = plan_scenes(s, "n", SETTINGS)[0]
    p = plan.prompt
    assert p.startswith("Mara waits at the harbour")
    assert p.index("Mara: silver braid") < p.index("film noir") < p.index(QUALITY)
    assert "Tom" not in p  # only the characters the scene names
    assert plan.characters == ("Mara",)


def test_character_match_is_whole_word_and_case_insensitive() -> None:
    s = story(characters={"Ann": "a girl in red"}, scenes=["annoying rain", "then ANN appears"])
    plans = plan_scenes(s, "n", SETTINGS)
    assert plans[0].characters == () and plans[1].characters == ("Ann",)


def test_human_scenes_get_human_terms() -> None:
    s = story(scenes=["An old woman smiles at the camera", "A lighthouse on a rock at dawn"])
    person, place = plan_scenes(s, "n", SETTINGS)
    assert person.human and HUMAN in person.prompt and NEGATIVE_HUMAN in person.negative
    assert not place.human and HUMAN not in place.prompt and NEGATIVE_HUMAN not in place.negative
    for plan in (person, place):
        for word in ("blurry", "cartoon", "anime", "deformed", "unrealistic textures"):
            assert word in plan.negative


def test_seeds_explicit_else_derived_and_stable() -> None:
    s = story(seed=7, scenes=[{"description": "a", "seed": 42}, "b", "c"])
    plans = plan_scenes(s, "name", SETTINGS)
    assert plans[0].seed == 42
    assert plans[1].seed == derive_seed(7, 1) and plans[2].seed == derive_seed(7, 2)
    assert plans[1].seed != plans[2].seed
    assert derive_seed(7, 1) == 3550663788  # fixed forever: a seed means the same image next year
    unseeded = plan_scenes(story(scenes=["a"]), "my-story", SETTINGS)[0]
    assert unseeded.seed == derive_seed("my-story", 0)


def test_seconds_and_motion_default_from_settings() -> None:
    s = story(scenes=[{"description": "a", "seconds": 2, "motion": "pan_left"}, "b"])
    a, b = plan_scenes(s, "n", SETTINGS)
    assert (a.seconds, a.motion) == (2.0, "pan_left")
    assert (b.seconds, b.motion) == (SETTINGS.video.seconds_per_scene, SETTINGS.video.motion)
    assert (a.stem, b.stem) == ("scene_001", "scene_002")

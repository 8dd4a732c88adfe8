"""The story format: good stories pass, every kind of bad one names its field."""

from __future__ import annotations

import json

import pytest

from pipeline.settings import LimitsSettings
from pipeline.story import SEED_MAX, StoryError, load_story, sanitize_name, story_schema

LIMITS = LimitsSettings()


def problems(data: bytes | str, limits: LimitsSettings = LIMITS) -> list[str]:
    raw = data.encode() if isinstance(data, str) else data
    with pytest.raises(StoryError) as info:
        load_story(raw, limits)
    return info.value.problems


def test_full_story_from_the_contract() -> None:
    story = load_story(
        json.dumps(
            {
                "title": "t",
                "seed": 7,
                "style": "noir",
                "characters": {"Mara": "a woman in her sixties, silver braid, yellow raincoat"},
                "scenes": [
                    {"description": "Mara at the door", "seed": 42, "seconds": 5, "motion": "zoom_in"},
                    "plain string scene",
                ],
            }
        ).encode(),
        LIMITS,
    )
    assert [s.description for s in story.scenes] == ["Mara at the door", "plain string scene"]
    assert story.scenes[0].seed == 42 and story.scenes[1].seed is None


def test_only_scenes_is_required_and_bom_is_fine() -> None:
    story = load_story(b'\xef\xbb\xbf{"scenes": ["x"]}', LIMITS)
    assert story.title is None and story.characters == {}


@pytest.mark.parametrize(
    ("doc", "field", "words"),
    [
        ({"scenes": ["x"], "titel": "typo"}, "titel", "unknown field"),
        ({"scenes": [{"description": "x", "sede": 1}]}, "scenes.0.sede", "unknown field"),
        ({"scenes": [{"description": "x", "seed": -1}]}, "scenes.0.seed", "greater than or equal"),
        ({"scenes": [{"description": "x", "seed": SEED_MAX}]}, "scenes.0.seed", "less than"),
        ({"scenes": [{"description": "x", "seed": 1.5}]}, "scenes.0.seed", "integer"),
        ({"scenes": [{"description": "x", "seed": True}]}, "scenes.0.seed", "integer"),
        ({"scenes": ["ok", {"description": "x", "motion": "spin"}]}, "scenes.1.motion", "zoom_in"),
        ({"scenes": [{"description": "x", "seconds": 0}]}, "scenes.0.seconds", "outside"),
        ({"scenes": [{"description": "x", "seconds": 1e6}]}, "scenes.0.seconds", "outside"),
        ({"scenes": [{"description": "x", "seconds": "5"}]}, "scenes.0.seconds (scene 1)", 'number, got "5"'),
        ({"scenes": ["x", {"description": "x", "seconds": True}]}, "scenes.1.seconds (scene 2)", "true"),
        ({"scenes": []}, "scenes", "at least 1"),
        ({"title": "x"}, "scenes", "required"),
        ({"scenes": [""]}, "scenes.0.description", "at least 1"),
        ({"scenes": [{"seed": 1}]}, "scenes.0.description", "required"),
        ({"scenes": "one"}, "scenes", "list"),
        ({"scenes": ["x"], "characters": ["Mara"]}, "characters", "dictionary"),
        ({"scenes": ["x"], "seed": "7"}, "seed", "integer"),
    ],
)
def test_schema_violations_name_the_field(doc: dict[str, object], field: str, words: str) -> None:
    found = problems(json.dumps(doc))
    assert len(found) == 1 and found[0].startswith(field) and words in found[0], (
        found
    )  # one problem, one line


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"", "empty"),
        (b"  \n\t ", "empty"),
        (b"not json", "not valid JSON"),
        (b'{"scenes": ["x"', "not valid JSON"),
        (b"\x89PNG\r\n\x1a\n\x00\x00garbage", "UTF-8"),
        (b"[1, 2]", "must be a JSON object"),
        (b'"just a string"', "must be a JSON object"),
        (b'{"scenes": ["x"], "seed": NaN}', "NaN"),
        (b'{"scenes": [{"description": "x", "seconds": Infinity}]}', "Infinity"),
        ('{"scenes": ["x"]}'.encode("utf-16"), "UTF-16"),
        (b'{"scenes": ["caf\xe9"]}', "UTF-8"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"a":' * 40 + b"1" + b"}" * 40, "nested too deeply"),
        (b'{"scenes": ["x"], "scenes": ["y"]}', "duplicate key"),
    ],
)
def test_broken_files_get_a_readable_message(data: bytes, words: str) -> None:
    assert any(words in p for p in problems(data)), problems(data)


def test_limits_come_from_config() -> None:
    small = LimitsSettings(max_file_bytes=100, max_scenes=2, max_description_chars=10, max_title_chars=5)
    assert "over the limit of 100 bytes" in problems("x" * 101, small)[0]
    found = problems(json.dumps({"title": "too long", "scenes": ["a", "b", "c"]}), small)
    assert any(p.startswith("scenes:") and "limit of 2" in p for p in found)
    assert any(p.startswith("title:") for p in found)
    found = problems(json.dumps({"scenes": ["a" * 11]}), small)
    assert found[0].startswith("scenes.0 (scene 1).description")


@pytest.mark.parametrize(
    ("stem", "expected"),
    [
        ("story", "story"),
        ("../../etc/passwd", "_.._etc_passwd"),
        (".hidden", "hidden"),
        ("a/b\\c:d", "a_b_c_d"),
        ("Ünïcødé 故事", "Ünïcødé 故事"),
        ("...", "story"),
        ("tab\there", "tab_here"),
    ],
)
def test_names_are_sanitised(stem: str, expected: str) -> None:
    assert sanitize_name(stem) == expected


def test_names_are_capped_in_chars_and_bytes() -> None:
    assert len(sanitize_name("x" * 500, 80)) == 80
    assert len(sanitize_name("故" * 500, 500).encode()) <= 200


def test_schema_describes_the_format() -> None:
    schema = story_schema()
    assert schema["required"] == ["scenes"]
    assert schema["additionalProperties"] is False
    items = schema["properties"]["scenes"]["items"]["anyOf"]
    assert {"type": "string", "minLength": 1} in items


def test_characters_may_be_objects_and_scenes_narrated() -> None:
    doc = {
        "characters": {"Mara": "silver braid", "Tom": {"description": "a tall fisherman"}},
        "scenes": [{"description": "Mara and Tom", "narration": "They meet.\nAt last."}],
    }
    story = load_story(json.dumps(doc).encode(), LIMITS)
    assert story.appearance() == {"Mara": "silver braid", "Tom": "a tall fisherman"}
    assert story.scenes[0].narration == "They meet.\nAt last."
    assert story.files() == []


def test_file_fields_only_in_a_bundle() -> None:
    doc = {
        "characters": {"Mara": {"image": "cast/mara.jpg"}},
        "scenes": [{"description": "x", "image": "img/1.png", "audio": "voice/1.wav"}],
        "music": "music.mp3",
    }
    raw = json.dumps(doc).encode()
    found = problems(raw)
    for field in ("characters.Mara.image", "scenes.0.image (scene 1)", "scenes.0.audio (scene 1)", "music"):
        assert any(p.startswith(f"{field}: ") and "only a story bundle" in p for p in found), (field, found)
    story = load_story(raw, LIMITS, bundle=True)
    assert [path for _, path in story.files()] == ["cast/mara.jpg", "img/1.png", "voice/1.wav", "music.mp3"]


@pytest.mark.parametrize(
    "path", ["/etc/passwd", "../x.png", "a/../../x.png", "C:/x.png", "a\\b.png", "", "a//b"]
)
def test_file_fields_are_relative_paths_inside_the_bundle(path: str) -> None:
    doc = {"scenes": [{"description": "x", "image": path}]}
    found = problems(json.dumps(doc), LIMITS) if path else problems(json.dumps(doc))
    assert any(p.startswith("scenes.0.image (scene 1): ") for p in found), found


def test_a_character_needs_a_description_or_an_image() -> None:
    found = problems(json.dumps({"characters": {"Mara": {}}, "scenes": ["x"]}))
    assert any(p.startswith("characters.Mara: ") and "description or an image" in p for p in found), found


def test_narration_is_limited_like_a_description() -> None:
    limits = LimitsSettings(max_description_chars=10)
    found = problems(json.dumps({"scenes": [{"description": "x", "narration": "y" * 11}]}), limits)
    assert found == ["scenes.0 (scene 1).narration: longer than 10 characters"]


def test_schema_allows_character_strings_and_objects() -> None:
    who = story_schema()["properties"]["characters"]["additionalProperties"]["anyOf"]
    assert {"type": "string", "minLength": 1} in who and len(who) == 2

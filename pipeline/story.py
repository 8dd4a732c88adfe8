"""The story format: bytes from a stranger -> a validated `Story`, or a `StoryError`.

Everything a person can get wrong in a story file ends here as a `StoryError`
whose lines each name the field path (`scenes.2.seed`), so the daemon can turn
it into a `failed` status that someone can act on. Checks run cheapest first:
size, encoding, JSON syntax, nesting, then the schema and the configured limits.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from pipeline.names import sanitize_name as sanitize_name  # the name rules live there
from pipeline.settings import MOTIONS, LimitsSettings, Motion

SEED_MAX = 2**32  # seeds are 0 <= seed < 2**32 (what torch.Generator and numpy both accept)

Seed = Annotated[StrictInt, Field(ge=0, lt=SEED_MAX, description="0 <= seed < 2^32")]
Text = Annotated[str, Field(min_length=1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, str_strip_whitespace=True)


def _bundle_path(value: str) -> str:
    """A file field's syntax: a relative, `/`-separated path inside the bundle.

    Whether it exists and decodes is the bundle's question (pipeline/bundle/); this only
    refuses what can never name a file inside it, so the message comes with the field.
    """
    if not value or "\x00" in value:
        raise ValueError("must be a relative path inside the bundle, e.g. images/scene1.jpg")
    if "\\" in value:
        raise ValueError(f"{value!r}: use '/' between folders, not '\\'")
    if value.startswith("/") or (len(value) >= 2 and value[1] == ":"):
        raise ValueError(f"{value!r}: must be relative to the folder holding story.json, not absolute")
    if any(part in ("", ".", "..") for part in value.split("/")):
        raise ValueError(f"{value!r}: must not contain empty, '.' or '..' parts")
    return value


BundlePath = Annotated[
    str,
    AfterValidator(_bundle_path),
    Field(description="A file inside the story bundle: a path relative to the folder holding story.json."),
]
# The fields that name a file inside a bundle; a plain story.json may not use them.
FILE_FIELDS = ("characters.X.image", "scenes[i].image", "scenes[i].audio", "music")


class Scene(_Strict):
    description: Text = Field(description="What the image shows. Named characters are expanded.")
    seed: Seed | None = Field(None, description="Fixed seed; default: derived from the story seed and index.")
    # One type, not StrictFloat | StrictInt: a union reports a wrong value once per member.
    seconds: StrictFloat | None = Field(
        None, description="Clip length, a minimum: a narrated scene lasts as long as its narration."
    )
    motion: Motion | None = Field(None, description=f"Camera motion, one of {', '.join(MOTIONS)}.")
    narration: Text | None = Field(None, description="Read aloud over the scene and shown as its caption.")
    image: BundlePath | None = Field(None, description="Bundle only: the scene's own picture, not generated.")
    audio: BundlePath | None = Field(None, description="Bundle only: the scene's narration as a sound file.")


class Character(_Strict):
    description: Text | None = Field(None, description="Appearance, added to every prompt naming them.")
    image: BundlePath | None = Field(None, description="Bundle only: a reference picture of the character.")

    @model_validator(mode="after")
    def _something(self) -> Character:
        if self.description is None and self.image is None:
            raise ValueError("needs a description or an image (or both)")
        return self


class Story(_Strict):
    title: str | None = None
    seed: Seed | None = Field(None, description="Seeds every scene without a seed of its own.")
    style: str | None = Field(None, description="Look of the whole story, added to every prompt.")
    characters: dict[Text, Character] = Field(
        default_factory=dict, description="Name -> appearance (a string), or an object."
    )
    scenes: list[Scene] = Field(min_length=1, description="Objects, or plain strings (a description).")
    music: BundlePath | None = Field(None, description="Bundle only: music under the whole film.")

    @field_validator("scenes", mode="before")
    @classmethod
    def _strings_are_scenes(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"description": v} if isinstance(v, str) else v for v in value]
        return value

    @field_validator("characters", mode="before")
    @classmethod
    def _strings_are_descriptions(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: {"description": v} if isinstance(v, str) else v for k, v in value.items()}
        return value

    def appearance(self) -> dict[str, str]:
        """Name -> the words that describe them in prompts ("" for a character known by picture only)."""
        return {name: c.description or "" for name, c in self.characters.items()}

    def files(self) -> list[tuple[str, str]]:
        """(field path, bundle path) of every file the story names, in reading order."""
        found = [(f"characters.{n}.image", c.image) for n, c in self.characters.items() if c.image]
        for i, sc in enumerate(self.scenes):
            found += [
                (f"scenes.{i}.{k} (scene {i + 1})", v)
                for k, v in (("image", sc.image), ("audio", sc.audio))
                if v
            ]
        if self.music:
            found.append(("music", self.music))
        return found


class StoryError(ValueError):
    """A story that cannot be made; `problems` are 'field.path: message' lines."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def story_schema() -> dict[str, Any]:
    schema = Story.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "storyreel story"
    # Plain strings are accepted as scenes; say so in the schema too.
    scene_ref = schema["properties"]["scenes"]["items"]
    schema["properties"]["scenes"]["items"] = {"anyOf": [scene_ref, {"type": "string", "minLength": 1}]}
    # Likewise a character may be just its description.
    who = schema["properties"]["characters"]["additionalProperties"]
    schema["properties"]["characters"]["additionalProperties"] = {
        "anyOf": [{"type": "string", "minLength": 1}, who]
    }
    schema["description"] = (
        "A story: inbox/NAME.json, or story.json inside inbox/NAME.zip (a bundle). "
        f"File fields ({', '.join(FILE_FIELDS)}) name files inside a bundle and are refused in a plain story."
    )
    return schema


def _path(loc: tuple[int | str, ...]) -> str:
    text = ".".join(str(p) for p in loc) or "(top level)"
    if len(loc) >= 2 and loc[0] == "scenes" and isinstance(loc[1], int):
        text += f" (scene {loc[1] + 1})"
    return text


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed (JSON has no NaN or Infinity)")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _depth(value: Any, limit: int, level: int = 1) -> int:
    if level > limit or not isinstance(value, dict | list):
        return level
    children = value.values() if isinstance(value, dict) else value
    return max((_depth(v, limit, level + 1) for v in children), default=level)


def decode_text(data: bytes) -> str:
    """UTF-8 only (a BOM is fine); UTF-16 and other encodings get a clear error."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")) or (len(data) >= 2 and b"\x00" in data[:4]):
        raise StoryError(["(file): must be UTF-8 text; this looks like UTF-16"])
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise StoryError([f"(file): must be UTF-8 text; invalid byte at offset {err.start}"]) from None


def parse_json(data: bytes, limits: LimitsSettings) -> Any:
    if len(data) > limits.max_file_bytes:
        raise StoryError([f"(file): {len(data)} bytes is over the limit of {limits.max_file_bytes} bytes"])
    text = decode_text(data)
    if not text.strip():
        raise StoryError(["(file): the file is empty"])
    try:
        value = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_no_duplicate_keys)
    except RecursionError:
        raise StoryError([f"(file): JSON nested too deeply (limit {limits.max_json_depth} levels)"]) from None
    except json.JSONDecodeError as err:
        raise StoryError(
            [f"(file): not valid JSON: {err.msg} at line {err.lineno} column {err.colno}"]
        ) from None
    except ValueError as err:
        raise StoryError([f"(file): not valid JSON: {err}"]) from None
    if _depth(value, limits.max_json_depth) > limits.max_json_depth:
        raise StoryError([f"(file): JSON nested too deeply (limit {limits.max_json_depth} levels)"])
    if not isinstance(value, dict):
        kind = (
            type(value).__name__.replace("list", "array").replace("str", "string").replace("dict", "object")
        )
        raise StoryError([f"(top level): must be a JSON object with a 'scenes' list, got {kind}"])
    return value


def _limit_problems(story: Story, limits: LimitsSettings) -> list[str]:
    problems = []
    if len(story.scenes) > limits.max_scenes:
        problems.append(f"scenes: {len(story.scenes)} scenes is over the limit of {limits.max_scenes}")
    if story.title is not None and len(story.title) > limits.max_title_chars:
        problems.append(f"title: longer than {limits.max_title_chars} characters")
    if story.style is not None and len(story.style) > limits.max_style_chars:
        problems.append(f"style: longer than {limits.max_style_chars} characters")
    if len(story.characters) > limits.max_characters:
        problems.append(f"characters: more than {limits.max_characters} characters")
    for name, who in story.characters.items():
        if len(who.description or "") > limits.max_description_chars or len(name) > limits.max_title_chars:
            problems.append(f"characters.{name}: longer than {limits.max_description_chars} characters")
    for i, scene in enumerate(story.scenes):
        where = _path(("scenes", i))
        if len(scene.description) > limits.max_description_chars:
            problems.append(f"{where}.description: longer than {limits.max_description_chars} characters")
        if scene.narration is not None and len(scene.narration) > limits.max_description_chars:
            problems.append(f"{where}.narration: longer than {limits.max_description_chars} characters")
        if scene.seconds is not None and not (
            limits.min_scene_seconds <= scene.seconds <= limits.max_scene_seconds
        ):
            problems.append(
                f"scenes.{i}.seconds (scene {i + 1}): {scene.seconds} is outside "
                f"{limits.min_scene_seconds}..{limits.max_scene_seconds} seconds"
            )
    return problems


def _message(error: ErrorDetails) -> str:
    """pydantic's message; for a wrong type also what was given (`got "5" (a string)`)."""
    if error["type"] == "extra_forbidden":
        return "unknown field (check the spelling)"
    if error["type"].endswith("_type"):
        return f"{error['msg']}, got {_shown(error['input'])}"
    return error["msg"]


def _shown(value: Any) -> str:
    """A wrong value as the JSON it came from, kept short: "5" (a string), true, null, a list."""
    if isinstance(value, str) and len(value) <= 40:
        return f"{json.dumps(value, ensure_ascii=False)} (a string)"
    if value is None or isinstance(value, bool | int | float):
        return json.dumps(value)
    kinds: dict[type, str] = {str: "a long string", list: "a list", dict: "an object"}
    return kinds.get(type(value), type(value).__name__)


def validate_story(value: Any, limits: LimitsSettings, bundle: bool = False) -> Story:
    """A parsed story checked against the schema and the limits; `bundle` allows file fields."""
    try:
        story = Story.model_validate(value)
    except ValidationError as err:
        raise StoryError([f"{_path(e['loc'])}: {_message(e)}" for e in err.errors()]) from None
    problems = _limit_problems(story, limits)
    if not bundle:
        problems += [
            f"{where}: names a file ({path!r}), which only a story bundle (NAME.zip) can bring"
            for where, path in story.files()
        ]
    if problems:
        raise StoryError(problems)
    return story


def load_story(data: bytes, limits: LimitsSettings, bundle: bool = False) -> Story:
    return validate_story(parse_json(data, limits), limits, bundle)

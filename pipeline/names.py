"""What a story is called, and what its files in the outbox are called: the one set of name rules.

A story is dropped as NAME.json (a story file) or NAME.zip (a story bundle), either suffix compared
case-insensitively (`story_kind`). Its name comes from the file it was dropped as (`name_of_drop`:
the stem, sanitised), and
takes the first of NAME, NAME-2, NAME-3 … that nothing in the outbox holds yet (`first_free`),
so nothing is ever overwritten. In the outbox a name holds three entries (`outbox_entries`): the
folder NAME/, NAME.zip and the status sidecar NAME.status.jsonl. The status page's own names
(`index.html`, `.storyreel/`) are never a story's (`is_reserved`); they are compared casefolded
because SMB shares are case-insensitive.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable
from pathlib import PurePath

PAGE = "index.html"  # the status page
PAGE_ASSETS = ".storyreel"  # its style sheet and thumbnails
RESERVED_NAMES = frozenset({PAGE, PAGE_ASSETS})
SIDECAR_SUFFIX = ".status.jsonl"
ZIP_SUFFIX = ".zip"
STORY_SUFFIX = ".json"  # inbox/NAME.json: a story file
BUNDLE_SUFFIX = ".zip"  # inbox/NAME.zip: a story bundle (story.json and the files it names)
MAX_NAME_BYTES = 200  # fits every filesystem's name limit (255 bytes) with room for suffixes

_UNSAFE = set('/\\:*?"<>|')


def sanitize_name(stem: str, max_chars: int = 80) -> str:
    """A story name safe on Linux and SMB shares: letters of any script are kept.

    Path separators, Windows-reserved and control characters become '_'; leading
    dots and spaces go (no hidden or relative names); the result is capped in
    characters and to 200 bytes of UTF-8 so it fits any filesystem's name limit.
    """
    stem = unicodedata.normalize("NFC", stem)
    chars = ["_" if (c in _UNSAFE or unicodedata.category(c)[0] == "C") else c for c in stem]
    name = "".join(chars).strip().lstrip(". ").rstrip(". ")
    name = name[:max_chars]
    while len(name.encode("utf-8")) > MAX_NAME_BYTES:
        name = name[:-1]
    return name or "story"


def story_kind(file_name: str) -> str | None:
    """ "story" for NAME.json, "bundle" for NAME.zip (case-insensitively: Windows clients over SMB
    write "STORY.JSON"), None for any other name. A bare suffix (".json") is no story."""
    lower = file_name.lower()
    for suffix, kind in ((STORY_SUFFIX, "story"), (BUNDLE_SUFFIX, "bundle")):
        if lower.endswith(suffix) and len(lower) > len(suffix):
            return kind
    return None


def name_of_drop(file_name: str, max_chars: int = 80) -> str:
    """The name a story dropped as `file_name` (NAME.json, NAME.zip) goes by, before `first_free`."""
    return sanitize_name(PurePath(file_name).stem, max_chars)


def is_reserved(name: str) -> bool:
    return name.casefold() in RESERVED_NAMES


def sidecar_name(name: str) -> str:
    return f"{name}{SIDECAR_SUFFIX}"


def zip_name(name: str) -> str:
    return f"{name}{ZIP_SUFFIX}"


def outbox_entries(name: str) -> tuple[str, str, str]:
    """What a story named NAME occupies in the outbox: any of them existing takes the name."""
    return name, zip_name(name), sidecar_name(name)


def first_free(base: str, taken: Callable[[str], bool], limit: int = 100_000) -> str:
    """The first of NAME, NAME-2, NAME-3 … that is neither reserved nor `taken`."""
    for n in range(1, limit):
        name = base if n == 1 else f"{base}-{n}"
        if not (is_reserved(name) or taken(name)):
            return name
    raise RuntimeError(f"no free name for {base}")

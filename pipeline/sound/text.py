"""Narration text: its sentences as written, and the part of it a voice can say.

A caption shows the narration exactly as written, but a voice for one language reads another
script as a string of "Japanese letter" and emoji as their names, which is noise in a film.
So what is spoken is the text without the characters the voice's language does not write
(and without emoji and pictographs); what is dropped is named in a warning, and the caption
keeps everything.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

from sentencex import segment

__all__ = ["Speakable", "caption_text", "speakable", "split_sentences"]

# The scripts each language is written in, by the first word of the Unicode character name
# (Python has no script property). A language not listed is not filtered by script.
_LATIN = {"LATIN"}
_SCRIPTS: dict[str, set[str]] = {
    **{
        lang: _LATIN
        # one string, split: a list literal would take a line per language
        for lang in (  # noqa: SIM905
            "af an ca cs cy da de en eo es et eu fi fr ga gd gl hr hu id is it lb lt lv ms mt nb nl nn no "
            "pl pt ro sk sl sq sv sw tr vi"
        ).split()
    },
    **{lang: {"CYRILLIC"} for lang in ["ru", "uk", "bg", "be", "mk", "kk", "ky"]},
    "sr": {"CYRILLIC", "LATIN"},
    "el": {"GREEK"},
    "ka": {"GEORGIAN"},
    "hy": {"ARMENIAN"},
    "he": {"HEBREW"},
    **{lang: {"ARABIC"} for lang in ["ar", "fa", "ur"]},
    **{lang: {"DEVANAGARI"} for lang in ["hi", "mr", "ne"]},
    "bn": {"BENGALI"},
    "ta": {"TAMIL"},
    "te": {"TELUGU"},
    "th": {"THAI"},
    "ja": {"CJK", "HIRAGANA", "KATAKANA", "KATAKANA-HIRAGANA"},
    **{lang: {"CJK"} for lang in ["zh", "cmn", "yue"]},
    "ko": {"HANGUL"},
}
# Never spoken: emoji and other pictographs (So), modifier symbols (Sk: skin tones), format
# characters (Cf: the joiners inside emoji sequences), private use and unassigned code points.
_UNSPOKEN_CATEGORIES = {"So", "Sk", "Cf", "Co", "Cn", "Cs"}


def language_of(voice_language: str) -> str:
    """'en-us', 'en_US', 'cmn-latn-pinyin' -> 'en', 'en', 'cmn'."""
    return voice_language.replace("_", "-").split("-")[0].lower()


def caption_text(text: str) -> str:
    """The text as a caption shows it: line breaks read as spaces, ends trimmed."""
    return " ".join(text.splitlines()).strip()


def split_sentences(text: str, language: str) -> list[str]:
    """Sentences as written (sentencex, Wikimedia's segmenter for ~300 languages), trimmed."""
    return [s.strip() for s in segment(language_of(language), text) if s.strip()]


@dataclass(frozen=True)
class Speakable:
    """What a voice is given (`spoken`), and what it is not (`dropped`: each run once, in order)."""

    spoken: str
    dropped: str

    @property
    def anything(self) -> bool:
        """A letter or a digit is left to say (punctuation alone makes no sound)."""
        return any(unicodedata.category(c)[0] in "LN" for c in self.spoken)


def speakable(text: str, voice_language: str) -> Speakable:
    """`text` without what a voice for `voice_language` cannot say; a dropped run becomes a space
    so the words either side stay apart."""
    scripts = _SCRIPTS.get(language_of(voice_language))
    kept: list[str] = []
    runs: list[str] = []  # the dropped text, run by run
    run = ""
    for ch in text:
        cat = unicodedata.category(ch)
        drop = cat in _UNSPOKEN_CATEGORIES or (cat[0] == "M" and bool(run))
        if not drop and cat[0] == "L" and scripts is not None:
            drop = not _in_scripts(ch, scripts)
        if drop:
            run += ch
            if kept and kept[-1] != " ":
                kept.append(" ")
            continue
        if run and ch.isspace():  # a space inside a dropped run belongs to it ("Привет мир")
            run += ch
            continue
        if run:
            runs.append(run.strip())
            run = ""
        kept.append(ch)
    runs += [run.strip()] if run else []
    unique = list(dict.fromkeys(r.replace("\u200d", "") for r in runs))
    return Speakable(spoken=" ".join("".join(kept).split()), dropped=" ".join(unique))


def _in_scripts(ch: str, scripts: set[str]) -> bool:
    name = unicodedata.name(ch, "")
    first = name.split(" ")[0]
    # Letters every script shares (MODIFIER LETTER ...), and the fullwidth forms of a listed script.
    return (
        first in scripts or first == "MODIFIER" or (first == "FULLWIDTH" and any(s in name for s in scripts))
    )

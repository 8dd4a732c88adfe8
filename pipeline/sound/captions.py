"""Captions on the film's timeline: film.srt and film.vtt, and the ASS file that burns them in.

One cue per sentence where the voice says where sentences fall, else one per scene: over its
recording, or, for narration no voice speaks, over the scene's own part of the film. A cue
shows its sentence as written (line breaks read as spaces) and lies inside its scene's clip:
times are rounded inwards to the millisecond that SRT and WebVTT count in.

SRT through `srt` (it keeps text as given); WebVTT through `webvtt-py`, with `&`, `<` and `>`
escaped as the WebVTT format requires (a cue may not contain "-->"; escaped, it does not).
"""

from __future__ import annotations

import datetime as dt
import html
import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import srt
import webvtt

from pipeline.fsutil import atomic_write_bytes
from pipeline.sound.speech import Speech
from pipeline.sound.timing import SceneTiming, Timing

__all__ = ["Cue", "story_cues", "write_captions"]

_MIN_CUE = Fraction(1, 2)  # a caption shown for less than this is hard to read: keep the pads then


@dataclass(frozen=True)
class Cue:
    """One caption: [start_ms, end_ms) on the film, its text, the scene (0-based) it belongs to."""

    start_ms: int
    end_ms: int
    text: str
    scene: int


def _ms(t: Fraction, *, up: bool) -> int:
    return math.ceil(t * 1000) if up else math.floor(t * 1000)


def scene_cues(timing: SceneTiming, speech: Speech | None, pad: float) -> list[Cue]:
    """One scene's cues. A spoken sentence's cue lasts until the next sentence's starts."""
    if speech is None or not speech.caption:
        return []
    if speech.samples and speech.sentences and timing.narration_start is not None:
        at = timing.narration_start
        starts = [_ms(at + Fraction(s.start), up=True) for s in speech.sentences]
        ends = [*starts[1:], _ms(at + Fraction(speech.sentences[-1].end), up=False)]
        return [
            Cue(a, b, s.text, timing.index)
            for a, b, s in zip(starts, ends, speech.sentences, strict=True)
            if b > a
        ]
    begin, end = timing.window  # captions only: the scene's own part, less the pads where it fits
    if end - begin - 2 * Fraction(pad) >= _MIN_CUE:
        begin, end = begin + Fraction(pad), end - Fraction(pad)
    a, b = _ms(begin, up=True), _ms(end, up=False)
    return [Cue(a, b, speech.caption, timing.index)] if b > a else []


def story_cues(timing: Timing, speeches: Sequence[Speech | None]) -> list[Cue]:
    """Every cue of the film, in order; `speeches[k]` is scene k's (None: no narration)."""
    if len(speeches) != len(timing.scenes):
        raise ValueError(f"{len(speeches)} speeches for {len(timing.scenes)} scenes")
    return [c for t, s in zip(timing.scenes, speeches, strict=True) for c in scene_cues(t, s, timing.pad)]


def _vtt_time(ms: int) -> str:
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}.{ms % 1000:03d}"


def srt_text(cues: Sequence[Cue]) -> str:
    subs = [
        srt.Subtitle(
            k + 1, dt.timedelta(milliseconds=c.start_ms), dt.timedelta(milliseconds=c.end_ms), c.text
        )
        for k, c in enumerate(cues)
    ]
    return srt.compose(subs, reindex=False)


def vtt_text(cues: Sequence[Cue]) -> str:
    captions = [
        webvtt.Caption(_vtt_time(c.start_ms), _vtt_time(c.end_ms), html.escape(c.text, quote=False))
        for c in cues
    ]
    return webvtt.WebVTT(captions=captions).content


def write_captions(cues: Sequence[Cue], srt_path: Path, vtt_path: Path) -> None:
    """film.srt and film.vtt, each complete or absent (UTF-8, no byte-order mark)."""
    atomic_write_bytes(srt_path, srt_text(cues).encode("utf-8"))
    atomic_write_bytes(vtt_path, vtt_text(cues).encode("utf-8"))

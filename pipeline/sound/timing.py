"""How long each scene lasts once its narration is known, and where things fall on the film.

Pure arithmetic over exact fractions, no I/O. The film's layout is pipeline/video/film.py's: scene k
lasts `frames[k]`; consecutive scenes overlap by a crossfade of round(crossfade_seconds * fps)
frames, clamped to half the shortest scene (none for a single scene); the film has
sum(frames) - (n-1) * crossfade frames, and scene k's clip starts at frame
sum(frames[:k]) - k * crossfade.

Each crossfade is shared: half of it belongs to the scene before, half to the scene after.
A narrated scene lasts at least pad + narration + pad plus its halves of the crossfades it has
(the requested crossfade, so that a scene's length depends on the scene alone and its clip can
be made as soon as it is spoken). Its narration starts one pad after its half of the crossfade
before it, so two narrations never overlap and each lies inside its own scene's clip.
A scene's own `seconds` last round(seconds x fps) frames, as every clip always has (the
"rounded product" of pipeline.video); a narration is never cut short: the frames it needs are
rounded up, and the scene lasts the longer of the two.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Literal

from pipeline.sound.ffmpeg import RATE
from pipeline.story import StoryError

__all__ = [
    "PAD_SECONDS",
    "SceneSound",
    "SceneTiming",
    "Timing",
    "plan_timing",
    "requested_crossfade",
    "scene_frames",
    "too_long",
]

Fps = int | Fraction
PAD_SECONDS = 0.25  # silence around a narration inside its scene (at least 0.2 s each side)
_TOLERANCE = Fraction(1, 10**9)  # 5.0 s at 24 fps is 120 frames, even when 5.0 * 24 is 120.0000001


def _ceil(x: Fraction) -> int:
    return math.ceil(x - _TOLERANCE)


def requested_crossfade(crossfade_seconds: float, fps: Fps) -> int:
    """Crossfade frames as pipeline/video/film.py computes them, before clamping."""
    return round(crossfade_seconds * fps)


def scene_frames(
    seconds: float,
    narration_seconds: float | None,
    *,
    fps: Fps,
    crossfade_frames: int,
    first: bool,
    last: bool,
    pad: float = PAD_SECONDS,
) -> tuple[int, Literal["seconds", "narration"]]:
    """One scene's frame count, and what set it; `crossfade_frames` is the requested crossfade.

    Needs only the scene itself (and whether it is first or last), so the scene's clip can be
    rendered as soon as its narration is spoken.
    """
    fps = Fraction(fps)
    asked = max(1, round(seconds * fps))  # exactly pipeline.video.encode's VideoEncoding.frames
    if not narration_seconds:
        return asked, "seconds"
    shares = Fraction(crossfade_frames, 2) * ((not first) + (not last))
    needed = _ceil((2 * Fraction(pad) + Fraction(narration_seconds)) * fps + shares)
    return (needed, "narration") if needed > asked else (asked, "seconds")


@dataclass(frozen=True)
class SceneSound:
    """What the timing needs of a scene: its minimum seconds and its narration's length, if any."""

    seconds: float
    narration_seconds: float | None = None  # spoken or recorded; None or 0: no narration sound
    field: str = "narration"  # the field the narration came from ("audio" for a recording)


@dataclass(frozen=True)
class SceneTiming:
    """One scene on the film. Times are exact seconds on the film's timeline."""

    index: int  # 0-based
    frames: int
    start_frame: int  # the clip's first frame on the film (inside the crossfade before it)
    how: Literal["seconds", "narration"]  # what set the length
    narration_start: Fraction | None  # where its narration starts; None: no narration sound
    narration_seconds: float | None
    window: tuple[Fraction, Fraction]  # its own part: the clip less the neighbours' crossfade halves
    fps: Fraction

    @property
    def end_frame(self) -> int:
        return self.start_frame + self.frames

    @property
    def start(self) -> Fraction:
        return self.start_frame / self.fps

    @property
    def end(self) -> Fraction:
        return self.end_frame / self.fps

    @property
    def seconds(self) -> Fraction:
        return self.frames / self.fps

    def record(self) -> dict[str, Any]:
        """The scene's length in the manifest: how long, from where, and what set it."""
        return {
            "seconds": round(float(self.seconds), 4),
            "frames": self.frames,
            "start_seconds": round(float(self.start), 4),
            "length_from": self.how,  # "seconds" (the story's, or the default) or "narration"
            "narration_start_seconds": None
            if self.narration_start is None
            else round(float(self.narration_start), 4),
        }


@dataclass(frozen=True)
class Timing:
    """The whole film: each scene's place, the crossfade used, the film's length."""

    fps: Fraction
    scenes: tuple[SceneTiming, ...]
    frames: int
    crossfade_frames: int  # used, after clamping
    requested_crossfade_frames: int
    pad: float

    @property
    def seconds(self) -> Fraction:
        return self.frames / self.fps

    @property
    def samples(self) -> int:
        """The film's length in 48 kHz samples: its sound is exactly this long."""
        return to_samples(self.seconds)


def to_samples(t: Fraction, *, up: bool = False) -> int:
    """A time on the film as a 48 kHz sample index (nearest, or the first at or after it)."""
    x = t * RATE
    return math.ceil(x) if up else round(x)


def plan_timing(
    scenes: Sequence[SceneSound],
    *,
    fps: Fps,
    crossfade_seconds: float,
    max_scene_seconds: float,
    pad: float = PAD_SECONDS,
) -> Timing:
    """Every scene's frames and place on the film. A narration whose scene would last longer
    than `max_scene_seconds` is the story's error, naming the scene."""
    if not scenes:
        raise ValueError("a film needs at least one scene")
    rate = Fraction(fps)
    requested = requested_crossfade(crossfade_seconds, fps)
    n = len(scenes)
    counted = [
        scene_frames(sc.seconds, sc.narration_seconds, fps=rate, crossfade_frames=requested,
                     first=k == 0, last=k == n - 1, pad=pad)
        for k, sc in enumerate(scenes)
    ]  # fmt: skip
    _check_limits(scenes, counted, rate, max_scene_seconds)
    counts = [c for c, _ in counted]
    xfade = min(requested, min(counts) // 2) if n > 1 else 0
    half = Fraction(xfade, 2) / rate
    placed = []
    start = 0
    for k, (sc, (frames, how)) in enumerate(zip(scenes, counted, strict=True)):
        lead = half if k > 0 else Fraction(0)
        tail = half if k < n - 1 else Fraction(0)
        begin, end = start / rate, (start + frames) / rate
        spoken = bool(sc.narration_seconds)
        placed.append(
            SceneTiming(
                index=k,
                frames=frames,
                start_frame=start,
                how=how,
                narration_start=begin + lead + Fraction(pad) if spoken else None,
                narration_seconds=sc.narration_seconds if spoken else None,
                window=(begin + lead, end - tail),
                fps=rate,
            )
        )
        start += frames - xfade
    return Timing(rate, tuple(placed), sum(counts) - (n - 1) * xfade, xfade, requested, pad)


def too_long(
    index: int, sound: SceneSound, frames: int, how: str, fps: Fps, max_seconds: float
) -> str | None:
    """Why scene `index` (0-based) of `frames` cannot be made, if its narration makes it longer than
    `max_seconds`; None when it fits. Needs the scene alone: a runner asks as soon as it is spoken."""
    rate = Fraction(fps)
    if how != "narration" or frames / rate <= Fraction(max_seconds) + _TOLERANCE:
        return None
    return (
        f"scenes.{index}.{sound.field} (scene {index + 1}): the narration lasts "
        f"{sound.narration_seconds or 0:.1f} s; with its pauses the scene needs "
        f"{float(frames / rate):.1f} s, more than limits.max_scene_seconds = {max_seconds:g}"
    )


def _check_limits(
    scenes: Sequence[SceneSound], counted: Sequence[tuple[int, str]], fps: Fraction, max_seconds: float
) -> None:
    problems = [
        problem
        for k, (sc, (frames, how)) in enumerate(zip(scenes, counted, strict=True))
        if (problem := too_long(k, sc, frames, how, fps, max_seconds)) is not None
    ]
    if problems:
        raise StoryError(problems)

"""How long a story has left: the scenes still to make, and the tail after the last one.

The film, contact sheet, manifest and ZIP are made after the last scene, on the CPU, with
nothing to overlap them: on a GPU box they are a large part of a short story's time, and an
ETA that leaves them out reads 33-45 % low early on. So the tail is priced from measured
costs, never guessed:

- once a story's tail has run in this process, at what it cost per film frame (`TailCost`,
  which the caller keeps from one story to the next);
- before that, at the clips' own measured cost per frame: the film renders the same frames
  from the same images, and it dominates the tail.

A film frame is counted as made: a finished scene's frames are its record's (a narration may
have lengthened it past its seconds); a scene still to make counts its seconds, the least it
will last.

Until one of the two has been measured the ETA is unknown (None), not a low guess.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from pipeline.prompts import ScenePlan


@dataclass
class TailCost:
    """Seconds per film frame that the last finished story's tail took (film, sheet, manifest, ZIP)."""

    seconds_per_frame: float | None = None

    def measured(self, seconds: float, frames: int) -> None:
        if frames > 0:
            self.seconds_per_frame = seconds / frames


class StoryEta:
    """Remaining time = scene pace x scenes left + the tail. The pace is that of scene starts:
    with the CPU half overlapped, the GPU sets it."""

    def __init__(
        self,
        plans: list[ScenePlan],
        fps: Fraction,
        tail: TailCost,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.frames = {p.number: round(p.seconds * fps) for p in plans}
        self.tail = tail
        self.clock = clock
        self.started = clock()
        self.begun = 0

    def film_frames(self, records: Mapping[int, dict[str, Any]] | None = None) -> int:
        """The film's frames: as made for the finished scenes in `records`, else as planned."""
        return sum(made_frames(records or {}, n, planned) for n, planned in self.frames.items())

    def estimate(self, remaining: int, records: Mapping[int, dict[str, Any]]) -> float | None:
        """Called as each scene starts, `remaining` counting that scene; `records` are the
        scenes finished so far (their timings price the film until a tail has been measured)."""
        self.begun += 1
        per_frame = self.tail.seconds_per_frame or _clip_cost_per_frame(records, self.frames)
        if self.begun == 1 or per_frame is None:
            return None
        pace = (self.clock() - self.started) / (self.begun - 1)
        return pace * remaining + per_frame * self.film_frames(records)


def made_frames(records: Mapping[int, dict[str, Any]], number: int, planned: int) -> int:
    """Scene `number`'s frames as its record says it was made, else `planned`."""
    frames = records.get(number, {}).get("frames")
    return frames if isinstance(frames, int) else planned


def _clip_cost_per_frame(records: Mapping[int, dict[str, Any]], frames: Mapping[int, int]) -> float | None:
    seconds = sum(r["timings"]["save_and_clip"] for r in records.values())
    count = sum(made_frames(records, n, frames.get(n, 0)) for n in records)
    return seconds / count if count and seconds > 0 else None

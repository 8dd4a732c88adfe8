"""The ETA counts what follows the last scene (film, contact sheet, manifest, ZIP), priced from
measured costs: before, it counted scenes only and read 33-45 % low early in a story."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from test_render import BrightGenerator, settings

from pipeline.eta import StoryEta, TailCost
from pipeline.prompts import ScenePlan
from pipeline.render import QuietEvents, StoryJob, render_story
from pipeline.story import validate_story

FPS = 24


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def plans(n: int, seconds: float = 5.0) -> list[ScenePlan]:
    return [
        ScenePlan(
            index=i - 1,
            description=f"scene {i}",
            prompt="p",
            negative="n",
            seed=i,
            seconds=seconds,
            motion="zoom_in",
            human=False,
            characters=(),
        )
        for i in range(1, n + 1)
    ]


def record(save_and_clip: float) -> dict[str, Any]:
    return {"timings": {"save_and_clip": save_and_clip}}


def test_the_tail_is_priced_at_the_clips_measured_cost_before_any_story_has_finished() -> None:
    clock = FakeClock()
    eta = StoryEta(plans(4), FPS, TailCost(), clock)  # 4 x 120 frames: a 480-frame film
    assert eta.estimate(4, {}) is None  # scene 1: no pace yet
    clock.now += 10.0  # 10 s a scene
    # scene 2 starts; scene 1's clip took 2.4 s for its 120 frames: 0.02 s a frame
    estimate = eta.estimate(3, {1: record(2.4)})
    assert estimate is not None
    assert abs(estimate - (3 * 10.0 + 0.02 * 480)) < 1e-9  # scenes-only said 30 s: 24 % low


def test_a_measured_tail_from_the_last_story_wins_over_the_clip_proxy() -> None:
    clock = FakeClock()
    eta = StoryEta(plans(2), FPS, TailCost(seconds_per_frame=0.05), clock)
    eta.estimate(2, {})
    clock.now += 4.0
    estimate = eta.estimate(1, {1: record(2.4)})
    assert estimate is not None
    assert abs(estimate - (4.0 + 0.05 * 240)) < 1e-9


def test_with_nothing_measured_the_eta_is_unknown_rather_than_low() -> None:
    clock = FakeClock()
    eta = StoryEta(plans(3), FPS, TailCost(), clock)
    eta.estimate(3, {})
    clock.now += 5.0
    assert eta.estimate(2, {}) is None


class EtaLog(QuietEvents):
    def __init__(self) -> None:
        self.etas: list[float | None] = []

    def scene_started(self, plan: ScenePlan, total: int, eta_seconds: float | None) -> None:
        self.etas.append(eta_seconds)


def test_render_story_measures_the_tail_and_the_next_story_counts_it(tmp_path: Path) -> None:
    s = settings(tmp_path)
    tail = TailCost()
    doc = {"scenes": ["a cliff", "a lamp", "a boat"]}
    story = validate_story(doc, s.limits)
    render_story(
        StoryJob("one", story, json.dumps(doc).encode(), tmp_path / "one"), s, BrightGenerator(), tail=tail
    )
    assert tail.seconds_per_frame is not None and tail.seconds_per_frame > 0
    measured = tail.seconds_per_frame
    events = EtaLog()
    job = StoryJob("two", story, json.dumps(doc).encode(), tmp_path / "two")
    render_story(job, s, BrightGenerator(), events, tail=tail)
    film_frames = 3 * round(s.video.seconds_per_scene * s.video.fps)
    assert events.etas[0] is None
    assert all(e is not None and e >= measured * film_frames for e in events.etas[1:]), events.etas


def test_a_scene_lengthened_by_its_narration_counts_its_frames_as_made() -> None:
    """A finished scene's frames are its record's (its narration made it 300 frames, not its
    planned 120); the scenes still to make count their seconds, the least they will last."""
    clock = FakeClock()
    eta = StoryEta(plans(3), FPS, TailCost(seconds_per_frame=0.01), clock)
    eta.estimate(3, {})
    clock.now += 6.0
    made = {1: {"frames": 300, "timings": {"save_and_clip": 3.0}}}
    assert eta.film_frames(made) == 300 + 2 * 120
    estimate = eta.estimate(2, made)
    assert estimate is not None
    assert abs(estimate - (2 * 6.0 + 0.01 * (300 + 240))) < 1e-9
    # before a tail was measured, the clips' cost per frame counts the frames they had
    proxy = StoryEta(plans(3), FPS, TailCost(), clock)
    proxy.estimate(3, {})
    clock.now += 6.0
    estimate = proxy.estimate(2, made)
    assert estimate is not None
    assert abs(estimate - (2 * 6.0 + 0.01 * 540)) < 1e-9

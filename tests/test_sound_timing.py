"""Scene timing from narration: seconds as the rounded product, a narration's need rounded up, the
film's own layout, narration placed inside its scene, too-long narration an error naming the scene."""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from pipeline.sound.timing import PAD_SECONDS, SceneSound, plan_timing, scene_frames
from pipeline.story import StoryError
from pipeline.video.encode import VideoEncoding
from pipeline.video.film import FilmScene, make_film

from media import probe_clip

NTSC = Fraction(24000, 1001)


def timing(scenes: list[SceneSound], fps: int | Fraction = 24, crossfade: float = 0.5, limit: float = 120.0):
    return plan_timing(scenes, fps=fps, crossfade_seconds=crossfade, max_scene_seconds=limit)


def test_seconds_is_kept_without_narration_as_the_rounded_product() -> None:
    t = timing([SceneSound(5.0), SceneSound(1.01), SceneSound(2.0), SceneSound(1.3)])
    assert [s.frames for s in t.scenes] == [120, 24, 48, 31]  # round(seconds x fps), as every clip
    assert all(s.how == "seconds" and s.narration_start is None for s in t.scenes)
    assert t.crossfade_frames == 12 and t.frames == 120 + 24 + 48 + 31 - 3 * 12
    for seconds, fps in [
        (0.7, 30),
        (1.1, 10),
        (0.5, 25),
        (5.0, NTSC),
        (1.3, 24),
        (2.5, Fraction(30000, 1001)),
    ]:
        enc = VideoEncoding(width=2, height=2, fps=Fraction(fps), crf=18, preset="veryfast")
        made = scene_frames(seconds, None, fps=Fraction(fps), crossfade_frames=0, first=True, last=True)[0]
        assert made == enc.frames(seconds), (seconds, fps)


def test_narration_lengthens_a_scene_by_pads_and_crossfade_shares() -> None:
    narr = 6.0
    t = timing([SceneSound(2.0), SceneSound(2.0, narr), SceneSound(2.0, narr)])
    middle, last = t.scenes[1], t.scenes[2]
    # middle: two crossfade halves (6 frames each); last: one
    assert middle.frames == math.ceil((2 * PAD_SECONDS + narr) * 24 + 12) and middle.how == "narration"
    assert last.frames == math.ceil((2 * PAD_SECONDS + narr) * 24 + 6)
    assert t.scenes[0].how == "seconds" and t.scenes[0].frames == 48
    assert middle.record()["length_from"] == "narration" and middle.record()["frames"] == middle.frames
    # a long minimum wins over a short narration: seconds is never cut
    t2 = timing([SceneSound(10.0, 1.0)])
    assert t2.scenes[0].frames == 240 and t2.scenes[0].how == "seconds"


def test_narrations_lie_inside_their_scenes_and_never_overlap() -> None:
    durations = [3.3, None, 0.4, 7.77, 2.0, None, 1.0]
    for fps in (24, 25, 30, NTSC, Fraction(30000, 1001), 12):
        for crossfade in (0.0, 0.5, 1.0, 3.0):
            t = timing([SceneSound(1.0, d) for d in durations], fps=fps, crossfade=crossfade)
            prev_end = Fraction(-1)
            for s, d in zip(t.scenes, durations, strict=True):
                lo, hi = s.window
                assert s.start <= lo < hi <= s.end  # its own part lies in its clip
                if d is None:
                    continue
                a, b = s.narration_start, s.narration_start + Fraction(d)
                assert lo + Fraction(PAD_SECONDS) <= a + Fraction(1, 10**6) and b <= hi - Fraction(
                    PAD_SECONDS
                ) + Fraction(1, 10**6), (fps, crossfade, s)
                assert a >= prev_end + 2 * Fraction(PAD_SECONDS) - Fraction(1, 10**6)  # 2 pads between voices
                prev_end = b
            assert t.frames == sum(s.frames for s in t.scenes) - (len(durations) - 1) * t.crossfade_frames
            assert t.scenes[-1].end_frame == t.frames


def test_fraction_frame_rates_are_exact() -> None:
    t = timing([SceneSound(5.0), SceneSound(5.0, 4.0)], fps=NTSC)
    assert t.fps == NTSC and isinstance(t.seconds, Fraction)
    assert t.scenes[0].frames == 120  # 5 s * 23.976 = 119.88 -> 120
    assert t.samples == t.frames * 2002  # 48000 * 1001 / 24000 samples per frame, exactly
    assert t.scenes[1].start == Fraction(t.scenes[1].start_frame * 1001, 24000)


def test_crossfade_is_clamped_to_half_the_shortest_scene() -> None:
    t = timing([SceneSound(0.5), SceneSound(4.0, 2.0)], crossfade=2.0)  # 12 frames; asks for 48
    assert t.requested_crossfade_frames == 48 and t.crossfade_frames == 6
    s = t.scenes[1]
    assert s.window[0] == s.start + Fraction(3, 24)  # half of the crossfade used
    assert s.narration_start + 2 <= s.end


def test_too_long_narration_names_the_scene() -> None:
    with pytest.raises(StoryError) as err:
        timing([SceneSound(5.0, 3.0), SceneSound(5.0, 119.9, field="audio")], limit=120.0)
    assert err.value.problems == [
        "scenes.1.audio (scene 2): the narration lasts 119.9 s; with its pauses the scene needs "
        "120.7 s, more than limits.max_scene_seconds = 120"
    ]
    timing([SceneSound(5.0, 119.0)], limit=120.0)  # fits with its pads: no error


@pytest.mark.parametrize("crossfade", [0.0, 0.25, 0.5, 2.0])
def test_the_film_lays_out_frames_as_the_timing_says(tmp_path: Path, crossfade: float) -> None:
    """pipeline/video/film.py renders the timing's frame counts to exactly the timing's film: same
    crossfade (clamping included), same total, so narration placed by the timing is in sync."""
    fps = 12
    scenes = [SceneSound(1.0), SceneSound(0.5, 1.3), SceneSound(2.0), SceneSound(1.0, 0.2)]
    t = timing(scenes, fps=fps, crossfade=crossfade)
    image = np.full((32, 48, 3), 128, np.uint8)
    shots = [FilmScene(image, s.frames / fps) for s in t.scenes]
    out = tmp_path / "film.mp4"
    enc = VideoEncoding(width=48, height=32, fps=Fraction(fps), crf=30, preset="ultrafast")
    info = make_film(shots, out, enc, fade_seconds=0.0, crossfade_seconds=crossfade)
    assert (info.crossfade_frames, info.requested_crossfade_frames) == (
        t.crossfade_frames,
        t.requested_crossfade_frames,
    )
    assert info.frames == t.frames == probe_clip(out).frames

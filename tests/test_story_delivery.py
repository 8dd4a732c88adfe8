"""Delivery through the story runner: widescreen sizes at exact rates, master clips, timelines.

A 16:9 story made at SDXL's 1344x768 bucket and delivered at 1920x1080, at 24 and 25 fps (the
daemon's test, tests/test_sound_daemon.py, makes one at 24000/1001 with sound); every clip, master
and the film decoded, the timelines read back with OpenTimelineIO and its adapters.
"""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from delivered import check_pictures, check_timelines, read_timelines
from streams import probe
from test_render import BrightGenerator

from pipeline.render import SoundSetup, StoryJob, render_story
from pipeline.settings import settings_from_dict
from pipeline.story import validate_story

DOC = {"title": "Widescreen", "scenes": ["a cliff", {"description": "a lamp", "motion": "pan_left"}]}


def render(
    tmp: Path, image: tuple[int, int], video: dict[str, Any], **outputs: Any
) -> tuple[StoryJob, dict[str, Any]]:
    s = settings_from_dict(
        {
            "image": {"width": image[0], "height": image[1], "steps": 1},
            "video": {"seconds_per_scene": 0.5, "crossfade_seconds": 0.25, "preset": "ultrafast", **video},
            "outputs": outputs,
            "finish": {"grain": 0.0},
            "daemon": {"cpu_workers": 1},
        },
        tmp,
    )
    job = StoryJob("widescreen", validate_story(DOC, s.limits), json.dumps(DOC).encode(), tmp / "work")
    render_story(job, s, BrightGenerator(), sound=SoundSetup(None))
    return job, json.loads((job.out / "manifest.json").read_text("utf-8"))


@pytest.mark.parametrize("fps", [24, 25])
def test_a_16_9_story_made_at_1344x768_is_delivered_at_1920x1080(tmp_path: Path, fps: int) -> None:
    job, manifest = render(tmp_path, (1344, 768), {"fps": fps, "width": 1920, "height": 1080})
    check_pictures(job.out, manifest, (1920, 1080), Fraction(fps))
    check_timelines(job.out, manifest, Fraction(fps), tmp_path, job.zip_path)
    assert manifest["timeline"]["master_codec"] == "h264" and manifest["timeline"]["not_written"] == []
    assert manifest["film_info"]["frames"] == 2 * round(0.5 * fps) - round(0.25 * fps)  # 24: 18, 25: 18


def test_masters_in_an_editing_codec_are_what_the_timelines_point_at(tmp_path: Path) -> None:
    # DNxHR encodes 256x120 and up
    job, manifest = render(tmp_path, (256, 144), {"fps": "24000/1001"}, master_codec="dnxhr")
    assert manifest["timeline"]["masters"] == ["master/scene_001.mov", "master/scene_002.mov"]
    assert probe(job.out / "master" / "scene_001.mov").codec == "dnxhd"
    for kind, timeline in read_timelines(job.out, Fraction(24000, 1001)).items():
        assert [c.media_reference.target_url for c in timeline.find_clips()] == manifest["timeline"][
            "masters"
        ], kind
    assert probe(job.out / "clips" / "scene_001.mp4").codec == "h264"  # clips/ stay what they are


def test_at_a_rate_without_timecode_only_the_otio_timeline_is_written(tmp_path: Path) -> None:
    job, manifest = render(tmp_path, (128, 96), {"fps": 12})
    assert (job.out / "timeline.otio").is_file()
    assert not (job.out / "timeline.xml").exists() and not (job.out / "timeline.edl").exists()
    assert manifest["timeline"]["files"] == ["timeline.otio"]
    assert "no 12 fps" in manifest["timeline"]["not_written"][0]


def test_no_timeline_no_masters(tmp_path: Path) -> None:
    job, manifest = render(tmp_path, (128, 96), {"fps": 24}, timeline=False)
    assert not (job.out / "master").exists() and not (job.out / "timeline.otio").exists()
    assert "timeline" not in manifest and "master" not in manifest["scenes"][0]

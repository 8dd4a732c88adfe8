"""Widescreen delivery at whole-number rates through the daemon, decoded.

One `storyreel run --once` per rate (24 and 25; tests/test_sound_daemon.py makes 24000/1001 with
sound), shared by every test here: a silent two-scene bundle whose pictures are SDXL's 16:9
bucket 1344x768 (provided, so no model time is spent on them), delivered at 1920x1080, timelines
on. Every clip, master and the film probed for its size,
exact rate, frame count and BT.709 tags; the timelines read back with OpenTimelineIO and its
FCP7 and CMX 3600 adapters, also once the folder is moved and the ZIP unzipped elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from delivered import audio_streams, check_pictures, check_timelines
from PIL import Image

from bundles import picture_bytes, write_bundle
from conftest import Setup, check_published

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("delivery_daemon")]

SIZE = (1920, 1080)
STORY = {
    "title": "Harbour",
    "scenes": [
        {"description": "a harbour at dawn", "seconds": 0.5, "image": "dawn.png"},
        {"description": "a lamp in a window", "seconds": 0.75, "motion": "pan_left", "image": "lamp.png"},
    ],
}
PICTURES = {"dawn.png": picture_bytes(1344, 768, seed=1), "lamp.png": picture_bytes(1344, 768, seed=2)}


@dataclass
class Run:
    s: Setup
    fps: Fraction
    folder: Path
    manifest: dict[str, Any]


@pytest.fixture(scope="module", params=[24, 25])
def run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> Run:
    s = Setup(
        tmp_path_factory.mktemp(f"delivery_{request.param}") / "box",
        tiny_dir,
        image={"width": 1344, "height": 768, "steps": 1},
        video={"width": SIZE[0], "height": SIZE[1], "fps": request.param, "crossfade_seconds": 0.25},
        outputs={"timeline": True},
    )
    write_bundle(s.inbox / "harbour.zip", STORY, PICTURES)
    proc = s.run_once()
    assert proc.returncode == 0, proc.stderr[-3000:]
    return Run(s, Fraction(request.param), s.outbox / "harbour", check_published(s, "harbour", 2))


def test_a_16_9_story_is_1920x1080_at_the_exact_rate_in_bt709(run: Run) -> None:
    check_pictures(run.folder, run.manifest, SIZE, run.fps)
    for sc in run.manifest["scenes"]:
        with Image.open(run.folder / sc["image"]) as img:
            assert img.size == (1344, 768)
    frames = [round(Fraction(sc["seconds_asked"]) * run.fps) for sc in run.manifest["scenes"]]
    assert [sc["frames"] for sc in run.manifest["scenes"]] == frames  # the rounded products
    assert audio_streams(run.folder / "film.mp4") == []  # nothing to hear: silent, as before


def test_the_timelines_hold_the_masters_as_long_as_the_film(run: Run, tmp_path: Path) -> None:
    timelines = check_timelines(run.folder, run.manifest, run.fps, tmp_path, run.s.outbox / "harbour.zip")
    assert all(t.audio_tracks() == [] for k, t in timelines.items()), "no sound, no audio tracks"
    assert run.manifest["timeline"]["not_written"] == []

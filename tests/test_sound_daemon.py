"""Narration, captions, music and delivery for editors, through one real daemon run, decoded.

One `storyreel run --once` (a module-scoped fixture shared by every test here) with the
contract's keys as a 16:9 box sets them: images 1344x768, delivered at 1920x1080 and exactly
24000/1001 fps, espeak-ng speaking, a default music file under every story, timelines on. Two
stories: "keeper" (a two-sentence narration far longer than its scene's 1 s, a scene with no
narration between, a short narration with an emoji the voice cannot say) and "rambling" (one
narration longer than `[limits] max_scene_seconds`). What was written is decoded and measured:
loudness by pyloudnorm, the music's level by its 15 kHz marker tone (no voice here reaches
11 kHz), captions by srt and webvtt-py, timelines by OpenTimelineIO and its adapters.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from fractions import Fraction
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from delivered import check_captions, check_in_sync, check_pictures, check_stem, check_timelines
from PIL import Image
from streams import probe

from pipeline.sound.espeak import espeak_installed

from conftest import Setup, check_published, has_audio
from sound_media import band_db, decode, loudness, music, require, rms_db

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("sound_daemon")]

FPS = Fraction(24000, 1001)
SIZE = (1920, 1080)
TARGET = -16.0
KEEPER = {
    "title": "The Last Keeper",
    "seed": 7,
    "scenes": [
        {
            "description": "a lighthouse on a rock",
            "seconds": 1.0,
            "narration": "The lighthouse stood alone on the rock.\nNobody had climbed its stairs for years.",
        },
        {"description": "the empty lamp room", "seconds": 3.0},
        {"description": "a woman on the stairs", "seconds": 1.0, "narration": "Then Mara came back. 🌊"},
    ],
}
RAMBLING = {
    "scenes": [
        {
            "description": "a long speech",
            "narration": "This narration goes on and on, far longer than any scene may last here. " * 2,
        }
    ]
}


@dataclass
class Run:
    s: Setup
    proc: subprocess.CompletedProcess[str]
    folder: Path
    manifest: dict[str, Any]

    def events(self, name: str) -> list[dict[str, Any]]:
        found = []
        for line in self.proc.stderr.splitlines():
            if line.startswith("{"):
                event = json.loads(line)
                if event.get("event") == name:
                    found.append(event)
        return found

    def spans(self) -> list[tuple[float, float]]:
        """Each narration's [start, end) on the film, in seconds, from the manifest."""
        return [
            (sc["narration_start_seconds"], sc["narration_start_seconds"] + sc["narration"]["seconds"])
            for sc in self.manifest["scenes"]
            if sc["narration"] is not None
        ]

    def under(self) -> list[tuple[float, float]]:
        """Inside each spoken sentence, well after it starts (the ducking's attack)."""
        out = []
        for sc in self.manifest["scenes"]:
            if sc["narration"] is not None:
                at = sc["narration_start_seconds"]
                for s in sc["narration"]["sentences"]:
                    if s["end"] - s["start"] > 0.4:
                        out.append((at + s["start"] + 0.15, at + s["end"] - 0.05))
        return out

    def between(self) -> list[tuple[float, float]]:
        """Between two narrations, once the music is back (its release)."""
        return [
            (end + 1.5, start - 0.1) for (_, end), (start, _) in pairwise(self.spans()) if start - end > 2.1
        ]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> Run:
    require("espeak-ng", espeak_installed() is not None, "make system-packages")
    root = tmp_path_factory.mktemp("sound_daemon")
    song = music(root / "song.wav", 4.0)  # shorter than the film: looped
    s = Setup(
        root / "box",
        tiny_dir,
        image={"width": 1344, "height": 768, "steps": 1},
        video={"width": SIZE[0], "height": SIZE[1], "fps": "24000/1001", "seconds_per_scene": 1.0},
        audio={"music": str(song), "loudness_lufs": TARGET},
        limits={"max_scene_seconds": 8.0},
    )
    s.drop("keeper.json", KEEPER)
    s.drop("rambling.json", RAMBLING)
    proc = s.run_once()
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = s.outbox / "keeper"
    manifest = check_published(s, "keeper", 3)
    return Run(s, proc, folder, manifest)


def test_a_narration_longer_than_its_seconds_gets_a_longer_clip(run: Run) -> None:
    first, middle, last = run.manifest["scenes"]
    spoken = first["narration"]["seconds"]
    assert spoken > 2.5  # two sentences
    assert first["length_from"] == "narration" and first["frames"] > round(1.0 * FPS)
    assert first["seconds"] >= spoken + 0.4  # a pad at each end
    assert probe(run.folder / first["clip"]).frames == first["frames"]
    assert middle["length_from"] == "seconds" and middle["frames"] == round(3.0 * FPS)
    assert last["length_from"] == "narration" and last["seconds_asked"] == 1.0


def test_everything_is_1920x1080_at_exactly_23_976_in_bt709(run: Run) -> None:
    check_pictures(run.folder, run.manifest, SIZE, FPS)
    for sc in run.manifest["scenes"]:
        with Image.open(run.folder / sc["image"]) as img:
            assert img.size == (1344, 768)


def test_the_film_and_every_clip_carry_their_sound_in_sync(run: Run) -> None:
    check_in_sync(run.folder / "film.mp4", run.manifest["film_info"]["frames"], FPS)
    for sc in run.manifest["scenes"]:
        check_in_sync(run.folder / sc["clip"], sc["frames"], FPS)
    clip = decode(run.folder / run.manifest["scenes"][0]["clip"])  # its own narration
    start = run.manifest["scenes"][0]["narration_start_seconds"]
    assert rms_db(clip, start + 0.3, start + 1.0) > -40


def test_the_mix_is_at_the_target_loudness(run: Run) -> None:
    mix = run.manifest["sound"]["mix"]
    measured = loudness(decode(run.folder / "film.mp4"))
    assert measured == pytest.approx(TARGET, abs=1.0)
    assert mix["target_lufs"] == TARGET and mix["integrated_lufs"] == pytest.approx(measured, abs=0.5)
    assert mix["true_peak_dbtp"] <= -1.0 and mix["normalization"] == "linear"


def test_narration_sounds_inside_each_narrated_scene_and_nowhere_else(run: Run) -> None:
    stem = decode(run.folder / "audio" / "narration.wav", channels=1)
    film = decode(run.folder / "film.mp4").shape[0]
    for name in ("narration.wav", "music.wav"):  # 48 kHz WAV stems, the film's length
        check_stem(run.folder / "audio" / name, film)
    scenes = run.manifest["scenes"]
    for sc in scenes:
        if sc["narration"] is None:
            continue
        start, seconds = sc["narration_start_seconds"], sc["narration"]["seconds"]
        own = (sc["start_seconds"], sc["start_seconds"] + sc["seconds"])
        assert own[0] < start and start + seconds <= own[1]  # inside the scene's clip
        assert rms_db(stem, start, start + seconds) > -40
        assert rms_db(stem, own[0], start - 0.02) < -70 and rms_db(stem, start + seconds + 0.02, own[1]) < -70
    quiet = scenes[1]  # the scene with no narration, clear of its neighbours' crossfades
    assert rms_db(stem, quiet["start_seconds"] + 0.5, quiet["start_seconds"] + quiet["seconds"] - 0.5) < -70
    for k in (1, 3):  # each narrated scene's voice alone, at its place: also the film's length
        own = decode(run.folder / "audio" / f"scene_{k:03d}.wav", channels=1)
        check_stem(run.folder / "audio" / f"scene_{k:03d}.wav", film)
        sc = scenes[k - 1]
        start, end = sc["narration_start_seconds"], sc["narration_start_seconds"] + sc["narration"]["seconds"]
        assert rms_db(own, start, end) > -40 and rms_db(own, 0, start - 0.02) < -70
        assert rms_db(own, end + 0.02, film / 48000) < -70
    assert not (run.folder / "audio" / "scene_002.wav").exists()


def test_music_is_ducked_at_least_8_db_under_the_voice_in_the_stem_and_the_mix(run: Run) -> None:
    under, between = run.under(), run.between()
    assert len(under) >= 2 and len(between) == 1
    for name in ("audio/music.wav", "film.mp4"):
        x = decode(run.folder / name)
        ducked = max(band_db(x, a, b) for a, b in under)
        free = min(band_db(x, a, b) for a, b in between)
        assert free - ducked >= 8.0, f"{name}: only {free - ducked:.1f} dB under the voice"


def test_captions_parse_and_lie_within_their_scenes(run: Run) -> None:
    cues = check_captions(run.folder, run.manifest)
    assert [c.content for c in cues] == [
        "The lighthouse stood alone on the rock.",
        "Nobody had climbed its stairs for years.",
        "Then Mara came back. 🌊",  # as written: the emoji is not spoken, but it is captioned
    ]


def test_the_timelines_open_with_the_scenes_in_order_and_the_sound_stems(run: Run, tmp_path: Path) -> None:
    timelines = check_timelines(run.folder, run.manifest, FPS, tmp_path, run.s.outbox / "keeper.zip")
    for kind in ("otio", "fcp7"):
        urls = [
            [c.media_reference.target_url for c in t.find_clips()] for t in timelines[kind].audio_tracks()
        ]
        assert urls == [["audio/narration.wav"], ["audio/music.wav"]], kind
    assert run.manifest["timeline"]["audio_tracks"] == ["audio/narration.wav", "audio/music.wav"]


def test_the_manifest_says_who_spoke_what_for_how_long(run: Run) -> None:
    first, middle, last = run.manifest["scenes"]
    voice = run.manifest["sound"]["voice"]
    assert voice["engine"] == "espeak-ng" and voice["version"] and voice["voice"] == "en-us"
    assert first["narration"]["source"] == voice and first["narration"]["text"].startswith("The lighthouse")
    assert first["narration"]["seconds"] > 0 and middle["narration"] is None
    assert last["narration"]["warnings"] == [
        "scene 3: not spoken by espeak-ng en-us, captioned as written: 🌊"
    ]
    assert run.manifest["sound"]["music"]["from"] == "audio.music"
    assert run.manifest["sound"]["captions"] == ["film.srt", "film.vtt"]
    assert run.manifest["settings"]["video"]["fps"] == "24000/1001"
    assert run.manifest["settings"]["audio"]["loudness_lufs"] == TARGET


def test_what_a_voice_cannot_say_is_a_warning_naming_the_scene(run: Run) -> None:
    warned = run.events("narration not fully spoken")
    assert [(e["story"], e["scene"]) for e in warned] == [("keeper", 3)]


def test_the_voice_is_opened_once_for_every_story(run: Run) -> None:
    ready = run.events("sound ready")
    assert len(ready) == 1 and ready[0]["voice"]["engine"] == "espeak-ng"
    assert len(run.events("story started")) == 2


def test_a_narration_past_the_scene_limit_fails_the_story_naming_the_scene(run: Run) -> None:
    last = run.s.status("rambling")[-1]
    assert last["state"] == "failed"
    assert last["error"].startswith("scenes.0.narration (scene 1): the narration lasts ")
    assert "limits.max_scene_seconds = 8" in last["error"]
    assert not (run.s.outbox / "rambling").exists()
    assert not has_audio(run.folder / "master" / "scene_001.mp4")  # masters are clean: picture only

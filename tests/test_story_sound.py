"""The story runner's sound, scene by scene and after the last one, with a stand-in voice.

`ToneVoice` speaks each sentence as a tone through the real sentence path (pipeline.sound.speech)
and counts the scenes it is asked to speak, so these tests need no TTS engine and know who
spoke what. What was written is decoded: the sound by ffmpeg, captions by srt, burned
captions by looking at the film's pictures.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import srt
from PIL import Image
from test_render import BrightGenerator, settings

from pipeline.images.seam import GeneratedImage, SceneRequest
from pipeline.prompts import ScenePlan
from pipeline.render import QuietEvents, SoundSetup, Stopped, StoryJob, render_story
from pipeline.settings import Settings
from pipeline.sound.speech import Speech, speak_sentences
from pipeline.story import StoryError, validate_story

from conftest import has_audio, read_frames
from sound_media import decode, music, rms_db, write_wav

FPS = 12


class ToneVoice:
    """A 440 Hz tone per sentence, 0.08 s per character; remembers the scenes it spoke."""

    engine = "tone"

    def __init__(self) -> None:
        self.spoken: list[int] = []

    def describe(self) -> dict[str, Any]:
        return {"engine": "tone", "version": "1"}

    def speak(self, text: str, wav: Path, *, scene: int) -> Speech:
        self.spoken.append(scene)
        return speak_sentences(
            self._tone, rate=22050, language="en", text=text, wav=wav, scene=scene,
            source=self.describe(), voice_name="tone",
        )  # fmt: skip

    @staticmethod
    def _tone(sentence: str) -> np.ndarray:
        t = np.arange(round(0.08 * len(sentence) * 22050)) / 22050
        return (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


class StopAfterFirst(QuietEvents):
    """Asks to stop as soon as the first scene has started: it is finished, the rest is not."""

    started = 0

    def scene_started(self, plan: ScenePlan, total: int, eta_seconds: float | None) -> None:
        self.started += 1

    def should_stop(self) -> bool:
        return self.started >= 1


class DarkGenerator(BrightGenerator):
    """A near-black picture: burned white captions stand out."""

    def generate(self, req: SceneRequest, on_step: Any = None) -> GeneratedImage:
        image = Image.new("RGB", (req.width, req.height), (12, 12, 12))
        return GeneratedImage(image=image, timings={"total": 0.0}, info={})


def job_for(tmp: Path, doc: dict[str, Any], s: Settings, files: Path | None = None) -> StoryJob:
    story = validate_story(doc, s.limits, bundle=files is not None)
    return StoryJob("keeper", story, json.dumps(doc).encode(), tmp / "work", files=files)


def manifest(job: StoryJob) -> dict[str, Any]:
    return json.loads((job.out / "manifest.json").read_text("utf-8"))  # type: ignore[no-any-return]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


NARRATED = {
    "scenes": [
        {"description": "a cliff", "narration": "The lamp was dark. Nobody came.", "seconds": 1.0},
        {"description": "a lamp", "narration": "Then Mara climbed the stairs."},
        {"description": "the sea", "narration": "And the light came back."},
    ]
}


def test_a_resumed_story_does_not_speak_its_finished_scenes_again(tmp_path: Path) -> None:
    s = settings(tmp_path)
    job = job_for(tmp_path, NARRATED, s)
    first = ToneVoice()
    with pytest.raises(Stopped):
        render_story(job, s, BrightGenerator(), StopAfterFirst(), sound=SoundSetup(first))
    assert first.spoken == [1]
    again = ToneVoice()
    render_story(job, s, BrightGenerator(), sound=SoundSetup(again))
    assert again.spoken == [2, 3]
    scenes = manifest(job)["scenes"]
    assert [sc["length_from"] for sc in scenes] == ["narration", "narration", "narration"]
    stem = decode(job.out / "audio" / "narration.wav", channels=1)
    for sc in scenes:  # scene 1's narration, spoken before the stop, is in the film all the same
        start, seconds = sc["narration_start_seconds"], sc["narration"]["seconds"]
        assert rms_db(stem, start + 0.05, start + seconds - 0.05) > -20
    assert [sc["narration"]["source"]["engine"] for sc in scenes] == ["tone"] * 3


def test_a_bundle_s_recording_wins_over_the_voice_and_its_music_over_the_box_s(tmp_path: Path) -> None:
    files = tmp_path / "bundle"
    files.mkdir()
    t = np.arange(2 * 8000) / 8000  # 2 s of speech-like tone, recorded at 8 kHz: converted
    write_wav(files / "voice.wav", 0.4 * np.sin(2 * np.pi * 300 * t), 8000)
    music(files / "song.wav", 3.0)
    box_song = music(tmp_path / "box.wav", 3.0, seed=2)
    doc = {
        "music": "song.wav",
        "scenes": [
            {"description": "a cliff", "narration": "Recorded words.", "audio": "voice.wav", "seconds": 1.0},
            {"description": "a lamp", "narration": "Spoken by the voice."},
        ],
    }
    s = settings(tmp_path)
    s.outputs.subtitles = False
    voice = ToneVoice()
    job = job_for(tmp_path, doc, s, files)
    render_story(job, s, BrightGenerator(), sound=SoundSetup(voice, box_song))
    assert voice.spoken == [2]  # scene 1's recording is its narration; the voice speaks scene 2 only
    m = manifest(job)
    first = m["scenes"][0]
    assert first["narration"]["source"] == {
        "engine": "file",
        "file": "voice.wav",
        "sha256": sha256(files / "voice.wav"),
    }
    assert first["narration"]["text"] == "Recorded words." and first["narration"]["seconds"] == pytest.approx(
        2.0
    )
    assert first["length_from"] == "narration" and first["seconds"] >= 2.4
    assert m["sound"]["music"]["from"] == "bundle" and m["sound"]["music"]["sha256"] == sha256(
        files / "song.wav"
    )
    assert has_audio(job.out / "film.mp4") and (job.out / "audio" / "music.wav").is_file()
    assert not (job.out / "film.srt").exists() and m["sound"]["captions"] == []  # [outputs] subtitles = false


def test_a_recording_longer_than_a_scene_may_last_fails_naming_its_field(tmp_path: Path) -> None:
    files = tmp_path / "bundle"
    files.mkdir()
    write_wav(files / "long.wav", 0.3 * np.sin(np.arange(3 * 16000) / 10), 16000)
    s = settings(tmp_path)
    s.limits.max_scene_seconds = 2.0
    doc = {"scenes": [{"description": "a cliff", "audio": "long.wav", "seconds": 1.0}]}
    job = job_for(tmp_path, doc, s, files)
    with pytest.raises(StoryError, match=r"^scenes\.0\.audio \(scene 1\): the narration lasts 3\.0 s"):
        render_story(job, s, BrightGenerator(), sound=SoundSetup(ToneVoice()))


def test_with_no_voice_narration_is_captions_only_and_can_be_burned_in(tmp_path: Path) -> None:
    s = settings(tmp_path, width=320, height=240, burn_captions=True)
    s.voice.engine = "off"
    doc = {"scenes": [{"description": "a cliff", "narration": "Hello there.", "seconds": 2.0}, "the sea"]}
    job = job_for(tmp_path, doc, s)
    render_story(job, s, DarkGenerator())  # the library opens the configured voice: none
    m = manifest(job)
    first = m["scenes"][0]
    assert first["length_from"] == "seconds" and first["frames"] == 2 * FPS  # the scene keeps its seconds
    assert first["narration"]["source"] == {"engine": "none"} and first["narration"]["seconds"] == 0
    assert m["sound"]["voice"] == {"engine": "none"} and m["sound"]["mix"] is None
    assert not has_audio(job.out / "film.mp4") and not has_audio(job.out / first["clip"])
    assert not (job.out / "audio").exists()
    (cue,) = srt.parse((job.out / "film.srt").read_text("utf-8"))
    assert cue.content == "Hello there."
    start, end = cue.start.total_seconds(), cue.end.total_seconds()
    assert 0 <= start < end <= first["seconds"]
    _, frames = read_frames(job.out / "film.mp4")
    bottom = [f[int(f.shape[0] * 0.75) :].max() for f in frames]
    shown = [k for k, b in enumerate(bottom) if b > 200]  # white text over a black picture
    assert shown and start * FPS - 1 <= shown[0] and shown[-1] <= end * FPS + 1
    assert m["film_info"]["burned_captions"] is True

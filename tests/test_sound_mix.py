"""The mix, decoded and measured: loudness on target, music ducked under the voice, narration where
its scene is, every track as long as its pictures, silence never boosted, no sound no track."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from fractions import Fraction
from itertools import pairwise
from pathlib import Path

import numpy as np
import pysubs2
import pytest

from pipeline.sound.captions import story_cues, write_captions
from pipeline.sound.espeak import EspeakVoice, espeak_installed
from pipeline.sound.mix import SoundTracks, mix_story
from pipeline.sound.mux import mux_audio
from pipeline.sound.recorded import prepare_music
from pipeline.sound.speech import Speech
from pipeline.sound.text import split_sentences
from pipeline.sound.timing import SceneSound, Timing, plan_timing
from pipeline.sound.voices import open_voice, speak_scene
from pipeline.video.encode import VideoEncoding, open_video
from pipeline.video.film import FilmScene, make_film

from media import probe_clip
from sound_media import RATE, band_db, decode, loudness, music, require, rms_db, true_peak, write_wav
from tiny_voice import build_tiny_voice

pytestmark = pytest.mark.skipif(
    espeak_installed() is None, reason="espeak-ng is not installed (make system-packages)"
)
TARGET = -16.0
FPS = 24
NARRATIONS = [
    None,
    "The lighthouse stood alone on the rock. Nobody had climbed its stairs for years.",
    None,
    "Then one morning, Mara came back.",
    None,
]


@dataclass
class Story:
    timing: Timing
    speeches: list[Speech | None]
    tracks: SoundTracks
    film: Path  # film.mp4 with its sound muxed in
    folder: Path

    def spans(self) -> list[tuple[float, float]]:
        """Every narration's [start, end) on the film, in seconds."""
        out = []
        for sc, sp in zip(self.timing.scenes, self.speeches, strict=True):
            if sp is not None and sp.samples and sc.narration_start is not None:
                out.append((float(sc.narration_start), float(sc.narration_start) + sp.seconds))
        return out

    def sentence_windows(self) -> list[tuple[float, float]]:
        """Inside each spoken sentence, well after it starts (the ducking's attack)."""
        out = []
        for sc, sp in zip(self.timing.scenes, self.speeches, strict=True):
            if sp is not None and sp.samples and sc.narration_start is not None:
                at = float(sc.narration_start)
                out += [
                    (at + s.start + 0.15, at + s.end - 0.05) for s in sp.sentences if s.end - s.start > 0.4
                ]
        return out

    def between_windows(self) -> list[tuple[float, float]]:
        """Between narrations, once the music is back (release) and clear of its fades."""
        edges = [(0.0, 0.0), *self.spans(), (float(self.timing.seconds) + 1.5, 0.0)]
        out = []
        for (_, end), (start, _) in pairwise(edges):
            a, b = max(end + 1.5, 1.3), min(start - 0.1, float(self.timing.seconds) - 2.3)
            if b - a > 0.5:
                out.append((a, b))
        return out


def write_film(timing: Timing, out: Path) -> Path:
    """The film's pictures laid out as the timing says (pipeline/video/film.py), grey frames."""
    image = np.full((48, 64, 3), 100, np.uint8)
    scenes = [FilmScene(image, s.frames / FPS) for s in timing.scenes]
    enc = VideoEncoding(width=64, height=48, fps=Fraction(FPS), crf=35, preset="ultrafast")
    make_film(scenes, out, enc, fade_seconds=0.5, crossfade_seconds=0.5)
    return out


@pytest.fixture(scope="module", autouse=True)
def _espeak() -> None:
    require("espeak-ng", espeak_installed() is not None, "make system-packages")


@pytest.fixture(scope="module")
def story(tmp_path_factory: pytest.TempPathFactory) -> Story:
    folder = tmp_path_factory.mktemp("mix")
    voice = EspeakVoice()
    speeches = [
        speak_scene(voice, scene=k + 1, narration=text, wav=folder / f"n{k}.wav")
        for k, text in enumerate(NARRATIONS)
    ]
    seconds = [3.0, 2.0, 4.0, 1.0, 4.5]
    sounds = [SceneSound(s, sp.seconds if sp else None) for s, sp in zip(seconds, speeches, strict=True)]
    timing = plan_timing(sounds, fps=FPS, crossfade_seconds=0.5, max_scene_seconds=120)
    tune = prepare_music(music(folder / "song.wav", 7.0), folder / "music_in.wav", name="song.wav")  # looped
    (folder / "audio").mkdir()
    tracks = mix_story(
        timing, speeches, tune, loudness_lufs=TARGET, stems_dir=folder / "audio", tracks_dir=folder
    )
    assert tracks is not None
    film = mux_audio(write_film(timing, folder / "film.mp4"), tracks.film)
    return Story(timing, speeches, tracks, film, folder)


def test_the_film_is_at_the_target_loudness_under_the_true_peak_limit(story: Story) -> None:
    mix = decode(story.film)
    assert loudness(mix) == pytest.approx(TARGET, abs=1.0)
    assert true_peak(story.film) <= -1.0
    assert story.tracks.normalization == "linear"
    assert story.tracks.loudness_lufs == pytest.approx(loudness(mix), abs=0.5)  # what the manifest records
    assert story.tracks.record()["target_lufs"] == TARGET


def test_sound_and_pictures_are_the_same_length(story: Story) -> None:
    frames = probe_clip(story.film).frames
    assert frames == story.timing.frames
    samples = decode(story.film).shape[0]
    assert abs(samples / RATE - frames / FPS) <= 1 / FPS
    assert samples == story.timing.samples  # exactly, in fact: AAC's delay is in the edit list


def test_music_is_ducked_at_least_8_db_under_the_voice(story: Story) -> None:
    under, between = story.sentence_windows(), story.between_windows()
    assert len(under) >= 3 and len(between) >= 3
    stem = decode(story.folder / "audio" / "music.wav")
    assert stem.shape[0] == story.timing.samples  # the film's length
    mix = decode(story.film)
    for x, level in ((stem, rms_db), (stem, band_db), (mix, band_db)):  # the mix: by the music's 15 kHz tone
        loud_under = max(level(x, a, b) for a, b in under)
        quiet_between = min(level(x, a, b) for a, b in between)
        assert quiet_between - loud_under >= 8.0, (level.__name__, quiet_between, loud_under)


def test_narration_sounds_inside_its_scene_and_nowhere_else(story: Story) -> None:
    stem = decode(story.folder / "audio" / "narration.wav", channels=1)
    assert stem.shape[0] == story.timing.samples
    spans = story.spans()
    assert len(spans) == 2
    narrated = [s for s, sp in zip(story.timing.scenes, story.speeches, strict=True) if sp is not None]
    for (a, b), scene in zip(spans, narrated, strict=True):
        lo, hi = scene.window
        assert float(lo) < a < b < float(hi)
        assert rms_db(stem, a, b) > -35
    edges = [(0.0, 0.0), *spans, (float(story.timing.seconds), 0.0)]
    for (_, end), (start, _) in pairwise(edges):
        if start - end > 0.02:
            assert rms_db(stem, end + 0.01, start - 0.01) < -90  # digital silence between voices


def test_each_caption_is_inside_its_scene_over_its_spoken_sentence(story: Story, tmp_path: Path) -> None:
    cues = story_cues(story.timing, story.speeches)
    write_captions(cues, tmp_path / "film.srt", tmp_path / "film.vtt")
    parsed = pysubs2.load(str(tmp_path / "film.srt"))
    assert [e.plaintext for e in parsed] == [s for t in NARRATIONS if t for s in split_sentences(t, "en")]
    voice = decode(story.folder / "audio" / "narration.wav", channels=1)
    for cue, event in zip(cues, parsed, strict=True):
        scene = story.timing.scenes[cue.scene]
        assert scene.start * 1000 <= event.start < event.end <= scene.end * 1000
        assert rms_db(voice, event.start / 1000, event.end / 1000) > -40  # someone speaks under it


def test_the_stems_add_up_to_the_mix(story: Story) -> None:
    mix = decode(story.film)
    voice = decode(story.folder / "audio" / "narration.wav", channels=1)  # mono: in both ears as it is
    tune = decode(story.folder / "audio" / "music.wav")
    residual = mix - voice - tune  # what is left is AAC's coding noise, sample for sample aligned
    assert rms_db(residual, 0, float(story.timing.seconds)) < rms_db(mix, 0, float(story.timing.seconds)) - 30


def test_each_clip_has_its_own_narration_and_is_its_clips_length(story: Story) -> None:
    for k, (scene, speech) in enumerate(zip(story.timing.scenes, story.speeches, strict=True)):
        clip = decode(story.tracks.clips[k])
        assert abs(clip.shape[0] - float(scene.seconds) * RATE) <= RATE / FPS
        stem_path = story.tracks.scene_stems[k]
        if speech is None:
            assert stem_path is None
            continue
        assert stem_path is not None and stem_path.name == f"scene_{k + 1:03d}.wav"
        stem = decode(stem_path, channels=1)  # the film's length, the voice at its place on the film
        assert abs(stem.shape[0] - float(story.timing.seconds) * RATE) <= RATE / FPS
        start, end = float(scene.narration_start or 0), float(scene.narration_start or 0) + speech.seconds
        assert rms_db(stem, 0, start - 0.01) < -90 < rms_db(stem, start, end)
        assert rms_db(stem, end + 0.05, float(story.timing.seconds)) < -90, "no other scene's voice"
        first = round(float(scene.start) * RATE)
        voice = stem[first : first + clip.shape[0]]
        at = float((scene.narration_start or 0) - scene.start)
        # the clip carries that voice: what is left after it is only the (ducked) music, no other voice
        assert rms_db(clip - voice, at, at + speech.seconds) < rms_db(clip, at, at + speech.seconds) - 6


def test_a_clip_with_its_track_muxed_in_plays_in_sync(story: Story, tmp_path: Path) -> None:
    scene = story.timing.scenes[1]
    clip = tmp_path / "scene_002.mp4"
    with open_video(
        clip, VideoEncoding(width=64, height=48, fps=Fraction(FPS), crf=35, preset="ultrafast")
    ) as enc:
        for _ in range(scene.frames):
            enc.write(np.full((72, 64), 60, np.uint8))
    mux_audio(clip, story.tracks.clips[1])
    assert probe_clip(clip).frames == scene.frames
    assert abs(decode(clip).shape[0] / RATE - scene.frames / FPS) <= 1 / FPS


def test_other_rates_a_recording_piper_and_an_ntsc_frame_rate(tmp_path: Path) -> None:
    """Mono 8 kHz recorded narration, a piper voice and mono 22.05 kHz music at 24000/1001 fps."""
    require("piper-tts", importlib.util.find_spec("piper") is not None, "pip install -e '.[voice]'")
    fps = Fraction(24000, 1001)
    recording = music(tmp_path / "said.wav", 2.0, rate=8_000, channels=1)
    piper = open_voice(
        __import__("pipeline.settings").settings.VoiceSettings(piper_voice=str(build_tiny_voice(tmp_path)))
    )
    speeches = [
        speak_scene(piper, scene=1, narration="Recorded words.", wav=tmp_path / "n0.wav", audio=recording),
        speak_scene(
            piper,
            scene=2,
            narration="A voice made for the test. It says nothing at all.",
            wav=tmp_path / "n1.wav",
        ),
    ]
    sounds = [SceneSound(1.0, sp.seconds if sp else None) for sp in speeches]
    timing = plan_timing(sounds, fps=fps, crossfade_seconds=0.5, max_scene_seconds=120)
    tune = prepare_music(
        music(tmp_path / "m.wav", 3.0, rate=22_050, channels=1), tmp_path / "mi.wav", name="m.wav"
    )
    tracks = mix_story(timing, speeches, tune, loudness_lufs=-20.0, stems_dir=tmp_path, tracks_dir=tmp_path)
    assert tracks is not None
    video = tmp_path / "film.mp4"
    with open_video(
        video, VideoEncoding(width=64, height=48, fps=Fraction(fps), crf=35, preset="ultrafast")
    ) as enc:  # type: ignore[arg-type]
        for _ in range(timing.frames):
            enc.write(np.full((72, 64), 60, np.uint8))
    mux_audio(video, tracks.film)
    x = decode(video)
    assert loudness(x) == pytest.approx(-20.0, abs=1.0) and true_peak(video) <= -1.0
    assert probe_clip(video).frames == timing.frames
    assert abs(x.shape[0] / RATE - timing.frames / fps) <= 1 / fps


def test_silence_stays_silent(tmp_path: Path) -> None:
    silent_music = write_wav(tmp_path / "quiet.wav", np.zeros((3 * 44_100, 2)), 44_100)
    silent_voice = write_wav(tmp_path / "hush.wav", np.zeros(16_000), 8_000)
    speech = speak_scene(None, scene=1, narration=None, wav=tmp_path / "n.wav", audio=silent_voice)
    sound = SceneSound(3.0, speech.seconds if speech else None)
    timing = plan_timing([sound], fps=FPS, crossfade_seconds=0.5, max_scene_seconds=120)
    tune = prepare_music(silent_music, tmp_path / "m.wav", name="quiet.wav")
    tracks = mix_story(timing, [speech], tune, loudness_lufs=TARGET, stems_dir=tmp_path, tracks_dir=tmp_path)
    assert tracks is not None and tracks.normalization == "silent" and tracks.loudness_lufs is None
    x = decode(tracks.film)
    assert x.shape[0] == timing.samples and np.abs(x).max() == 0  # never boosted
    assert tracks.record()["integrated_lufs"] is None


def test_no_narration_no_music_no_sound(tmp_path: Path) -> None:
    captions_only = speak_scene(None, scene=1, narration="Only a caption.", wav=tmp_path / "n.wav")
    timing = plan_timing(
        [SceneSound(2.0), SceneSound(2.0)], fps=FPS, crossfade_seconds=0.5, max_scene_seconds=120
    )
    assert mix_story(timing, [captions_only, None], None, loudness_lufs=TARGET, stems_dir=tmp_path,
                     tracks_dir=tmp_path) is None  # fmt: skip
    assert list(tmp_path.iterdir()) == []


def test_music_alone_is_normalised_and_faded(tmp_path: Path) -> None:
    timing = plan_timing(
        [SceneSound(4.0), SceneSound(4.0)], fps=FPS, crossfade_seconds=0.5, max_scene_seconds=120
    )
    tune = prepare_music(
        music(tmp_path / "m.wav", 20.0, rate=48_000), tmp_path / "mi.wav", name="m.wav"
    )  # trimmed
    tracks = mix_story(
        timing, [None, None], tune, loudness_lufs=TARGET, stems_dir=tmp_path, tracks_dir=tmp_path
    )
    assert tracks is not None and tracks.narration_stem is None and tracks.scene_stems == (None, None)
    x = decode(tracks.film)
    assert x.shape[0] == timing.samples and loudness(x) == pytest.approx(TARGET, abs=1.0)
    assert rms_db(x, 0, 0.05) < rms_db(x, 2.0, 3.0) - 20  # faded in
    end = float(timing.seconds)
    assert rms_db(x, end - 0.05, end) < rms_db(x, 3.0, 4.0) - 20  # and out


@pytest.mark.parametrize("target", [-16.0, -13.0])
def test_long_music_under_a_short_narration_reaches_the_target_in_one_gain(
    tmp_path: Path, target: float
) -> None:
    """Music for most of the film, one short line: the mix measures far below its voice's peaks,
    so the peaks are limited lower (passes 1b, 1c) until one gain reaches the target under -1 dBTP,
    and the stems raised by that gain do not clip."""
    speech = speak_scene(
        EspeakVoice(), scene=2, narration="Then one morning, Mara came back.", wav=tmp_path / "n.wav"
    )
    speeches = [None, speech, None]
    sounds = [SceneSound(12.0), SceneSound(2.0, speech.seconds if speech else None), SceneSound(12.0)]
    timing = plan_timing(sounds, fps=FPS, crossfade_seconds=0.5, max_scene_seconds=120)
    tune = prepare_music(music(tmp_path / "m.wav", 7.0), tmp_path / "mi.wav", name="m.wav")
    tracks = mix_story(timing, speeches, tune, loudness_lufs=target, stems_dir=tmp_path, tracks_dir=tmp_path)
    assert tracks is not None and tracks.normalization == "linear" and tracks.ceiling_db is not None
    x = decode(tracks.film)
    assert loudness(x) == pytest.approx(target, abs=1.0) and true_peak(tracks.film) <= -1.0
    for stem in (tracks.narration_stem, tracks.music_stem):
        assert stem is not None and np.abs(decode(stem)).max() < 0.99

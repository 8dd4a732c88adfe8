"""Voices: espeak-ng and piper (through its real API, with a voice built for the test) speak a
narration sentence by sentence into a 48 kHz WAV; what they cannot say is left out with a
warning and captioned whole; recordings of any rate or channel count are converted."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import wave
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest

from pipeline.settings import ConfigError, VoiceSettings
from pipeline.sound import espeak as espeak_module
from pipeline.sound.espeak import EspeakVoice, espeak_installed
from pipeline.sound.speech import SENTENCE_GAP_SECONDS, Speech
from pipeline.sound.voices import open_voice, speak_scene
from pipeline.story import StoryError

from conftest import REPO
from sound_media import RATE, decode, loudness, music, require, rms_db, write_wav
from tiny_voice import build_tiny_voice

needs_espeak = pytest.mark.usefixtures("espeak")
TEXT = "The lighthouse stood alone on the rock. Nobody had climbed it for years!\nThen Mara came."
SENTENCES = ["The lighthouse stood alone on the rock.", "Nobody had climbed it for years!", "Then Mara came."]


@pytest.fixture
def espeak() -> None:
    require("espeak-ng", espeak_installed() is not None, "make system-packages")


@pytest.fixture(scope="module")
def piper_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require("piper-tts", importlib.util.find_spec("piper") is not None, "pip install -e '.[voice]'")
    return build_tiny_voice(tmp_path_factory.mktemp("voice"))


def check_wav(speech: Speech) -> np.ndarray:
    """The WAV is 48 kHz mono 16-bit, as long as the Speech says; its samples."""
    assert speech.wav is not None
    with wave.open(str(speech.wav), "rb") as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (RATE, 1, 2)
        assert w.getnframes() == speech.samples
    x = decode(speech.wav, channels=1)[:, 0]
    assert x.size == speech.samples
    return x


def check_sentences(speech: Speech, x: np.ndarray) -> None:
    """Each sentence span holds sound; the gaps between spans are silent."""
    assert [s.text for s in speech.sentences] == SENTENCES
    assert speech.sentences[0].start == 0.0 and speech.sentences[-1].end == pytest.approx(
        speech.seconds, abs=1e-3
    )
    for s in speech.sentences:
        assert rms_db(x, s.start, s.end) > -40, s
    for a, b in pairwise(speech.sentences):
        assert b.start - a.end == pytest.approx(SENTENCE_GAP_SECONDS, abs=0.002)
        assert rms_db(x, a.end + 0.01, b.start - 0.01) < -80  # the pause is silence


@needs_espeak
def test_espeak_speaks_sentence_by_sentence(tmp_path: Path) -> None:
    voice = open_voice(VoiceSettings(engine="espeak"))
    assert isinstance(voice, EspeakVoice)
    speech = speak_scene(voice, scene=1, narration=TEXT, wav=tmp_path / "n.wav")
    assert speech is not None and speech.warnings == ()
    x = check_wav(speech)
    check_sentences(speech, x)
    assert 2.0 < speech.seconds < 12.0
    assert speech.caption == TEXT.replace("\n", " ")
    assert speech.source == {"engine": "espeak-ng", "version": voice.version, "voice": "en-us"}
    assert voice.version[0].isdigit()
    assert speech.loudness_lufs == pytest.approx(loudness(x), abs=0.5)  # ffmpeg's and pyloudnorm's agree


def test_piper_speaks_one_chunk_per_sentence(tmp_path: Path, piper_onnx: Path) -> None:
    voice = open_voice(VoiceSettings(engine="auto", piper_voice=str(piper_onnx)))  # auto: piper when set
    assert voice is not None and voice.engine == "piper"
    speech = speak_scene(voice, scene=2, narration=TEXT, wav=tmp_path / "n.wav")
    assert speech is not None and speech.warnings == ()
    x = check_wav(speech)
    check_sentences(speech, x)
    # each sentence's span is the length of piper's own chunk for it, resampled to 48 kHz
    for s in speech.sentences:
        chunk = voice.synthesize(s.text)  # type: ignore[attr-defined]
        assert s.end - s.start == pytest.approx(chunk.size / 22_050, abs=0.01)
    src = speech.source
    assert src["engine"] == "piper" and src["voice"] == "tiny-voice" and src["voice_piper_version"] == "1.0.0"
    assert src["piper_tts"] == __import__("importlib.metadata").metadata.version("piper-tts")
    assert len(src["voice_sha256"]) == 64


@needs_espeak
@pytest.mark.parametrize(
    ("text", "spoken", "dropped"),
    [
        ("🌊🐚🌊", False, "🌊🐚"),
        ("こんにちは、世界。", False, "こんにちは 世界"),
        ("The sea 🌊 was calm. Привет мир. It was late.", True, "🌊 Привет мир"),
    ],
)
def test_what_a_voice_cannot_say_is_captioned_whole_with_a_warning(
    tmp_path: Path, text: str, spoken: bool, dropped: str
) -> None:
    voice = EspeakVoice("en-us")
    speech = speak_scene(voice, scene=4, narration=text, wav=tmp_path / "n.wav")
    assert speech is not None and speech.caption == text
    assert len(speech.warnings) == 1 and speech.warnings[0].startswith("scene 4: ")
    assert all(part in speech.warnings[0] for part in dropped.split())
    if not spoken:
        assert speech.wav is None and speech.samples == 0 and speech.sentences == ()
        return
    check_wav(speech)
    # the unspeakable sentence is shown with the one before it: nothing of the text is lost
    assert [s.text for s in speech.sentences] == ["The sea 🌊 was calm. Привет мир.", "It was late."]


def test_no_voice_is_captions_only(tmp_path: Path) -> None:
    assert open_voice(VoiceSettings(engine="off")) is None
    speech = speak_scene(None, scene=1, narration="Line one.\nLine two.", wav=tmp_path / "n.wav")
    assert speech is not None and speech.wav is None and speech.samples == 0
    assert speech.caption == "Line one. Line two." and speech.source == {"engine": "none"}
    assert speak_scene(None, scene=1, narration=None, wav=tmp_path / "n.wav") is None
    assert speak_scene(None, scene=1, narration="  \n ", wav=tmp_path / "n.wav") is None
    assert not (tmp_path / "n.wav").exists()


def test_auto_without_espeak_is_off_and_espeak_asked_for_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("pipeline.sound.voices.espeak_installed", lambda: None)
    monkeypatch.setattr(espeak_module, "espeak_installed", lambda: None)
    assert open_voice(VoiceSettings(engine="auto")) is None
    with pytest.raises(ConfigError, match=r"voice\.engine: .*espeak-ng"):
        open_voice(VoiceSettings(engine="espeak"))


@needs_espeak
def test_an_unknown_espeak_voice_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"voice\.espeak_voice: espeak-ng has no voice 'xx-nowhere'"):
        open_voice(VoiceSettings(engine="espeak", espeak_voice="xx-nowhere"))


def test_piper_problems_are_config_errors(
    tmp_path: Path, piper_onnx: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    (tmp_path / "broken.onnx.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"voice\.piper_voice: .*broken\.onnx is not a usable piper voice"):
        open_voice(VoiceSettings(engine="piper", piper_voice=str(broken)))
    monkeypatch.setitem(sys.modules, "piper", None)  # as if the extra were not installed
    with pytest.raises(ConfigError, match=r"piper-tts is not installed \(pip install 'storyreel\[voice\]'\)"):
        open_voice(VoiceSettings(engine="piper", piper_voice=str(piper_onnx)))


def test_piper_is_imported_only_when_used() -> None:
    code = (
        "import sys; from pipeline.settings import VoiceSettings; "
        "from pipeline.sound.voices import open_voice; "
        "import pipeline.sound.mix, pipeline.sound.captions; open_voice(VoiceSettings(engine='off')); "
        "assert 'piper' not in sys.modules and 'onnxruntime' not in sys.modules, 'piper imported'"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize(
    ("rate", "channels", "silent"),
    [(8_000, 1, False), (44_100, 2, False), (96_000, 2, False), (22_050, 1, True)],
)
def test_recordings_of_any_rate_are_converted(tmp_path: Path, rate: int, channels: int, silent: bool) -> None:
    src = music(tmp_path / "in.wav", 2.5, rate=rate, channels=channels)
    if silent:
        src = write_wav(tmp_path / "in.wav", np.zeros((round(2.5 * rate), channels)), rate)
    speech = speak_scene(None, scene=3, narration="Recorded.\nAs said.", wav=tmp_path / "n.wav",
                         audio=src, audio_name="audio/in.wav")  # fmt: skip
    assert speech is not None
    x = check_wav(speech)
    assert speech.seconds == pytest.approx(2.5, abs=0.002)
    assert speech.loudness_lufs is None if silent else speech.loudness_lufs is not None
    assert bool(np.abs(x).max() == 0) is silent
    assert speech.source["engine"] == "file" and speech.source["file"] == "audio/in.wav"
    assert len(speech.source["sha256"]) == 64
    assert [(s.start, s.text) for s in speech.sentences] == [(0.0, "Recorded. As said.")]  # one span


def test_an_mp3_recording_is_decoded(tmp_path: Path) -> None:
    wav = music(tmp_path / "in.wav", 1.0, rate=32_000, channels=1)
    mp3 = tmp_path / "in.mp3"
    subprocess.run(
        [__import__("imageio_ffmpeg").get_ffmpeg_exe(), "-v", "error", "-i", str(wav), str(mp3)], check=True
    )
    speech = speak_scene(None, scene=1, narration=None, wav=tmp_path / "n.wav", audio=mp3)
    assert speech is not None and speech.seconds == pytest.approx(1.0, abs=0.06) and speech.caption == ""
    assert speech.sentences == ()  # no text: nothing to caption


def test_a_recording_that_does_not_decode_fails_the_story_naming_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "voice.wav"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" + bytes(range(256)) * 4)
    with pytest.raises(StoryError) as err:
        speak_scene(None, scene=2, narration="x", wav=tmp_path / "n.wav", audio=bad)
    assert len(err.value.problems) == 1
    assert err.value.problems[0].startswith("scenes.1.audio (scene 2): not a sound file ffmpeg can decode: ")
    assert not (tmp_path / "n.wav").exists()


@needs_espeak
def test_a_speech_record_reads_back(tmp_path: Path) -> None:
    speech = speak_scene(EspeakVoice(), scene=1, narration=TEXT, wav=tmp_path / "n.wav")
    assert speech is not None
    assert Speech.from_record(speech.record(), tmp_path) == speech

"""Which voice speaks a story's narration, and one scene's narration as a `Speech`.

`open_voice` is called once, at start (a piper voice takes a while to load, and a voice that
cannot work is a config error naming the key, exit 2); `speak_scene` once per scene, as part
of making it. A scene's recorded `audio` wins over the voice; its `narration`, if any, is then
only the caption. With no voice the narration is captions only and adds no sound.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from pipeline.settings import ConfigError, VoiceSettings
from pipeline.sound.espeak import EspeakVoice, espeak_installed
from pipeline.sound.recorded import recorded_speech
from pipeline.sound.speech import Speech
from pipeline.sound.text import caption_text

__all__ = ["Voice", "open_voice", "speak_scene"]


class Voice(Protocol):
    engine: str  # "piper" | "espeak"

    def describe(self) -> dict[str, Any]: ...
    def speak(self, text: str, wav: Path, *, scene: int) -> Speech: ...


def open_voice(settings: VoiceSettings) -> Voice | None:
    """The configured voice, loaded; None for captions only.

    auto: piper when `piper_voice` is set, else espeak-ng when installed, else none. A voice
    that is asked for and cannot work (piper-tts missing, a broken voice file, no espeak-ng
    or no such espeak voice) raises ConfigError naming the key.
    """
    engine = settings.engine
    if engine == "off" or (engine == "auto" and not settings.piper_voice and espeak_installed() is None):
        return None
    if engine == "piper" or (engine == "auto" and settings.piper_voice):
        if not settings.piper_voice:
            raise ConfigError('voice.piper_voice: engine = "piper" needs a voice file (.onnx)')
        from pipeline.sound.piper_voice import PiperVoice  # only where piper is used

        return PiperVoice(Path(settings.piper_voice))
    return EspeakVoice(settings.espeak_voice)


def speak_scene(
    voice: Voice | None,
    *,
    scene: int,
    narration: str | None,
    wav: Path,
    audio: Path | None = None,
    audio_name: str = "",
) -> Speech | None:
    """Scene `scene` (1-based) as sound, written to `wav`; None when it has neither narration
    nor audio. `audio` is the bundle's file for the scene (`audio_name` its path inside the
    bundle); it wins over the voice. A narration no voice speaks gives a Speech with no sound,
    so that its caption and source ("none") are recorded all the same."""
    text = narration if narration and narration.strip() else None
    if audio is not None:
        field = f"scenes.{scene - 1}.audio (scene {scene})"
        return recorded_speech(audio, wav, text=text, name=audio_name or audio.name, field=field)
    if text is None:
        return None
    if voice is None:
        return Speech(None, 0, caption_text(text), (), {"engine": "none"}, None)
    return voice.speak(text, wav, scene=scene)

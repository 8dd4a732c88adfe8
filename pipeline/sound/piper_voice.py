"""piper-tts, offline neural speech, with the voice file `[voice] piper_voice` names.

piper-tts is an optional extra (`pip install 'storyreel[voice]'`, GPL-3.0-or-later since 1.3:
it links espeak-ng for phonemes), imported only when a piper voice is opened, so an install
without it runs with espeak-ng or captions only. Written against piper-tts 1.8.0:
`PiperVoice.load(onnx, config_path)`, `voice.synthesize(text)` -> one `AudioChunk` per
sentence the voice finds (`audio_float_array`, float32 in [-1, 1], at `config.sample_rate`).
Each sentence as written is given to it alone, so every chunk it returns is that sentence's.
"""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.fsutil import file_sha256
from pipeline.settings import ConfigError
from pipeline.sound.speech import Speech, speak_sentences

__all__ = ["PiperVoice"]


class PiperVoice:
    """One piper voice loaded (an ONNX model and its .onnx.json): load once, speak many scenes."""

    engine = "piper"

    def __init__(self, onnx: Path) -> None:
        try:
            import piper
        except ImportError:
            raise ConfigError(
                "voice.piper_voice: piper-tts is not installed (pip install 'storyreel[voice]')"
            ) from None
        onnx = Path(onnx)
        config = Path(f"{onnx}.json")
        try:
            info = json.loads(config.read_text("utf-8"))
            self._voice = piper.PiperVoice.load(onnx, config_path=config)
        except Exception as err:  # a broken voice file is a config error, named at start
            raise ConfigError(f"voice.piper_voice: {onnx} is not a usable piper voice: {err}") from None
        self.onnx = onnx
        self.rate = int(self._voice.config.sample_rate)
        self.language = str(self._voice.config.espeak_voice or "en")
        self._source = {
            "engine": "piper",
            "piper_tts": metadata.version("piper-tts"),
            "voice": onnx.name.removesuffix(".onnx"),
            "voice_sha256": file_sha256(onnx),
            "voice_piper_version": info.get("piper_version"),
            "language": self.language,
        }

    def describe(self) -> dict[str, Any]:
        return dict(self._source)

    def synthesize(self, sentence: str) -> np.ndarray:
        chunks = [np.asarray(c.audio_float_array, dtype=np.float32) for c in self._voice.synthesize(sentence)]
        return np.concatenate(chunks) if chunks else np.zeros(0, np.float32)

    def speak(self, text: str, wav: Path, *, scene: int) -> Speech:
        return speak_sentences(
            self.synthesize,
            rate=self.rate,
            language=self.language,
            text=text,
            wav=wav,
            scene=scene,
            source=self.describe(),
            voice_name=f"piper {self._source['voice']}",
        )

"""A bundle's own sound files: a scene's recorded narration, and the story's music.

Any rate, any channel count, silence included, is converted (never refused for that): to 48 kHz
16-bit WAV, mono for narration and stereo for music, measured for loudness in the same ffmpeg
run. A file ffmpeg cannot decode fails the story with the field that named it.
"""

from __future__ import annotations

import math
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.fsutil import atomic_path, file_sha256
from pipeline.sound.ffmpeg import EBUR128, RATE, FfmpegFailed, read_ebur128, run_ffmpeg
from pipeline.sound.speech import Sentence, Speech
from pipeline.sound.text import caption_text
from pipeline.story import StoryError

__all__ = ["Music", "prepare_music", "recorded_speech"]


@dataclass(frozen=True)
class Music:
    """The story's music, converted: 48 kHz stereo WAV, its length and loudness, where it came from."""

    wav: Path
    samples: int
    loudness_lufs: float | None  # None: silent
    source: dict[str, Any]

    @property
    def seconds(self) -> float:
        return self.samples / RATE


def convert(src: Path, dst: Path, *, channels: int, field: str) -> tuple[int, float | None]:
    """`src`'s first audio stream -> `dst` (48 kHz 16-bit WAV); (samples, LUFS or None)."""
    layout = "mono" if channels == 1 else "stereo"
    graph = (
        f"[0:a:0]aresample={RATE}:resampler=soxr,aformat=sample_fmts=fltp:channel_layouts={layout},"
        f"asplit[out][m];[m]{EBUR128}[ln]"
    )
    try:
        with atomic_path(dst) as tmp:
            err = run_ffmpeg(
                ["-i", str(src), "-filter_complex", graph, "-map", "[ln]", "-f", "null", "-",
                 "-map", "[out]", "-c:a", "pcm_s16le", "-f", "wav", str(tmp)],
                what=src.name,
            )  # fmt: skip
    except FfmpegFailed as failed:
        raise StoryError([f"{field}: not a sound file ffmpeg can decode: {failed}"]) from None
    with wave.open(str(dst), "rb") as w:
        samples = w.getnframes()
    measured = read_ebur128(err)
    silent = not measured or measured[0].silent or not math.isfinite(measured[0].integrated)
    return samples, None if silent else measured[0].integrated


def recorded_speech(src: Path, wav: Path, *, text: str | None, name: str, field: str) -> Speech:
    """A scene's recorded narration (its `audio`); `text`, if any, is its caption, one cue over it.

    `name` is how the manifest names the file (its path inside the bundle); `field` names it in
    an error ("scenes.2.audio (scene 3)").
    """
    samples, lufs = convert(src, wav, channels=1, field=field)
    caption = caption_text(text or "")
    seconds = samples / RATE
    spans = (Sentence(0.0, seconds, caption),) if caption and samples else ()
    source = {"engine": "file", "file": name, "sha256": file_sha256(src)}
    return Speech(wav if samples else None, samples, caption, spans, source, lufs)


def prepare_music(src: Path, wav: Path, *, name: str, field: str = "music") -> Music:
    """The story's music as 48 kHz stereo; the mix loops or trims it to the film."""
    samples, lufs = convert(src, wav, channels=2, field=field)
    return Music(
        wav, samples, lufs, {"file": name, "sha256": file_sha256(src), "seconds": round(samples / RATE, 3)}
    )

"""One scene's narration as sound: a 48 kHz WAV, where its sentences fall, what made it.

Both voices speak a narration one sentence at a time (a sentence as written, found by
`text.split_sentences`), so where each sentence starts and ends in the sound is known exactly
and each caption cue shows one sentence. The pieces are joined with a short pause, trimmed of
the engine's own leading and trailing silence, resampled to 48 kHz and measured (EBU R128) in
one ffmpeg run: the mix brings every narration to the same level from that measurement.
"""

from __future__ import annotations

import math
import wave
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.fsutil import atomic_path
from pipeline.sound.ffmpeg import EBUR128, RATE, read_ebur128, run_ffmpeg
from pipeline.sound.text import caption_text, speakable, split_sentences

__all__ = ["SENTENCE_GAP_SECONDS", "Sentence", "Speech", "speak_sentences", "write_narration_wav"]

SENTENCE_GAP_SECONDS = 0.3  # the pause between two sentences of one narration
_TRIM_LEVEL = 10 ** (-50 / 20)  # an engine's lead-in and tail below -50 dBFS are not speech


@dataclass(frozen=True)
class Sentence:
    """Where one sentence is heard, in seconds from the narration's first sample, and its caption."""

    start: float
    end: float
    text: str


@dataclass(frozen=True)
class Speech:
    """A scene's narration as sound. `wav` is None when nothing could be spoken."""

    wav: Path | None  # 48 kHz mono 16-bit PCM
    samples: int
    caption: str  # the whole narration as captions show it ("" for a recording without text)
    sentences: tuple[Sentence, ...]  # one per sentence where known, else one for the scene
    source: dict[str, Any]  # what made it: engine and version, or the file and its sha256
    loudness_lufs: float | None  # integrated (EBU R128); None: silent
    warnings: tuple[str, ...] = field(default=())

    @property
    def seconds(self) -> float:
        return self.samples / RATE

    def record(self) -> dict[str, Any]:
        """The scene's manifest entry for its narration (also what a resumed story reads back)."""
        return {
            "text": self.caption,
            "seconds": round(self.seconds, 3),
            "samples": self.samples,
            "wav": self.wav.name if self.wav else None,
            "source": self.source,
            "loudness_lufs": self.loudness_lufs,
            "sentences": [{"start": s.start, "end": s.end, "text": s.text} for s in self.sentences],
            "warnings": list(self.warnings),
        }

    @classmethod
    def from_record(cls, record: dict[str, Any], folder: Path) -> Speech:
        """A Speech from its record, its WAV in `folder` (a resumed story does not speak again)."""
        return cls(
            wav=folder / record["wav"] if record["wav"] else None,
            samples=int(record["samples"]),
            caption=record["text"],
            sentences=tuple(Sentence(s["start"], s["end"], s["text"]) for s in record["sentences"]),
            source=record["source"],
            loudness_lufs=record["loudness_lufs"],
            warnings=tuple(record["warnings"]),
        )


Synthesize = Callable[[str], np.ndarray]  # one sentence -> mono float32 at the engine's rate


def speak_sentences(
    synthesize: Synthesize,
    *,
    rate: int,
    language: str,
    text: str,
    wav: Path,
    scene: int,
    source: dict[str, Any],
    voice_name: str,
) -> Speech:
    """Speak `text` sentence by sentence with `synthesize` and write the scene's WAV.

    What the voice cannot say is left out of the sound (and named in a warning); a sentence
    left with nothing to say keeps its caption, shown with the sentence before it (or after).
    """
    caption = caption_text(text)
    gap = np.zeros(round(SENTENCE_GAP_SECONDS * rate), dtype=np.float32)
    pieces: list[np.ndarray] = []
    spans: list[list[Any]] = []  # [start sample, end sample, text] at the engine's rate
    orphans: list[str] = []  # captions of unspoken sentences waiting for a spoken one
    dropped: list[str] = []
    at = 0
    for sentence in split_sentences(caption, language):
        say = speakable(sentence, language)
        if say.dropped:
            dropped.append(say.dropped)
        audio = _trim(synthesize(say.spoken)) if say.anything else np.zeros(0, np.float32)
        if audio.size == 0:
            if spans:
                spans[-1][2] += " " + sentence
            else:
                orphans.append(sentence)
            continue
        if pieces:
            pieces.append(gap)
            at += gap.size
        spans.append([at, at + audio.size, " ".join([*orphans, sentence])])
        orphans = []
        pieces.append(audio)
        at += audio.size
    warnings = _warnings(scene, voice_name, dropped, spoken=bool(pieces))
    if not pieces:
        return Speech(None, 0, caption, (), source, None, warnings)
    samples, loudness = write_narration_wav(np.concatenate(pieces), rate, wav)
    scale = samples / at  # the resampled length, exactly as written
    sentences = tuple(Sentence(s * scale / RATE, e * scale / RATE, t) for s, e, t in spans)
    return Speech(wav, samples, caption, sentences, source, loudness, warnings)


def _trim(audio: np.ndarray) -> np.ndarray:
    audio = np.asarray(audio, dtype=np.float32).reshape(-1)
    loud = np.flatnonzero(np.abs(audio) > _TRIM_LEVEL)
    return audio[loud[0] : loud[-1] + 1] if loud.size else audio[:0]


def _warnings(scene: int, voice: str, dropped: list[str], *, spoken: bool) -> tuple[str, ...]:
    if not dropped and spoken:
        return ()
    what = " ".join(dict.fromkeys(dropped))
    what = what if len(what) <= 60 else what[:57] + "..."
    if not spoken:
        return (f"scene {scene}: nothing in its narration can be spoken by {voice} ({what or 'no words'}); "
                "it is captioned as written",)  # fmt: skip
    return (f"scene {scene}: not spoken by {voice}, captioned as written: {what}",)


def write_narration_wav(audio: np.ndarray, rate: int, wav: Path) -> tuple[int, float | None]:
    """Mono float samples at `rate` -> `wav` (48 kHz 16-bit) and its integrated loudness, in one
    ffmpeg run; returns (samples written, LUFS or None for silence)."""
    args = ["-f", "f32le", "-ar", str(rate), "-ac", "1", "-i", "pipe:0", "-filter_complex",
            f"[0:a]aresample={RATE}:resampler=soxr,asplit[out][m];[m]{EBUR128}[ln]",
            "-map", "[ln]", "-f", "null", "-"]  # fmt: skip
    with atomic_path(wav) as tmp:
        err = run_ffmpeg(
            [*args, "-map", "[out]", "-c:a", "pcm_s16le", "-f", "wav", str(tmp)],
            what=f"writing {wav.name}",
            stdin=np.ascontiguousarray(audio, dtype="<f4").tobytes(),
        )
    with wave.open(str(wav), "rb") as w:
        samples = w.getnframes()
    measured = read_ebur128(err)
    lufs = None if not measured or measured[0].silent else measured[0].integrated
    return samples, (lufs if lufs is None or math.isfinite(lufs) else None)

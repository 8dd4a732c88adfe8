"""Sound for the tests, made in code, and what the tests measure on what storyreel wrote.

Loudness is measured by pyloudnorm (ITU-R BS.1770-4) and true peak by ffmpeg's ebur128,
never by hand; a band level (the music's 15 kHz tone, where no voice here has any energy:
espeak-ng and the tiny piper voice both speak at 22.05 kHz, so nothing above 11 kHz) is
a plain FFT.
"""

from __future__ import annotations

import os
import re
import subprocess
import wave
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pyloudnorm
import pytest

from pipeline.sound.ffmpeg import decode_audio

RATE = 48_000
TONE_HZ = 15_000.0  # the music's marker tone, above every voice's band


def require(what: str, present: bool, install: str) -> None:
    """Skip without `what`, except under CI, which installs it (make system-packages, .[voice])."""
    if present:
        return
    reason = f"{what} is not installed ({install})"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true but {reason}", pytrace=False)
    pytest.skip(reason)


def write_wav(path: Path, samples: np.ndarray, rate: int) -> Path:
    """float samples (n,) or (n, channels) in [-1, 1] -> 16-bit PCM WAV."""
    x = np.asarray(samples, dtype=np.float64)
    x = x[:, None] if x.ndim == 1 else x
    with wave.open(str(path), "wb") as w:
        w.setnchannels(x.shape[1])
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(x, -1, 1) * 32767).astype("<i2").tobytes())
    return path


def music(path: Path, seconds: float, *, rate: int = 44_100, channels: int = 2, seed: int = 1) -> Path:
    """Test music: a 15 kHz marker tone, a slow 220/330 Hz chord and a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * rate)) / rate
    mono = 0.2 * np.sin(2 * np.pi * TONE_HZ * t) if rate > 2 * TONE_HZ else 0 * t
    mono = mono + 0.15 * np.sin(2 * np.pi * 220 * t) + 0.1 * np.sin(2 * np.pi * 330 * t)
    mono = mono + 0.02 * rng.standard_normal(t.size)
    return write_wav(path, np.repeat(mono[:, None], channels, axis=1), rate)


def loudness(x: np.ndarray) -> float:
    """Integrated loudness (LUFS, BS.1770-4) of 48 kHz samples."""
    return float(pyloudnorm.Meter(RATE).integrated_loudness(x))


def decode(path: Path, channels: int = 2) -> np.ndarray:
    return decode_audio(path, channels=channels)


def true_peak(path: Path) -> float:
    """ffmpeg ebur128's true peak (dBTP) of a file's audio."""
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostats", "-i", str(path),
           "-map", "0:a:0", "-af", "ebur128=peak=true", "-f", "null", "-"]  # fmt: skip
    err = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    return float(re.findall(r"True peak:\s*Peak:\s*(\S+) dBFS", err, re.S)[-1])


def band_db(x: np.ndarray, start: float, end: float, hz: float = TONE_HZ, width: float = 400.0) -> float:
    """Power (dB) within `width` Hz of `hz` over [start, end) seconds, channels averaged."""
    seg = x[round(start * RATE) : round(end * RATE)].mean(axis=1) if x.ndim == 2 else x
    seg = seg * np.hanning(seg.size)
    spec = np.abs(np.fft.rfft(seg)) ** 2
    freqs = np.fft.rfftfreq(seg.size, 1 / RATE)
    band = spec[(freqs > hz - width / 2) & (freqs < hz + width / 2)].sum()
    return float(10 * np.log10(band / seg.size + 1e-20))


def rms_db(x: np.ndarray, start: float, end: float) -> float:
    seg = x[round(start * RATE) : round(end * RATE)]
    return float(10 * np.log10(np.mean(np.square(seg, dtype=np.float64)) + 1e-20))

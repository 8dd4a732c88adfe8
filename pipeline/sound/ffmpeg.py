"""Running ffmpeg for sound, decoding sound to numpy, and reading loudnorm's measurements.

The binary is imageio-ffmpeg's (the one the clips are encoded with), so nothing depends on a
system ffmpeg. Every run gets a session of its own, as the video encoder's does
(pipeline.video.encode): a Ctrl-C to the daemon's process group must not reach ffmpeg, and a run
that a signal did stop is reported as `EncoderStopped`, which the runner treats as a stop,
not as the story's fault.
"""

from __future__ import annotations

import json
import math
import re
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import imageio_ffmpeg
import numpy as np

from pipeline.video.encode import EncoderStopped

__all__ = [
    "EBUR128",
    "RATE",
    "FfmpegFailed",
    "Loudness",
    "decode_audio",
    "ffmpeg_exe",
    "read_ebur128",
    "read_loudnorm",
    "run_ffmpeg",
]

RATE = 48_000  # every WAV, stem and AAC track storyreel writes
_FFMPEG_SIGNALLED = 255  # ffmpeg's exit status after it caught SIGINT, SIGTERM or SIGQUIT
_SILENCE_LUFS = -70.0  # BS.1770's absolute gate: nothing louder was measured
# The EBU R128 meter as a pass-through filter: its summary (integrated, LRA, true peak) is printed
# when the run ends, its per-frame lines only at the verbose log level.
EBUR128 = "ebur128=peak=true:framelog=verbose"


class FfmpegFailed(RuntimeError):
    """ffmpeg exited with an error; the message ends with its own last lines."""


def ffmpeg_exe() -> str:
    return imageio_ffmpeg.get_ffmpeg_exe()


def run_ffmpeg(args: list[str], *, what: str, stdin: bytes | None = None) -> str:
    """Run `ffmpeg ARGS` to the end and return its stderr (where filters print measurements)."""
    cmd = [ffmpeg_exe(), "-hide_banner", "-nostats", "-y"]
    if stdin is None:
        cmd.append("-nostdin")
    proc = subprocess.run(
        [*cmd, *args],
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        start_new_session=True,
        check=False,
    )
    err = proc.stderr.decode("utf-8", "replace")
    if proc.returncode < 0 or proc.returncode == _FFMPEG_SIGNALLED:
        rc = proc.returncode
        name = signal.Signals(-rc).name if rc < 0 and -rc in signal.valid_signals() else f"status {rc}"
        raise EncoderStopped(f"ffmpeg ({what}) was stopped by a signal ({name})")
    if proc.returncode != 0:
        raise FfmpegFailed(f"{what}: {_last_lines(err)}")
    return err


def _last_lines(err: str, n: int = 3) -> str:
    lines = [ln.strip() for ln in err.strip().splitlines() if ln.strip()]
    return " / ".join(lines[-n:]) or "ffmpeg failed without a message"


def decode_audio(
    path: Path, *, rate: int = RATE, channels: int = 1, start: float = 0.0, seconds: float | None = None
) -> np.ndarray:
    """The first audio stream of `path` as float32 samples, shape (n, channels), resampled and
    mixed down or up as asked. Raises FfmpegFailed when there is no decodable audio."""
    args = ["-ss", f"{start:.6f}"] if start else []
    args += ["-i", str(path), "-map", "0:a:0", "-vn"]
    if seconds is not None:
        args += ["-t", f"{seconds:.6f}"]
    args += ["-ac", str(channels), "-ar", str(rate), "-f", "f32le", "-c:a", "pcm_f32le", "pipe:1"]
    proc = subprocess.run(
        [ffmpeg_exe(), "-hide_banner", "-nostats", "-nostdin", "-v", "error", *args],
        capture_output=True,
        start_new_session=True,
        check=False,
    )
    if proc.returncode != 0:
        raise FfmpegFailed(f"{path.name}: {_last_lines(proc.stderr.decode('utf-8', 'replace'))}")
    return np.frombuffer(proc.stdout, dtype=np.float32).reshape(-1, channels)


@dataclass(frozen=True)
class Loudness:
    """An EBU R128 measurement: what a second loudnorm pass is given as measured_*."""

    integrated: float  # LUFS; -inf or -70 where nothing passed the gate
    true_peak: float  # dBTP
    lra: float  # LU
    threshold: float  # LUFS, the integrated measurement's relative gate
    normalization: str = ""  # loudnorm's report of what it did: "linear" | "dynamic"

    @property
    def silent(self) -> bool:
        """Nothing above BS.1770's absolute gate: there is no level to normalise."""
        return not math.isfinite(self.integrated) or self.integrated <= _SILENCE_LUFS

    def filter_args(self) -> str:
        """The measured_* options of a second loudnorm pass."""
        return (
            f"measured_I={self.integrated:.2f}:measured_TP={self.true_peak:.2f}:"
            f"measured_LRA={self.lra:.2f}:measured_thresh={self.threshold:.2f}"
        )


_SUMMARY = re.compile(
    r"Summary:\s*Integrated loudness:\s*I:\s*(\S+) LUFS\s*Threshold:\s*(\S+) LUFS"
    r"\s*Loudness range:\s*LRA:\s*(\S+) LU.*?True peak:\s*Peak:\s*(\S+) dBFS",
    re.DOTALL,
)


def read_ebur128(stderr: str) -> list[Loudness]:
    """Every ebur128 summary ffmpeg printed (`EBUR128`), in order.

    The mix is measured with ebur128, not with a first loudnorm pass: loudnorm's own first-pass
    measurement of a short mix was off by 0.4 to 1.7 LU here, and by how much depended on the
    sizes of the frames it was given (ffmpeg 9.0), while ebur128 agrees with pyloudnorm.
    """
    return [
        Loudness(integrated=_num(i), true_peak=_num(tp), lra=_num(lra), threshold=_num(th))
        for i, th, lra, tp in _SUMMARY.findall(stderr)
    ]


_JSON = re.compile(r"\[Parsed_loudnorm_\d+ @ [^\]]*\]\s*(\{.*?\})", re.DOTALL)


def read_loudnorm(stderr: str) -> list[Loudness]:
    """Every loudnorm report ffmpeg printed (print_format=json): its input, and what it did."""
    found = []
    for block in _JSON.findall(stderr):
        raw = json.loads(block)
        found.append(
            Loudness(
                integrated=_num(raw["input_i"]),
                true_peak=_num(raw["input_tp"]),
                lra=_num(raw["input_lra"]),
                threshold=_num(raw["input_thresh"]),
                normalization=str(raw.get("normalization_type", "")),
            )
        )
    return found


def _num(value: str) -> float:
    """Measurements are printed as text, with "-inf"/"inf" for silence."""
    try:
        return float(value)
    except ValueError:
        return -math.inf

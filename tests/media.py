"""Reading back what storyreel encoded, as a player would: stream header and exact frame count."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import imageio_ffmpeg

_STREAM = re.compile(
    r"Stream #\d+:\d+.*?: Video: (?P<codec>\w+).*?, (?P<pix>\w+)(?:\([^)]*\))?, (?P<w>\d+)x(?P<h>\d+)"
)
_FPS = re.compile(r", (?P<fps>[\d.]+) fps")
_FRAME = re.compile(r"^frame=(\d+)$", re.MULTILINE)


@dataclass(frozen=True)
class ClipProbe:
    """A video stream as ffmpeg reads it back; frames is counted, not estimated from duration."""

    path: Path
    codec: str
    pix_fmt: str
    width: int
    height: int
    fps: float
    frames: int


def probe_clip(path: Path) -> ClipProbe:
    """Read the stream header and count frames by stream copy, which costs milliseconds.

    The header's duration only estimates the frame count; the tests check exact numbers.
    """
    cmd = [
        imageio_ffmpeg.get_ffmpeg_exe(),
        "-hide_banner", "-nostdin", "-nostats", "-i", str(path),
        "-map", "0:v:0", "-c", "copy", "-progress", "pipe:1", "-f", "null", "-",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", check=False)
    header = proc.stderr.split("Stream mapping:")[0]
    stream = _STREAM.search(header)
    fps = _FPS.search(header)
    frames = _FRAME.findall(proc.stdout)
    if proc.returncode != 0 or stream is None or fps is None or not frames:
        tail = proc.stderr.strip().splitlines()[-3:]
        raise ValueError(f"{path}: not a readable video: {' / '.join(tail) or 'no video stream'}")
    return ClipProbe(
        path=Path(path),
        codec=stream["codec"],
        pix_fmt=stream["pix"],
        width=int(stream["w"]),
        height=int(stream["h"]),
        fps=float(fps["fps"]),
        frames=int(frames[-1]),
    )

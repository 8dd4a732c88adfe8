"""A video stream read back exactly: its rate as a fraction, its colour tags, its frames.

imageio-ffmpeg ships ffmpeg but no ffprobe. `ffmpeg -i` prints rates rounded ("23.98 fps"), so
the exact rate comes from the packets themselves: ffmpeg's framemd5 muxer prints the stream's
time base and every packet's duration, and a constant rate is 1 / (time base x duration).
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import imageio_ffmpeg
import numpy as np

_TB = re.compile(r"^#tb 0: (\d+)/(\d+)$", re.MULTILINE)
_STREAM = re.compile(
    r"Stream #0:0.*?: Video: (?P<codec>\w+)[^,]*, (?P<pix>\w+)(?:\((?P<tags>[^)]*)\))?, (?P<w>\d+)x(?P<h>\d+)"
)
_TAG_OPTIONS = {
    "primaries": "color_primaries",
    "transfer": "color_trc",
    "matrix": "colorspace",
    "range": "color_range",
}


@dataclass(frozen=True)
class Stream:
    codec: str
    pix_fmt: str
    width: int
    height: int
    rate: Fraction  # exact: every packet lasts 1/rate
    frames: int
    tags: str  # as ffmpeg -i shows them, e.g. "tv, bt709, progressive"


def _ffmpeg(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", *args]
    return subprocess.run(cmd, capture_output=True, text=True, errors="replace", check=False)


def probe(path: Path) -> Stream:
    proc = _ffmpeg("-i", str(path), "-map", "0:v:0", "-c", "copy", "-f", "framemd5", "-")
    header = _STREAM.search(proc.stderr)
    tb = _TB.search(proc.stdout)
    packets = [line.split(",") for line in proc.stdout.splitlines() if line and not line.startswith("#")]
    if proc.returncode != 0 or header is None or tb is None or not packets:
        raise AssertionError(f"{path}: not a readable video: {proc.stderr[-500:]}")
    durations = {int(p[3]) for p in packets}
    assert len(durations) == 1, (
        f"{path}: packets of different durations {sorted(durations)}: not a constant rate"
    )
    rate = 1 / (Fraction(int(tb[1]), int(tb[2])) * durations.pop())
    return Stream(
        codec=header["codec"],
        pix_fmt=header["pix"],
        width=int(header["w"]),
        height=int(header["h"]),
        rate=rate,
        frames=len(packets),
        tags=header["tags"] or "",
    )


def colour_tags(path: Path) -> dict[str, str]:
    """The four colour tags as the container and stream declare them (ffmpeg's trace of the
    decoder's frame properties, via the showinfo filter)."""
    proc = _ffmpeg("-i", str(path), "-frames:v", "1", "-vf", "showinfo", "-f", "null", "-")
    line = next((ln for ln in proc.stderr.splitlines() if "color_range:" in ln), "")
    found = dict(re.findall(r"(color_range|color_space|color_primaries|color_trc):(\w+)", line))
    return {
        "range": found.get("color_range", ""),
        "matrix": found.get("color_space", ""),
        "primaries": found.get("color_primaries", ""),
        "transfer": found.get("color_trc", ""),
    }


def decode_yuv420(path: Path, width: int, height: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Every frame's Y, Cb, Cr planes exactly as stored (no colour conversion by ffmpeg)."""
    proc = subprocess.run(
        [
            imageio_ffmpeg.get_ffmpeg_exe(),
            "-v",
            "error",
            "-i",
            str(path),
            "-f",
            "rawvideo",
            "-pix_fmt",
            "yuv420p",
            "-",
        ],
        capture_output=True,
        check=True,
    )
    n, q = width * height, width * height // 4
    size = n + 2 * q
    raw = np.frombuffer(proc.stdout, np.uint8)
    frames = []
    for k in range(len(raw) // size):
        f = raw[k * size : (k + 1) * size]
        frames.append(
            (
                f[:n].reshape(height, width),
                f[n : n + q].reshape(height // 2, width // 2),
                f[n + q :].reshape(height // 2, width // 2),
            )
        )
    return frames


def decode_rgb(path: Path, matrix: str = "bt709") -> np.ndarray:
    """Every frame as RGB, converted from limited-range YUV with the named matrix."""
    stream = probe(path)
    vf = f"scale=in_color_matrix={matrix}:in_range=tv:out_range=pc,format=rgb24"
    proc = subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(path), "-vf", vf, "-f", "rawvideo", "-"],
        capture_output=True,
        check=True,
    )
    return np.frombuffer(proc.stdout, np.uint8).reshape(-1, stream.height, stream.width, 3)
